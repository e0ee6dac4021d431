"""One request's output pipeline: token ids become client text through the detokenizer (never half a character),
the request's tool calls (read out of the text by the model's call format, which holds back what could still be
call markup), the model family's answer stream (its post-processing, applied as text arrives) and the stop strings
(held back until they can no longer match). What comes out concatenates to the final answer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from generation.detokenize import IncrementalDecoder, StopMatcher
from models.chat_format import TextStream
from models.tools.base import CallDelta, CallStream, Tool, ToolFormat


@dataclass(frozen=True)
class ToolCalling:
    """A request's tools and the model's format for them: each choice reads its answer with a stream of its own."""

    format: ToolFormat
    tools: tuple[Tool, ...]
    parallel: bool = True  # False: the answer's first call only (parallel_tool_calls: false)
    markers: tuple[tuple[int, str], ...] = ()  # (id, text) of the format's words the tokenizer holds as special tokens

    def stream(self) -> CallStream:
        return self.format.calls(self.tools)


@dataclass
class Emitted:
    """What one token adds: text, then pieces of calls; `stop`: the stop string that ended the answer."""

    text: str = ""
    calls: list[CallDelta] = field(default_factory=list)
    stop: str | None = None


class Output:
    """Turns one request's sampled tokens into its text deltas and calls, and tells when the text ends it."""

    def __init__(
        self,
        tokenizer: Any,
        prompt: Sequence[int],
        answer: TextStream,
        stops: Sequence[str],
        calls: CallStream | None = None,
        parallel: bool = True,
        markers: dict[int, str] | None = None,
    ) -> None:
        self._decoder = IncrementalDecoder(tokenizer, prompt)
        self._answer = answer
        self._stops = StopMatcher(stops)
        self._calls = calls
        self._parallel = parallel
        self._markers = markers or {}

    @property
    def called(self) -> bool:
        """The answer made a call."""
        return self._calls is not None and self._calls.called

    def push(self, token: int | None, last: bool, cut: bool = False) -> Emitted:
        """Add a token (None: an end-of-sequence token, which has no text); `last`: generation ends here (EOS or a
        length limit), so whatever is held back goes out; `cut`: the length limit ended it."""
        text = "" if token is None else self._decoder.push(token)
        if token in self._markers:  # a special token the decode skips, which the call format reads
            text += self._markers[token]
        if last:
            text += self._decoder.flush()
        calls: list[CallDelta] = []
        if self._calls is not None:
            pieces = self._calls.push(text)
            if token is not None and token == self._calls.boundary:
                pieces.add(self._calls.segment())
            if last:
                pieces.add(self._calls.flush(cut))
            text, calls = pieces.text, [c for c in pieces.calls if self._parallel or c.index == 0]
        text = self._answer.push(text) + (self._answer.flush() if last else "")
        out, hit = self._stops.push(text)
        if last and hit is None:
            out += self._stops.flush()
        return Emitted(out, calls, hit)
