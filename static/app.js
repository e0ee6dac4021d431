// The chat page: conversations in a sidebar, streamed markdown answers, settings kept in the browser.
import { applyI18n, t } from "./i18n.js";
import { heldBack, splitToolCalls } from "./tool_calls.js";
import { renderMarkdown, copyText } from "./markdown.js";
import { ApiError, clearServerCache, serverInfo, streamChat } from "./api.js";
import {
  DEFAULT_SETTINGS, historyOf, loadConversations, loadCurrentId, loadSettings, newConversation,
  saveConversations, saveSettings,
} from "./store.js";

const $ = (id) => document.getElementById(id);
const el = (tag, className, text) => {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
};

const state = {
  conversations: loadConversations(),
  currentId: loadCurrentId(),
  settings: loadSettings(),
  controller: null, // AbortController of the answer being streamed
};

function current() {
  let conv = state.conversations.find((c) => c.id === state.currentId);
  if (!conv) {
    conv = state.conversations[0] ?? newConversation(t("untitled"));
    if (!state.conversations.includes(conv)) state.conversations.unshift(conv);
    state.currentId = conv.id;
  }
  return conv;
}

function persist() {
  saveConversations(state.conversations, state.currentId);
}

// ---- rendering --------------------------------------------------------------------------------

function renderSidebar() {
  const list = $("conversations");
  list.replaceChildren();
  for (const conv of [...state.conversations].sort((a, b) => b.updated - a.updated)) {
    const item = el("li", conv.id === state.currentId ? "active" : "");
    item.dataset.id = conv.id;
    const name = el("span", "name", conv.title || t("untitled"));
    name.title = conv.title;
    const rename = el("button", "rename", "✎");
    rename.title = t("rename");
    const remove = el("button", "delete", "✕");
    remove.title = t("delete");
    item.append(name, rename, remove);
    item.addEventListener("click", (event) => {
      if (event.target === rename) return renameConversation(conv);
      if (event.target === remove) return deleteConversation(conv);
      switchTo(conv.id);
    });
    list.append(item);
  }
}

function renderMessages() {
  const conv = current();
  $("title").textContent = conv.title || t("untitled");
  const box = $("messages");
  box.replaceChildren();
  if (!conv.messages.length) box.append(el("div", "empty", t("empty")));
  conv.messages.forEach((msg, i) => box.append(messageView(conv, msg, i)));
  box.scrollTop = box.scrollHeight;
}

function messageView(conv, msg, index) {
  const view = el("div", `msg ${msg.role}`);
  const bubble = el("div", "bubble");
  if (msg.role === "user") bubble.textContent = msg.content; // never HTML
  else renderAnswer(bubble, msg.content);
  const meta = el("div", "meta");
  const copy = el("button", "copy", t("copy"));
  copy.addEventListener("click", () => copyText(msg.content, copy));
  meta.append(copy);
  const last = index === conv.messages.length - 1;
  if (last && msg.role === "assistant") {
    const again = el("button", "regenerate", t("regenerate"));
    again.addEventListener("click", regenerate);
    meta.append(again);
  }
  if (msg.role === "user" && index >= conv.messages.length - 2) {
    const edit = el("button", "edit", t("edit"));
    edit.addEventListener("click", () => editLast(index));
    meta.append(edit);
  }
  const stats = el("span", "stats");
  if (msg.stats) stats.textContent = `${msg.stats.tokens} ${t("tokens")} · ${msg.stats.speed.toFixed(1)} tok/s`;
  if (msg.stopped) stats.textContent = `${stats.textContent} · ${t("stopped")}`.replace(/^ · /, "");
  if (msg.error) stats.textContent = `${t("streamError")}: ${msg.error}`;
  meta.append(stats);
  view.append(bubble, meta);
  return view;
}

// ---- tool calls in answers ---------------------------------------------------------------------
// An assistant answer: text parts as markdown (sanitized there), each tool call as a card.
export function renderAnswer(target, text, streaming = false) {
  const parts = splitToolCalls(streaming ? text.slice(0, text.length - heldBack(text)) : text);
  target.replaceChildren();
  for (const part of parts) {
    if (part.kind === "call") {
      target.append(callView(part, streaming && part.pending));
    } else {
      const box = el("div", "answer-text");
      renderMarkdown(box, part.text);
      target.append(box);
    }
  }
}

// Built from text nodes only: a call's name and arguments are model text and never become HTML.
function callView(call, pending) {
  const card = el("div", pending ? "tool-call pending" : "tool-call");
  const head = el("div", "tool-call-head");
  head.append(el("span", "tool-call-label", t(pending ? "toolCallPending" : "toolCall")));
  head.append(el("code", "tool-call-name", call.name || "…"));
  const args = typeof call.args === "string" ? call.args : JSON.stringify(call.args, null, 2);
  card.append(head, el("pre", "tool-call-args", args));
  return card;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  for (const id of ["new-chat", "clear"]) $(id).disabled = busy;
}

// ---- chatting ---------------------------------------------------------------------------------

async function ask(query) {
  const conv = current();
  const history = historyOf(conv.messages);
  if (conv.messages.length === 0 && (!conv.title || conv.title === t("untitled"))) conv.title = query.slice(0, 40);
  conv.messages.push({ role: "user", content: query });
  const answer = { role: "assistant", content: "" };
  conv.messages.push(answer);
  conv.updated = Date.now();
  persist();
  renderSidebar();
  renderMessages();
  showError("");

  const view = $("messages").lastElementChild;
  const bubble = view.querySelector(".bubble");
  view.classList.add("streaming");
  const s = state.settings;
  const body = { query, history, temperature: s.temperature, top_p: s.top_p, max_tokens: s.max_tokens };
  if (s.system.trim()) body.system = s.system;
  state.controller = new AbortController();
  setBusy(true);
  const started = performance.now();
  let firstAt = null;
  let pending = false;
  try {
    const final = await streamChat(body, {
      apiKey: s.api_key,
      signal: state.controller.signal,
      onDelta(frame) {
        firstAt ??= performance.now();
        answer.content = frame.response;
        if (!pending) { // render at most once per animation frame
          pending = true;
          requestAnimationFrame(() => {
            pending = false;
            renderAnswer(bubble, answer.content, true);
            $("messages").scrollTop = $("messages").scrollHeight;
          });
        }
      },
    });
    answer.content = final.response;
    if (final.finish_reason === "error") answer.error = final.error?.message || "error";
    if (final.usage) {
      const seconds = (performance.now() - (firstAt ?? started)) / 1000;
      answer.stats = { tokens: final.usage.completion_tokens, speed: final.usage.completion_tokens / Math.max(seconds, 1e-3) };
    }
  } catch (err) {
    if (err.name === "AbortError") {
      answer.stopped = true;
    } else {
      conv.messages.splice(conv.messages.indexOf(answer), 1); // keep the question, drop the empty answer
      showError(describe(err));
      if (err instanceof ApiError && err.status === 401) openSettings("set-api_key");
    }
  } finally {
    state.controller = null;
    setBusy(false);
    conv.updated = Date.now();
    persist();
    renderMessages();
  }
}

function describe(err) {
  if (!(err instanceof ApiError)) return `${t("failed")}: ${err.message}`;
  if (err.status === 0) return t("networkError");
  if (err.status === 401) return t("unauthorized");
  if (err.status === 429) return t("busy", { s: err.retryAfter || 1 });
  if (err.status === 503) return t("unavailable");
  return `${t("failed")} (${err.status}): ${err.message}`;
}

function send() {
  const input = $("input");
  const query = input.value.trim();
  if (!query || state.controller) return;
  input.value = "";
  autosize();
  ask(query);
}

function regenerate() {
  const conv = current();
  if (state.controller || conv.messages.length < 2) return;
  conv.messages.pop();
  const { content } = conv.messages.pop();
  ask(content);
}

function editLast(index) {
  const conv = current();
  if (state.controller) return;
  const { content } = conv.messages[index];
  conv.messages.splice(index);
  persist();
  renderMessages();
  $("input").value = content;
  autosize();
  $("input").focus();
}

// ---- conversations ----------------------------------------------------------------------------

function switchTo(id) {
  if (state.controller) state.controller.abort();
  state.currentId = id;
  persist();
  renderSidebar();
  renderMessages();
  $("sidebar").classList.remove("open");
}

function renameConversation(conv) {
  const name = prompt(t("renamePrompt"), conv.title);
  if (name === null) return;
  conv.title = name.trim() || t("untitled");
  persist();
  renderSidebar();
  renderMessages();
}

function deleteConversation(conv) {
  if (!confirm(t("deleteConfirm"))) return;
  if (conv.id === state.currentId && state.controller) state.controller.abort();
  state.conversations = state.conversations.filter((c) => c !== conv);
  if (conv.id === state.currentId) state.currentId = state.conversations[0]?.id ?? null;
  current();
  persist();
  renderSidebar();
  renderMessages();
}

function startNew() {
  const conv = newConversation(t("untitled"));
  state.conversations.unshift(conv);
  switchTo(conv.id);
  $("input").focus();
}

async function clearConversation() {
  const conv = current();
  conv.messages = [];
  conv.updated = Date.now();
  persist();
  renderMessages();
  try {
    await clearServerCache(state.settings.api_key); // the original's 清空历史 also freed GPU memory
  } catch {
    showError(t("networkError"));
  }
}

// ---- settings and theme -----------------------------------------------------------------------

const FIELDS = ["system", "temperature", "top_p", "max_tokens", "api_key"];

function fillSettings() {
  for (const key of FIELDS) {
    $(`set-${key}`).value = state.settings[key];
    const out = $(`out-${key}`);
    if (out) out.textContent = String(state.settings[key]);
  }
}

function readSettings() {
  const s = { ...state.settings };
  s.system = $("set-system").value;
  s.api_key = $("set-api_key").value.trim();
  s.temperature = Number($("set-temperature").value);
  s.top_p = Number($("set-top_p").value);
  const max = Math.round(Number($("set-max_tokens").value));
  s.max_tokens = Number.isFinite(max) && max >= 1 ? max : DEFAULT_SETTINGS.max_tokens;
  state.settings = s;
  saveSettings(s);
  fillSettings();
}

function openSettings(focusId) {
  fillSettings();
  $("settings").showModal();
  if (focusId) $(focusId).focus();
}

function applyTheme() {
  const theme = state.settings.theme;
  if (theme === "auto") delete document.documentElement.dataset.theme;
  else document.documentElement.dataset.theme = theme;
  const dark = theme === "dark" || (theme === "auto" && matchMedia("(prefers-color-scheme: dark)").matches);
  $("hl-light").media = dark ? "not all" : "all";
  $("hl-dark").media = dark ? "all" : "not all";
}

function cycleTheme() {
  const order = ["auto", "light", "dark"];
  state.settings = { ...state.settings, theme: order[(order.indexOf(state.settings.theme) + 1) % 3] };
  saveSettings(state.settings);
  applyTheme();
}

function autosize() {
  const input = $("input");
  input.style.height = "auto";
  input.style.height = `${input.scrollHeight}px`;
}

// ---- start ------------------------------------------------------------------------------------

function init() {
  applyI18n();
  applyTheme();
  current();
  persist();
  renderSidebar();
  renderMessages();
  $("composer").addEventListener("submit", (event) => { event.preventDefault(); send(); });
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) { event.preventDefault(); send(); }
  });
  $("input").addEventListener("input", autosize);
  $("stop").addEventListener("click", () => state.controller?.abort());
  $("new-chat").addEventListener("click", startNew);
  $("clear").addEventListener("click", clearConversation);
  $("open-settings").addEventListener("click", () => openSettings());
  $("toggle-theme").addEventListener("click", cycleTheme);
  $("toggle-sidebar").addEventListener("click", () => $("sidebar").classList.toggle("open"));
  // on a phone the open sidebar covers the menu button: a tap beside it closes it
  document.querySelector(".main").addEventListener("click", (event) => {
    if (event.target.id !== "toggle-sidebar") $("sidebar").classList.remove("open");
  });
  for (const key of FIELDS) $(`set-${key}`).addEventListener("change", readSettings);
  for (const key of ["temperature", "top_p"]) $(`set-${key}`).addEventListener("input", readSettings);
  $("reset-settings").addEventListener("click", () => {
    state.settings = { ...DEFAULT_SETTINGS, api_key: state.settings.api_key, theme: state.settings.theme };
    saveSettings(state.settings);
    fillSettings();
  });
  serverInfo()
    .then((info) => { $("model").textContent = info.model || ""; document.title = info.model || document.title; })
    .catch(() => showError(t("networkError")));
  $("input").focus();
}

init();
