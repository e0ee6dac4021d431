// Markdown → sanitized DOM. Model text only ever reaches the page through DOMPurify.
import { marked } from "./vendor/marked.esm.js";
import DOMPurify from "./vendor/purify.es.js";
import hljs from "./vendor/highlight.min.js";
import { t } from "./i18n.js";

marked.setOptions({ gfm: true, breaks: true });

export function renderMarkdown(target, text) {
  target.innerHTML = DOMPurify.sanitize(marked.parse(text), { USE_PROFILES: { html: true } });
  for (const link of target.querySelectorAll("a[href]")) {
    link.target = "_blank";
    link.rel = "noopener noreferrer";
  }
  for (const code of target.querySelectorAll("pre > code")) {
    hljs.highlightElement(code);
    const button = document.createElement("button");
    button.type = "button";
    button.className = "copy-code";
    button.textContent = t("copy");
    button.addEventListener("click", () => copyText(code.textContent, button));
    code.parentElement.append(button);
  }
}

export async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    // clipboard API needs a secure context; fall back to a hidden textarea on plain http intranets
    const area = document.createElement("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  if (button) {
    const label = button.textContent;
    button.textContent = t("copied");
    setTimeout(() => { button.textContent = label; }, 1200);
  }
}
