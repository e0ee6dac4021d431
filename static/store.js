// Conversations and settings, kept in localStorage so a reload loses nothing.
const CONVERSATIONS = "chat.conversations.v1";
const CURRENT = "chat.current.v1";
const SETTINGS = "chat.settings.v1";

export const DEFAULT_SETTINGS = Object.freeze({
  system: "", temperature: 0.7, top_p: 0.9, max_tokens: 1024, api_key: "", theme: "auto",
});

function read(key, fallback) {
  try {
    const raw = localStorage.getItem(key);
    return raw === null ? fallback : JSON.parse(raw);
  } catch {
    return fallback;
  }
}

export function loadSettings() {
  return { ...DEFAULT_SETTINGS, ...read(SETTINGS, {}) };
}

export function saveSettings(settings) {
  localStorage.setItem(SETTINGS, JSON.stringify(settings));
}

export function loadConversations() {
  const list = read(CONVERSATIONS, []);
  return Array.isArray(list) ? list : [];
}

export function saveConversations(list, currentId) {
  localStorage.setItem(CONVERSATIONS, JSON.stringify(list));
  localStorage.setItem(CURRENT, JSON.stringify(currentId));
}

export function loadCurrentId() {
  return read(CURRENT, null);
}

export function newConversation(title) {
  return { id: crypto.randomUUID ? crypto.randomUUID() : String(Date.now() + Math.random()), title, messages: [], updated: Date.now() };
}

// [[user, assistant], ...] from complete rounds, as the ChatGLM protocol wants it.
export function historyOf(messages) {
  const history = [];
  for (let i = 0; i + 1 < messages.length; i++) {
    if (messages[i].role === "user" && messages[i + 1].role === "assistant" && !messages[i + 1].error) {
      history.push([messages[i].content, messages[i + 1].content]);
      i++;
    }
  }
  return history;
}
