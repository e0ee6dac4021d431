// Tool calls in an answer: a model that calls a tool writes the call into its answer as markup (Hermes/Qwen
// `<tool_call>`, ChatGLM3's fenced `tool_call(...)`, Mistral's `[TOOL_CALLS]`); these pure functions find the calls
// so that the page can show each as a card (app.js `renderAnswer`), never as raw markup.

const HERMES_OPEN = "<tool_call>";
const HERMES_CLOSE = "</tool_call>";
const MISTRAL_MARKER = "[TOOL_CALLS]";
// ChatGLM3: a bare name on its own line, then a ```python fence holding `tool_call(key=literal, ...)`;
// SentencePiece may put a space before the name and the fence
const GLM_CALL = /^ ?([A-Za-z_][\w-]*)[ \t]*\n ?```python[ \t]*\ntool_call\(([\s\S]*?)\)[ \t]*\n[ \t]*```/gm;
const GLM_OPEN = /^ ?([A-Za-z_][\w-]*)[ \t]*\n ?```python[ \t]*\ntool_call\(([\s\S]*)$/gm;
const GLM_HEAD = "```python\ntool_call(";

// The answer as [{kind: "text", text} | {kind: "call", name, args, pending}]; args is the parsed arguments, or
// their source text where they do not parse; pending: the call's closing markup has not been written (yet).
export function splitToolCalls(text) {
  const parts = [];
  let pos = 0;
  for (;;) {
    const found = [hermesAt(text, pos), glmAt(text, pos), mistralAt(text, pos)]
      .filter(Boolean)
      .sort((a, b) => a.start - b.start)[0];
    if (!found) break;
    pushText(parts, text.slice(pos, found.start));
    parts.push(...found.calls);
    pos = found.end;
  }
  pushText(parts, text.slice(pos));
  return parts;
}

function pushText(parts, text) {
  if (text.trim()) parts.push({ kind: "text", text }); // the whitespace between calls is no paragraph
}

function hermesAt(text, from) {
  const open = text.indexOf(HERMES_OPEN, from);
  if (open < 0) return null;
  const start = open + HERMES_OPEN.length;
  const close = text.indexOf(HERMES_CLOSE, start);
  if (close >= 0) return { start: open, end: close + HERMES_CLOSE.length, calls: [jsonCall(text.slice(start, close))] };
  const body = text.slice(start, text.length - partialMarker(text, HERMES_CLOSE));
  return { start: open, end: text.length, calls: [{ ...jsonCall(body), pending: true }] };
}

function mistralAt(text, from) {
  const at = text.indexOf(MISTRAL_MARKER, from);
  if (at < 0) return null;
  let start = at + MISTRAL_MARKER.length;
  // newer Mistral tokenizers write `[TOOL_CALLS]name[ARGS]{...}`, one marker per call
  const named = /^\s*([A-Za-z_][\w-]*)\[ARGS\]/.exec(text.slice(start));
  if (named) start += named[0].length;
  const cuts = [];
  const end = jsonEnd(text, start, cuts);
  if (named) {
    const source = text.slice(start, end < 0 ? text.length : end);
    const call = { kind: "call", name: named[1], args: parseJson(source) ?? source.trim(), pending: end < 0 };
    return { start: at, end: end < 0 ? text.length : end, calls: [call] };
  }
  if (end >= 0) {
    const calls = parseJson(text.slice(start, end)) ?? text.slice(start, end);
    return { start: at, end, calls: (Array.isArray(calls) ? calls : [calls]).map(callOf) };
  }
  // still being written: the list's finished calls as they are, the one being written as pending
  const cut = /^\s*\[/.test(text.slice(start)) && cuts.length ? cuts.at(-1) : start;
  const done = cut > start ? parseJson(`${text.slice(start, cut)}]`) ?? [] : [];
  const rest = text.slice(cut).replace(/^[\s,[]+/, "");
  return { start: at, end: text.length, calls: [...done.map(callOf), { ...jsonCall(rest), pending: true }] };
}

function glmAt(text, from) {
  GLM_CALL.lastIndex = from;
  GLM_OPEN.lastIndex = from;
  const done = GLM_CALL.exec(text);
  const open = GLM_OPEN.exec(text);
  if (done && (!open || done.index <= open.index)) {
    const call = { kind: "call", name: done[1], args: pythonKwargs(done[2]) ?? done[2].trim(), pending: false };
    return { start: done.index, end: done.index + done[0].length, calls: [call] };
  }
  if (!open) return null;
  const args = open[2].replace(/\)?\s*`*$/, ""); // less the start of the closing `)\n```` already written
  return { start: open.index, end: text.length, calls: [{ kind: "call", name: open[1], args, pending: true }] };
}

// One call written as JSON ({"name": ..., "arguments": {...}}); what does not parse is shown as its source.
function jsonCall(body) {
  const call = parseJson(body.trim());
  return call === undefined ? partialCall(body) : callOf(call);
}

function callOf(call) {
  if (!call || typeof call !== "object" || typeof call.name !== "string") {
    return { kind: "call", name: "", args: typeof call === "string" ? call : call ?? "", pending: false };
  }
  let args = call.arguments ?? call.parameters ?? {};
  if (typeof args === "string") args = parseJson(args) ?? args; // OpenAI style: arguments as JSON text
  return { kind: "call", name: call.name, args, pending: false };
}

// What can be read of a call's JSON while it is being written: its name, and its arguments as text so far.
function partialCall(body) {
  const name = /"name"\s*:\s*"((?:[^"\\]|\\.)*)/.exec(body);
  const args = /"(?:arguments|parameters)"\s*:\s*([\s\S]*)$/.exec(body);
  const rest = args ? args[1] : name ? "" : body;
  return { kind: "call", name: name ? parseJson(`"${name[1]}"`) ?? name[1] : "", args: rest.trim(), pending: false };
}

function parseJson(text) {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

// Where the JSON list or object starting at `start` ends (the index after it), or -1 while it is unfinished;
// `cuts` gets the commas between a list's items, to tell its finished calls from the one being written.
function jsonEnd(text, start, cuts) {
  let depth = 0;
  let inString = false;
  for (let i = start; i < text.length; i++) {
    const c = text[i];
    if (inString) {
      if (c === "\\") i++;
      else if (c === '"') inString = false;
    } else if (c === '"') inString = true;
    else if (c === "[" || c === "{") depth++;
    else if (c === "]" || c === "}") {
      if (--depth === 0) return i + 1;
    } else if (c === "," && depth === 1) cuts.push(i);
    else if (depth === 0 && c.trim()) return -1; // not JSON: the rest is read as the call's text
  }
  return -1;
}

// `city='Paris', days=3` -> {city: "Paris", days: 3}; null unless every item is `key=literal`. The text is
// read, never evaluated: Python's literals are rewritten as JSON and parsed.
function pythonKwargs(source) {
  const args = {};
  for (const item of splitTopLevel(source)) {
    const pair = /^\s*([A-Za-z_]\w*)\s*=([\s\S]*)$/.exec(item);
    if (!pair) return null;
    const value = parseJson(pythonToJson(pair[2].trim()));
    if (value === undefined) return null;
    args[pair[1]] = value;
  }
  return args;
}

// The items of an argument list: its commas outside strings and brackets.
function splitTopLevel(source) {
  const items = [];
  let depth = 0;
  let quote = null;
  let from = 0;
  for (let i = 0; i < source.length; i++) {
    const c = source[i];
    if (quote) {
      if (c === "\\") i++;
      else if (c === quote) quote = null;
    } else if (c === "'" || c === '"') quote = c;
    else if ("([{".includes(c)) depth++;
    else if (")]}".includes(c)) depth--;
    else if (c === "," && depth === 0) {
      items.push(source.slice(from, i));
      from = i + 1;
    }
  }
  const last = source.slice(from);
  if (last.trim()) items.push(last);
  return items;
}

const PY_ESCAPES = { n: "\n", t: "\t", r: "\r", "\\": "\\", "'": "'", '"': '"' };

// A Python literal as JSON text: strings re-quoted, True/False/None (and JSON's own words) kept as JSON's, tuples
// as lists. Whatever else it holds (a name, a call) makes JSON.parse fail, as it should.
function pythonToJson(source) {
  let out = "";
  for (let i = 0; i < source.length; i++) {
    const c = source[i];
    if (c === "'" || c === '"') {
      let value = "";
      for (i++; i < source.length && source[i] !== c; i++) {
        if (source[i] !== "\\") value += source[i];
        else value += PY_ESCAPES[source[++i]] ?? `\\${source[i]}`; // Python keeps unknown escapes as written
      }
      out += JSON.stringify(value);
    } else if (/[A-Za-z_]/.test(c)) {
      const word = /^\w+/.exec(source.slice(i))[0];
      out += { True: "true", False: "false", None: "null" }[word] ?? word;
      i += word.length - 1;
    } else {
      out += c === "(" ? "[" : c === ")" ? "]" : c;
    }
  }
  return out;
}

// Length of the end of `text` that could still grow into `marker` (held back while streaming).
function partialMarker(text, marker) {
  for (let n = Math.min(marker.length - 1, text.length); n > 0; n--) {
    if (text.endsWith(marker.slice(0, n))) return n;
  }
  return 0;
}

// While streaming, the end of the answer that may be the start of a call's markup is not shown yet: it would
// flash as raw text before turning into a card.
export function heldBack(text) {
  const marker = Math.max(partialMarker(text, HERMES_OPEN), partialMarker(text, MISTRAL_MARKER));
  const glm = /(?:^|\n) ?[A-Za-z_][\w-]*[ \t]*\n ?(`[`\w\n]*)$/.exec(text);
  const fence = glm && GLM_HEAD.startsWith(glm[1]) ? glm[0].length : 0;
  return Math.max(marker, fence);
}
