// Interface strings in English and Chinese, chosen from the browser's language.
const STRINGS = {
  en: {
    newChat: "New chat", settings: "Settings", theme: "Theme", clear: "Clear", send: "Send", stop: "Stop",
    placeholder: "Ask anything (Enter to send, Shift+Enter for a new line)", system: "System prompt",
    temperature: "Temperature", topP: "Top p", maxTokens: "Max answer tokens", apiKey: "API key",
    reset: "Reset", close: "Close", copy: "Copy", copied: "Copied", regenerate: "Regenerate", edit: "Edit",
    rename: "Rename", delete: "Delete", untitled: "New chat", renamePrompt: "Conversation name",
    deleteConfirm: "Delete this conversation?", empty: "Start a conversation below.",
    stopped: "stopped", tokens: "tokens", networkError: "Network error: the server cannot be reached.",
    busy: "The server is busy; try again in {s} s.", unauthorized: "An API key is needed: enter it in Settings.",
    unavailable: "The server is not ready (loading or shutting down); try again shortly.",
    failed: "Request failed", streamError: "The answer broke off",
    toolCall: "Tool call", toolCallPending: "Calling tool…",
  },
  zh: {
    newChat: "新对话", settings: "设置", theme: "主题", clear: "清空", send: "发送", stop: "停止",
    placeholder: "输入问题（Enter 发送，Shift+Enter 换行）", system: "系统提示词",
    temperature: "温度", topP: "Top p", maxTokens: "最大回答长度（token）", apiKey: "API 密钥",
    reset: "恢复默认", close: "关闭", copy: "复制", copied: "已复制", regenerate: "重新生成", edit: "编辑",
    rename: "重命名", delete: "删除", untitled: "新对话", renamePrompt: "对话名称",
    deleteConfirm: "删除这个对话？", empty: "在下方输入开始对话。",
    stopped: "已停止", tokens: "tokens", networkError: "网络错误：无法连接服务器。",
    busy: "服务器繁忙，请 {s} 秒后重试。", unauthorized: "需要 API 密钥：请在设置中填写。",
    unavailable: "服务器尚未就绪（加载中或正在关闭），请稍后重试。",
    failed: "请求失败", streamError: "回答中断",
    toolCall: "工具调用", toolCallPending: "正在调用工具…",
  },
};

export const lang = (navigator.language || "en").toLowerCase().startsWith("zh") ? "zh" : "en";

export function t(key, vars = {}) {
  const text = STRINGS[lang][key] ?? STRINGS.en[key] ?? key;
  return text.replace(/\{(\w+)\}/g, (_, name) => String(vars[name] ?? ""));
}

export function applyI18n(root = document) {
  document.documentElement.lang = lang === "zh" ? "zh-CN" : "en";
  for (const el of root.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  for (const el of root.querySelectorAll("[data-i18n-placeholder]")) el.placeholder = t(el.dataset.i18nPlaceholder);
}
