// The ChatGLM web-stream API over fetch(): POST "stream" (relative, so a path prefix works), read SSE frames.

export class ApiError extends Error {
  constructor(status, message, retryAfter = null) {
    super(message);
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

function headers(apiKey) {
  const h = { "Content-Type": "application/json" };
  if (apiKey) h.Authorization = `Bearer ${apiKey}`;
  return h;
}

// Calls onDelta(frame) for each partial frame; resolves with the last frame (finished: true).
export async function streamChat(body, { apiKey, signal, onDelta }) {
  let response;
  try {
    response = await fetch("stream", { method: "POST", headers: headers(apiKey), body: JSON.stringify(body), signal });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, "network");
  }
  if (!response.ok) {
    let message = response.statusText;
    try { message = (await response.json()).error.message; } catch { /* not JSON */ }
    throw new ApiError(response.status, message, response.headers.get("Retry-After"));
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (!data) continue; // a ": ping" comment
      const frame = JSON.parse(data);
      if (frame.finished) return frame;
      onDelta(frame);
    }
  }
  throw new ApiError(0, "network");
}

export async function clearServerCache(apiKey) {
  const response = await fetch("clear", { method: "POST", headers: headers(apiKey) });
  return response.ok;
}

export async function serverInfo() {
  const response = await fetch("health");
  return response.json();
}
