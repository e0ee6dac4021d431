"""What an OpenAI-compatible upstream says, checked before any of it reaches a client: stream chunks parsed into
typed parts (`parse_chunk`: anything else is a `MalformedChunk` or the upstream's own `ErrorChunk`), its error texts
cleaned into one short line (`clean`, `error_text`, `refusal_message`) with this server's credentials blanked out
(`Secrets`)."""

from __future__ import annotations

import json
import math
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import aiohttp

from generation.events import TokenLogprob, TopLogprob

MESSAGE_LIMIT = 200  # characters of the upstream's own error text that reach a client
REFUSAL_BYTES = 65536  # the most of a refusal's body read for its message: an error page can be any size
MAX_COUNT = 2**53  # a token count past this is no count (and would overflow the metrics' float counters)

_SURROGATE = re.compile("[\ud800-\udfff]")
BLANK = "***"  # what a secret becomes


def _spellings(secret: str) -> set[str]:
    """The ways a secret can appear in what the upstream sends: as it is, and as JSON writes it (non-ASCII as
    `\\u` escapes or not, a `/` escaped as `\\/` or not: base64 tokens hold slashes), for the raw chunks the log
    quotes."""
    escaped = {json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1]}
    return {secret} | escaped | {e.replace("/", "\\/") for e in escaped}


@dataclass(frozen=True)
class Secrets:
    """The credentials this server sends the upstream. A server may quote them in an error (the key it refused, the
    header it got): every text that comes from the upstream passes `scrub` before a client or the log sees it."""

    words: tuple[str, ...] = field(default=(), repr=False)

    @classmethod
    def of(cls, *secrets: str | None) -> Secrets:
        spellings = {s for secret in secrets if secret for s in _spellings(secret)}
        # longest first: a secret that holds another (`Basic <token>`, <token>) is blanked whole
        return cls(tuple(sorted(spellings, key=lambda s: (-len(s), s))))

    def scrub(self, text: str) -> str:
        for word in self.words:
            text = text.replace(word, BLANK)
        return text

    def scrub_bytes(self, data: bytes) -> bytes:
        for word in self.words:
            # "replace": a key from argv may hold undecodable bytes (surrogates); it must not break an error path
            data = data.replace(word.encode("utf-8", "replace"), BLANK.encode())
        return data


NO_SECRETS = Secrets()


def clean(text: str, limit: int = MESSAGE_LIMIT, secrets: Secrets = NO_SECRETS) -> str:
    """Upstream text made fit for a client's error message or a log line: no secrets, one line, no control
    characters, whitespace collapsed, at most `limit` characters (an ellipsis where it was cut)."""
    kept = "".join(
        " " if c.isspace() else c for c in text if c.isspace() or unicodedata.category(c) not in ("Cc", "Cs")
    )
    # scrubbed once control characters are gone (one could split a secret) and before the cut (it could leave a
    # secret's first half)
    line = secrets.scrub(" ".join(kept.split()))
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"


def exception_text(exc: BaseException, secrets: Secrets = NO_SECRETS) -> str:
    """An exception as a short clean line (a timeout's text is empty: its name then)."""
    return clean(str(exc), secrets=secrets) or type(exc).__name__


def _unicode(text: str) -> str:
    """JSON may escape a lone surrogate (`\\ud800`), UTF-8 cannot encode one: the doors' writes would fail on it."""
    return _SURROGATE.sub("\ufffd", text)


def clean_text(text: str) -> str:
    """Text the upstream generated, as a client may get it: a lone surrogate JSON escaped becomes U+FFFD."""
    return _unicode(text)


class MalformedChunk(ValueError):
    """A `data:` line of the upstream's stream that is not a chat.completion.chunk; the message says why."""

    def __init__(self, message: str, data: bytes = b"") -> None:
        super().__init__(message)
        self.data = data  # the line's payload, for the log


class ErrorChunk(Exception):
    """The upstream reported an error mid-answer; the message is its own, cleaned."""


@dataclass(frozen=True)
class ChoiceChunk:
    """One choice's part of a chunk."""

    index: int
    text: str  # "" when the chunk brings none
    finish_reason: str | None
    logprobs: tuple[TokenLogprob, ...] = ()  # of the tokens that made `text`, when they were asked for
    calls: tuple[CallChunk, ...] = ()  # pieces of tool calls, after the text
    stop: str | None = None  # vLLM's stop_reason: the stop string that ended the answer


@dataclass(frozen=True)
class CallChunk:
    """One piece of a tool call as the upstream numbers it (`delta.tool_calls[]`, or the legacy
    `delta.function_call` as call 0): the first piece of a call names it, later ones add to its arguments. Its
    types are checked; whether the pieces make whole calls is the reader's to judge, across chunks."""

    index: int
    arguments: str  # "" when the piece brings none
    id: str | None = None  # None when the piece has none (or an empty one)
    name: str | None = None


@dataclass(frozen=True)
class Chunk:
    """One chat.completion.chunk, checked."""

    choices: tuple[ChoiceChunk, ...]
    usage: tuple[int, int, int | None] | None  # (prompt, completion, cached prompt) tokens, of all choices together


def _kind(value: Any) -> str:
    """A JSON value's type, in JSON's words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _is_finite(value: Any) -> TypeGuard[int | float]:
    """A JSON number a float holds: NaN and Infinity are no JSON (Python's reader takes them), 1e400 no float."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer past what a float holds
        return False


def _is_byte(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 256


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_COUNT


def error_text(body: Any, secrets: Secrets = NO_SECRETS) -> str | None:
    """The message of an error in the shapes OpenAI-compatible servers send it (OpenAI's and vLLM's
    `{"error": {"message": ...}}`, TGI's `{"error": "..."}`, older vLLM's `{"object": "error", "message": ...}`,
    FastAPI's `{"detail": "..."}`), cleaned; None when there is none."""
    if not isinstance(body, dict):
        return None
    error = body.get("error")
    if isinstance(error, dict):
        error = error.get("message")
    for text in (error, body.get("message"), body.get("detail")):
        if isinstance(text, str) and (line := clean(text, secrets=secrets)):
            return line
    return None


def parse_chunk(data: bytes, secrets: Secrets = NO_SECRETS) -> Chunk:
    """One `data:` payload of the upstream's stream. Raises ErrorChunk for an error the upstream reports in it (its
    message without the `secrets`), MalformedChunk for anything else that is not a chat.completion.chunk."""
    try:
        chunk = json.loads(data)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than Python's stack
        raise MalformedChunk("not JSON", data) from exc
    if not isinstance(chunk, dict):
        raise MalformedChunk(f"{_kind(chunk)}, not an object", data)
    if "error" in chunk or chunk.get("object") == "error":
        raise ErrorChunk(error_text(chunk, secrets) or "it gave no message")
    try:
        if not isinstance(choices := chunk.get("choices"), list):
            raise MalformedChunk("no choices" if "choices" not in chunk else f"choices is {_kind(choices)}")
        return Chunk(tuple(_choice(c) for c in choices), _usage(chunk.get("usage")))
    except MalformedChunk as exc:
        exc.data = data
        raise


def _choice(choice: Any) -> ChoiceChunk:
    if not isinstance(choice, dict):
        raise MalformedChunk(f"a choice is {_kind(choice)}, not an object")
    index = choice.get("index", 0)
    if not isinstance(index, int) or isinstance(index, bool):
        raise MalformedChunk(f"a choice's index is {_kind(index)}, not an integer")
    delta = choice.get("delta")
    if delta is None:  # the last chunk of some servers has `"delta": null`, or none
        delta = {}
    if not isinstance(delta, dict):
        raise MalformedChunk(f"a choice's delta is {_kind(delta)}, not an object")
    # a chat chunk's text is its delta's content, a text_completion chunk's its `text`
    text = delta.get("content") if "text" not in choice else choice["text"]
    if text is not None and not isinstance(text, str):
        raise MalformedChunk(f"a choice's text is {_kind(text)}, not a string")
    reason = choice.get("finish_reason")
    if reason is not None and not isinstance(reason, str):
        raise MalformedChunk(f"a choice's finish_reason is {_kind(reason)}, not a string")
    if reason == "function_call":  # the legacy name of the same end: the answer made a call
        reason = "tool_calls"
    text, reason = _unicode(text or ""), _unicode(reason) if reason else None
    stop = choice.get("stop_reason")  # a token id there (vLLM: a stop token) is no stop string
    stop = _unicode(stop) if isinstance(stop, str) and reason == "stop" else None
    return ChoiceChunk(index, text, reason, _logprobs(choice), _calls(delta), stop)


def _calls(delta: dict[str, Any]) -> tuple[CallChunk, ...]:
    """A delta's `tool_calls` (null or absent: none), and its legacy `function_call` as call 0."""
    entries = delta.get("tool_calls")
    if entries is None:
        entries = []
    if not isinstance(entries, list):
        raise MalformedChunk(f"a choice's tool_calls is {_kind(entries)}, not an array")
    calls = [_call(entry) for entry in entries]
    legacy = delta.get("function_call")
    if legacy is not None:
        calls.append(_function(legacy, 0, None, "a choice's function_call"))
    return tuple(calls)


def _call(entry: Any) -> CallChunk:
    """One `tool_calls` entry: its index (a call's number in the answer), id, type and function."""
    if not isinstance(entry, dict):
        raise MalformedChunk(f"a tool_calls entry is {_kind(entry)}, not an object")
    index = entry.get("index")
    if not isinstance(index, int) or not _is_count(index):
        raise MalformedChunk(f"a tool_calls entry's index is {_kind(index)}, not an integer of 0 or more")
    call_id, kind = entry.get("id"), entry.get("type")
    if call_id is not None and not isinstance(call_id, str):
        raise MalformedChunk(f"a tool_calls entry's id is {_kind(call_id)}, not a string")
    if kind is not None and kind != "function":
        raise MalformedChunk("a tool_calls entry's type is not function")
    function = entry.get("function")
    if function is None:  # a piece that brings nothing (its call's number only)
        function = {}
    return _function(function, index, call_id, "a tool_calls entry's function")


def _function(function: Any, index: int, call_id: str | None, what: str) -> CallChunk:
    """A call's `function` piece: its name and a fragment of its arguments, both strings or null."""
    if not isinstance(function, dict):
        raise MalformedChunk(f"{what} is {_kind(function)}, not an object")
    name, arguments = function.get("name"), function.get("arguments")
    if name is not None and not isinstance(name, str):
        raise MalformedChunk(f"{what}'s name is {_kind(name)}, not a string")
    if arguments is not None and not isinstance(arguments, str):
        raise MalformedChunk(f"{what}'s arguments are {_kind(arguments)}, not a string")
    return CallChunk(
        index, _unicode(arguments or ""), _unicode(call_id) if call_id else None, _unicode(name) if name else None
    )


def _logprobs(choice: dict[str, Any]) -> tuple[TokenLogprob, ...]:
    """A choice's `logprobs.content` (null or absent: none)."""
    logprobs = choice.get("logprobs")
    if logprobs is None:
        return ()
    if not isinstance(logprobs, dict):
        raise MalformedChunk(f"a choice's logprobs is {_kind(logprobs)}, not an object")
    if "tokens" in logprobs:
        return _legacy_logprobs(logprobs)
    content = logprobs.get("content")
    if content is None:
        return ()
    if not isinstance(content, list):
        raise MalformedChunk(f"a choice's logprobs.content is {_kind(content)}, not an array")
    return tuple(_token_logprob(entry) for entry in content)


def _legacy_logprobs(logprobs: dict[str, Any]) -> tuple[TokenLogprob, ...]:
    """A text_completion choice's logprobs: parallel arrays of tokens, their logprobs and, per token, an object of
    the likeliest tokens (the legacy API sends no bytes: each token's own UTF-8 stands for them)."""
    tokens, values, tops = logprobs.get("tokens"), logprobs.get("token_logprobs"), logprobs.get("top_logprobs")
    if tops is None and isinstance(tokens, list):
        tops = [None] * len(tokens)
    if not (isinstance(tokens, list) and isinstance(values, list) and isinstance(tops, list)):
        raise MalformedChunk("a choice's legacy logprobs are not arrays")
    if not len(tokens) == len(values) == len(tops):
        raise MalformedChunk("a choice's legacy logprobs arrays differ in length")
    out: list[TokenLogprob] = []
    for token, value, top in zip(tokens, values, tops, strict=True):
        if not isinstance(token, str) or not _is_finite(value):
            raise MalformedChunk("a legacy logprobs entry is not a token and a finite number")
        if top is None:
            top = {}
        if not isinstance(top, dict) or not all(_is_finite(v) for v in top.values()):
            raise MalformedChunk("a legacy top_logprobs entry is not an object of finite numbers")
        alternatives = tuple(
            TopLogprob(text, float(v), raw)
            for (text, raw), v in zip(map(_legacy_token, top), top.values(), strict=True)
        )
        text, raw = _legacy_token(token)
        out.append(TokenLogprob(text, float(value), raw, alternatives))
    return tuple(out)


_BYTES = re.compile(r"bytes:((?:\\x[0-9a-fA-F]{2})+)")


def _legacy_token(token: str) -> tuple[str, tuple[int, ...]]:
    """A legacy token and its bytes: OpenAI (and this server) write a token that is no whole UTF-8 on its own as
    `bytes:\\xNN...`; any other is its own UTF-8."""
    if match := _BYTES.fullmatch(token):
        return token, tuple(bytes.fromhex(match.group(1).replace("\\x", "")))
    text = _unicode(token)
    return text, tuple(text.encode())


def _token_logprob(entry: Any) -> TokenLogprob:
    token, logprob, raw = _logprob_fields(entry, "a logprobs entry")
    top = entry.get("top_logprobs")
    if top is None:
        top = []
    if not isinstance(top, list):
        raise MalformedChunk(f"a logprobs entry's top_logprobs is {_kind(top)}, not an array")
    alternatives = tuple(TopLogprob(*_logprob_fields(t, "a top_logprobs entry")) for t in top)
    return TokenLogprob(token, logprob, raw, alternatives)


def _logprob_fields(entry: Any, what: str) -> tuple[str, float, tuple[int, ...]]:
    """An entry's token, its logprob (a finite number: JSON has no -Infinity, vLLM sends -9999.0) and its bytes;
    where those are null (OpenAI: a token without a byte form), the token's own UTF-8, as vLLM fills them in."""
    if not isinstance(entry, dict):
        raise MalformedChunk(f"{what} is {_kind(entry)}, not an object")
    token, logprob, raw = entry.get("token"), entry.get("logprob"), entry.get("bytes")
    if not isinstance(token, str):
        raise MalformedChunk(f"{what}'s token is {_kind(token)}, not a string")
    if not _is_finite(logprob):
        raise MalformedChunk(f"{what}'s logprob is not a finite number")
    token = _unicode(token)
    if raw is None:
        return token, float(logprob), tuple(token.encode())
    if not (isinstance(raw, list) and all(map(_is_byte, raw))):
        raise MalformedChunk(f"{what}'s bytes are not an array of bytes")
    return token, float(logprob), tuple(raw)


def _usage(usage: Any) -> tuple[int, int, int | None] | None:
    if usage is None:  # vLLM sends `"usage": null` on every chunk but the last
        return None
    if not isinstance(usage, dict):
        raise MalformedChunk(f"usage is {_kind(usage)}, not an object")
    prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    if not (_is_count(prompt) and _is_count(completion)):
        raise MalformedChunk("usage has token counts that are not counts")
    # the prompt tokens its own prefix cache served (vLLM, llama.cpp); None where it does not say
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return prompt, completion, cached if isinstance(cached, int) and _is_count(cached) else None


def model_names(body: Any) -> tuple[str, ...]:
    """The ids in a `GET /models` answer; ValueError when it is no model list."""
    data = body.get("data", []) if isinstance(body, dict) else None
    if not isinstance(data, list):
        raise ValueError("GET /models answered no model list")
    return tuple(str(m["id"]) for m in data if isinstance(m, dict) and "id" in m)


async def read_head(content: aiohttp.StreamReader, limit: int) -> bytes:
    """Up to `limit` bytes of a body (read() may return less than it has: it returns what has arrived)."""
    parts: list[bytes] = []
    size = 0
    while size < limit and (part := await content.read(limit - size)):
        parts.append(part)
        size += len(part)
    return b"".join(parts)


async def refusal_message(response: aiohttp.ClientResponse, secrets: Secrets) -> tuple[str, str | None]:
    """What an upstream's refusal says, cleaned: its JSON error's message, else its text; never an HTML page (a
    proxy's error page tells the client nothing and can show the upstream's internals), nor the `secrets` (a server
    may quote the key it refused). And the field its JSON error blames (OpenAI's `param`), when it names one."""
    fallback = clean(response.reason or "", secrets=secrets) or "no reason given"
    try:
        text = (await read_head(response.content, REFUSAL_BYTES)).decode("utf-8", "replace")
    except (aiohttp.ClientError, TimeoutError):
        return fallback, None
    try:
        body = json.loads(text)
    except (ValueError, RecursionError):
        body = None
    if body is not None:
        return error_text(body, secrets) or fallback, error_param(body, secrets)
    if "html" in response.content_type or text.lstrip().startswith("<"):
        return fallback, None
    return clean(text, secrets=secrets) or fallback, None


def error_param(body: Any, secrets: Secrets = NO_SECRETS) -> str | None:
    """The request field an OpenAI-shaped error blames (`error.param`), cleaned and short; None when it names none."""
    error = body.get("error") if isinstance(body, dict) else None
    param = error.get("param") if isinstance(error, dict) else None
    return (clean(param, 100, secrets) or None) if isinstance(param, str) else None
