"""Request bodies of both APIs, parsed once into typed objects; every error names its field."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from text import Message

MAX_STOPS = 4
MAX_CHOICES = 8


class InvalidField(Exception):
    """A request body that breaks the protocol; `param` names the offending field."""

    def __init__(self, param: str | None, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.message = message
        self.code = code


@dataclass(frozen=True)
class Sampling:
    """Sampling fields as sent; None means the route's default."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int | None = None
    seed: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class ChatRequest:
    """A ChatGLM web-stream request (`/chat`, `/stream`)."""

    query: str
    history: tuple[tuple[str, str], ...]
    system: str | None
    max_length: int | None
    sampling: Sampling


@dataclass(frozen=True)
class CompletionRequest:
    """An OpenAI `/v1/chat/completions` request."""

    model: str | None
    messages: tuple[Message, ...]
    sampling: Sampling
    n: int
    stream: bool
    include_usage: bool


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, a 5000-digit number, nesting too deep
        raise InvalidField(None, f"body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise InvalidField(None, "body must be a JSON object")
    broken = _unpaired_surrogate(body)
    if broken is not None:
        raise InvalidField(broken, f"'{broken}' holds an unpaired UTF-16 surrogate, which is not text")
    return body


def _unpaired_surrogate(body: dict[str, Any]) -> str | None:
    """The path of the first string with a lone surrogate (JSON allows "\\ud800"; the tokenizer does not)."""
    todo: list[tuple[str, Any]] = [("", body)]
    while todo:  # not recursive: the body may nest as deep as the JSON parser allows
        path, value = todo.pop()
        if isinstance(value, str):
            try:
                value.encode()
            except UnicodeEncodeError:
                return path
        elif isinstance(value, dict):
            todo += [(f"{path}.{k}" if path else str(k), v) for k, v in value.items()]
            todo += [(path or "body", k) for k in value]
        elif isinstance(value, list):
            todo += [(f"{path}[{i}]", v) for i, v in enumerate(value)]
    return None


def _number(body: dict[str, Any], name: str, lo: float, hi: float, *, lo_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    # Python's json reads NaN and Infinity; an int may be too large for a float, which is fine: it is out of range
    finite = isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))
    if isinstance(value, bool) or not finite:
        raise InvalidField(name, f"'{name}' must be a finite number")
    if value < lo or value > hi or (lo_open and value == lo):
        low = f"greater than {lo:g}" if lo_open else f"at least {lo:g}"
        raise InvalidField(name, f"'{name}' must be {low} and at most {hi:g}, got {value}")
    return float(value)


def _integer(body: dict[str, Any], name: str, lo: int, hi: int = 2**63 - 1) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidField(name, f"'{name}' must be an integer")
    if value < lo or value > hi:
        raise InvalidField(name, f"'{name}' must be between {lo} and {hi}, got {value}")
    return value


def _boolean(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidField(name, f"'{name}' must be a boolean")
    return value


def _string(body: dict[str, Any], name: str, *, required: bool = False) -> str | None:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        need = "is required and must" if required else "must"
        raise InvalidField(name, f"'{name}' {need} be a string")
    return value


def _sampling(body: dict[str, Any], max_tokens: int | None) -> Sampling:
    """The sampling fields both APIs share."""
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and len(stop) <= MAX_STOPS and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise InvalidField("stop", f"'stop' must be a string or a list of at most {MAX_STOPS} strings")
    top_k = _integer(body, "top_k", -1, 1_000_000)
    return Sampling(
        temperature=_number(body, "temperature", 0.0, 2.0),
        top_p=_number(body, "top_p", 0.0, 1.0),
        top_k=None if top_k is None else max(top_k, 0),  # 0 and -1 (as in vLLM) mean no cut
        repetition_penalty=_number(body, "repetition_penalty", 0.0, 10.0, lo_open=True),
        presence_penalty=_number(body, "presence_penalty", -2.0, 2.0) or 0.0,
        frequency_penalty=_number(body, "frequency_penalty", -2.0, 2.0) or 0.0,
        max_tokens=max_tokens,
        seed=_integer(body, "seed", -(2**63), 2**63 - 1),
        min_tokens=_integer(body, "min_tokens", 0) or 0,
        ignore_eos=_boolean(body, "ignore_eos"),
        stop=tuple(s for s in stops if s),
    )


def parse_chat(body: dict[str, Any]) -> ChatRequest:
    """Validate a ChatGLM `/chat` or `/stream` body."""
    query = _string(body, "query", required=True)
    if not query:
        raise InvalidField("query", "'query' must not be empty")
    raw_history = body.get("history")
    if raw_history is None:
        raw_history = []
    if not isinstance(raw_history, list):
        raise InvalidField("history", "'history' must be an array of [user, assistant] string pairs")
    history: list[tuple[str, str]] = []
    for i, pair in enumerate(raw_history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            raise InvalidField("history", f"'history[{i}]' must be a [user, assistant] pair of strings")
        history.append((pair[0], pair[1]))
    return ChatRequest(
        query=query,
        history=tuple(history),
        system=_string(body, "system"),
        max_length=_integer(body, "max_length", 1),
        sampling=_sampling(body, _integer(body, "max_tokens", 1)),
    )


def _content(message: dict[str, Any], i: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise InvalidField(f"messages[{i}].content", "only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise InvalidField(f"messages[{i}].content", "content must be a string or a list of text parts")


def parse_completion(body: dict[str, Any]) -> CompletionRequest:
    """Validate an OpenAI chat completions body."""
    model = _string(body, "model")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise InvalidField("messages", "'messages' must be a non-empty array")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise InvalidField(f"messages[{i}]", "each message must be an object")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise InvalidField(f"messages[{i}].role", "role must be system, user or assistant")
        messages.append(Message("system" if role == "developer" else role, _content(m, i)))
    max_tokens = _integer(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidField("stream_options", "'stream_options' must be an object")
    stream = _boolean(body, "stream")
    return CompletionRequest(
        model=model,
        messages=tuple(messages),
        sampling=_sampling(body, max_tokens),
        n=_integer(body, "n", 1, MAX_CHOICES) or 1,
        stream=stream,
        include_usage=bool(options and _boolean(options, "include_usage")),
    )
