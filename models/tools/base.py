"""What every tool-call format shares: the tool and call types, the pieces an answer stream yields, and the
answer streams of the two shapes a format takes (role-token segments, text markers)."""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

_ALNUM = string.ascii_letters + string.digits


@dataclass(frozen=True)
class Tool:
    """A function the model may call: OpenAI's `tools[].function`. `spec`: that object as the client sent it, as
    JSON text (its key order kept: the prompts of ChatGLM3 and GLM-4 show it); `parameters`: its JSON Schema as JSON
    text (None: any arguments); `strict`: the arguments are held to it when a call is forced."""

    name: str
    spec: str
    parameters: str | None = None
    strict: bool = False

    def function(self) -> dict[str, Any]:
        """The function object as the client sent it."""
        return dict(json.loads(self.spec))

    def schema(self) -> dict[str, Any]:
        """What a forced call's arguments are held to: the tool's schema when strict, else any object. Raises
        ValueError for a strict schema of something else than an object (arguments are an object)."""
        if self.strict and self.parameters is not None:
            schema = dict(json.loads(self.parameters))
            if schema.get("type", "object") != "object":
                raise ValueError(f"the parameters of {self.name} must be an object schema")
            return schema
        return {"type": "object"}


@dataclass(frozen=True)
class ToolCall:
    """A call in a conversation's history or an answer: `arguments` is JSON text, as OpenAI carries it."""

    id: str
    name: str
    arguments: str

    def argument_object(self) -> Any:
        """The arguments as JSON values; their text as it is when it is not JSON."""
        try:
            return loads(self.arguments)
        except ValueError:
            return self.arguments


@dataclass(frozen=True)
class CallDelta:
    """One streamed piece of a call: the first of a call carries its id and name, the rest `arguments` text."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None


@dataclass
class Pieces:
    """What an answer stream gives back for some text: text for the client, then pieces of calls."""

    text: str = ""
    calls: list[CallDelta] = field(default_factory=list)

    def add(self, other: Pieces) -> Pieces:
        """Joined: the texts, then the calls (a client sees a step's text before its calls)."""
        self.text += other.text
        self.calls += other.calls
        return self


def call_id() -> str:
    """OpenAI's shape: `call_` and 24 letters or digits."""
    return "call_" + "".join(secrets.choice(_ALNUM) for _ in range(24))


def _not_json(word: str) -> Any:
    raise ValueError(f"{word} is not JSON")


def loads(text: str) -> Any:
    """JSON text as values; Python's own words NaN and Infinity, which JSON has not, are refused, and so is text
    nested deeper than the parser goes (a ValueError either way)."""
    try:
        return json.loads(text, parse_constant=_not_json)
    except RecursionError as exc:
        raise ValueError("JSON nested too deeply") from exc


def json_arguments(value: Any) -> str | None:
    """A call's arguments as OpenAI's JSON text: an object only, and JSON only (no NaN or Infinity)."""
    if not isinstance(value, dict):
        return None
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, RecursionError):  # a value JSON cannot hold (a Python set, bytes, 1e999)
        return None


def call_of(value: Any, keys: tuple[str, ...]) -> tuple[str, str] | None:
    """A call written as one JSON object: its `name` and its arguments under the first of `keys` it has (none:
    no arguments); None when it is not one."""
    if not isinstance(value, dict) or not isinstance(name := value.get("name"), str):
        return None
    arguments = json_arguments(next((value[k] for k in keys if k in value), {}))
    return None if arguments is None else (name, arguments)


class CallStream(Protocol):
    """One answer's text as it arrives, split into text for the client and the calls in it. Text that could still
    turn out to be call markup is held back; a call goes out only once it is whole and parsed, so what reaches a
    client never holds markup and a malformed call is text. `boundary`: the token that starts a new segment of the
    answer (a family's role token), or None."""

    boundary: int | None

    def push(self, text: str) -> Pieces: ...

    def segment(self) -> Pieces:
        """The boundary token came: the segment so far is whole."""

    def flush(self, cut: bool = False) -> Pieces:
        """The answer ended; `cut`: by the length limit, inside whatever it was writing (an unfinished call's
        markup is then dropped, not shown)."""

    @property
    def called(self) -> bool: ...


class Calls:
    """Numbers the calls of one answer and names each with a new id (`ids`: the format's shape of one)."""

    def __init__(self, ids: Callable[[], str] = call_id) -> None:
        self.count = 0
        self.ids = ids

    def emit(self, name: str, arguments: str) -> list[CallDelta]:
        index, self.count = self.count, self.count + 1
        return [CallDelta(index, "", self.ids(), name), CallDelta(index, arguments)]

    def emit_all(self, calls: list[tuple[str, str]] | None, names: frozenset[str]) -> list[CallDelta] | None:
        """The pieces of the calls a markup parsed to; None when it parsed to none or names a tool not offered
        (the markup is then the model's text)."""
        if not calls or any(name not in names for name, _ in calls):
            return None
        return [piece for name, arguments in calls for piece in self.emit(name, arguments)]


# Reads a call's body: (name, body) -> the arguments as JSON text, or None when it is not a call.
BodyParser = Callable[[str, str], "str | None"]


class SegmentCalls:
    """ChatGLM3 and GLM-4: the answer is segments, each after an `<|assistant|>` token; a segment's first line is
    its metadata: empty for text, a tool's name for a call whose body follows. Text streams at once; a line that
    could still be a tool's name waits for its newline; a call waits for its segment's end."""

    def __init__(self, names: Sequence[str], parse: BodyParser, boundary: int) -> None:
        self.names = frozenset(names)
        self.parse = parse
        self.boundary: int | None = boundary
        self._calls = Calls()
        self._head = ""  # the segment's first line so far
        self._mode = "head"  # head | text | call
        self._name = ""
        self._body = ""
        self._texts = 0  # text segments begun: a later one is set apart from the one before by a newline

    @property
    def called(self) -> bool:
        return self._calls.count > 0

    def push(self, text: str) -> Pieces:
        if self._mode == "text":
            return Pieces(text)
        if self._mode == "call":
            self._body += text
            return Pieces()
        self._head += text
        line, newline, rest = self._head.partition("\n")
        name = line.strip()
        if newline and name in self.names:
            self._mode, self._name, self._body = "call", name, rest
            return Pieces()
        if newline or not any(n.startswith(name) for n in self.names):
            return self._text(self._head)
        return Pieces()

    def _text(self, text: str) -> Pieces:
        self._mode = "text"
        self._texts += 1
        return Pieces(("\n" if self._texts > 1 else "") + text)

    def segment(self) -> Pieces:
        out = self._end()
        self._head, self._mode, self._name, self._body = "", "head", "", ""
        return out

    def flush(self, cut: bool = False) -> Pieces:
        return self._end(cut)

    def _end(self, cut: bool = False) -> Pieces:
        if self._mode == "head":
            # still waiting: the line could be a tool's name; cut there by the length limit, it was on the way to a
            # call (a forced one always is), so the half name is not shown
            return self._text(self._head) if self._head.strip() and not cut else Pieces()
        if self._mode != "call":
            return Pieces()
        arguments = self.parse(self._name, self._body)
        if arguments is None and cut:  # a call the length limit cut short: markup, and no call
            return Pieces()
        if arguments is None:  # not a call after all: the segment is text, as the official parsers have it
            return self._text(f"{self._name}\n{self._body}")
        return Pieces(calls=self._calls.emit(self._name, arguments))


# Reads the markup of one call (what stands between the markers) -> [(name, arguments JSON text)], or None.
MarkupParser = Callable[[str], "list[tuple[str, str]] | None"]


class MarkerCalls:
    """Formats whose calls stand in the text between markers (`<tool_call>` ... `</tool_call>`, or from
    `[TOOL_CALLS]` to the end): text streams, except an end of it that could still become the opening marker."""

    boundary: int | None = None

    def __init__(
        self,
        opening: str,
        closing: str | None,
        parse: MarkupParser,
        names: Sequence[str],
        ids: Callable[[], str] = call_id,
    ) -> None:
        self.opening, self.closing = opening, closing
        self.parse = parse
        self.names = frozenset(names)
        self._calls = Calls(ids)
        self._pending = ""
        self._inside = False
        self._space = ""  # whitespace after a call: it goes out only if text follows

    @property
    def called(self) -> bool:
        return self._calls.count > 0

    def push(self, text: str) -> Pieces:
        self._pending += text
        out = Pieces()
        while True:
            if not self._inside:
                at = self._pending.find(self.opening)
                if at < 0:
                    keep = _partial(self._pending, self.opening)
                    cut = len(self._pending) - keep
                    out.add(self._say(self._pending[:cut]))
                    self._pending = self._pending[cut:]
                    return out
                out.add(self._say(self._pending[:at]))
                self._pending = self._pending[at + len(self.opening) :]
                self._inside = True
            if self.closing is None or (end := self._pending.find(self.closing)) < 0:
                return out
            markup, self._pending = self._pending[:end], self._pending[end + len(self.closing) :]
            self._inside = False
            out.add(self._markup(markup, self.opening + markup + self.closing))

    def _say(self, text: str) -> Pieces:
        if self.called and not text.strip():  # the whitespace between calls, or after the last
            self._space += text
            return Pieces()
        text, self._space = self._space + text, ""
        return Pieces(text)

    def _markup(self, markup: str, raw: str) -> Pieces:
        calls = self._calls.emit_all(self.parse(markup), self.names)
        if calls is None:
            return self._say(raw)  # malformed or an unknown tool: the model's text, as it wrote it
        self._space = ""
        return Pieces(calls=calls)

    def segment(self) -> Pieces:
        return Pieces()

    def flush(self, cut: bool = False) -> Pieces:
        pending, self._pending = self._pending, ""
        if not self._inside:
            # held back: an end that could still become the opening marker; the length limit cut it there, on the
            # way to a call (a forced one always is): half a marker is markup, not shown
            out = self._say("" if cut else pending)
            self._space = ""  # the answer's trailing whitespace after its last call
            return out
        self._inside = False
        # a call without its closing marker (the model stopped on its end token) is read as it stands; one the
        # length limit cut short that does not parse is markup, and no call
        out = self._markup(pending, "" if cut else self.opening + pending)
        self._space = ""
        return out


def _partial(text: str, marker: str) -> int:
    """Length of the longest end of `text` that begins `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


class ToolFormat(Protocol):
    """A tool-call format: its name, how it reads an answer, and the grammar that forces a call. `markers`: its
    markup's words that a tokenizer may hold as special tokens (which a decode skips: the output pipeline puts
    them back for the format to read)."""

    name: str
    markers: tuple[str, ...]

    def calls(self, tools: Sequence[Tool]) -> CallStream: ...

    def forced(self, tools: Sequence[Tool]) -> str:
        """A Lark grammar (llguidance's) for an answer that is one call of one of `tools`, its arguments held to
        the tool's schema when the tool is strict."""
