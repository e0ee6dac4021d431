"""The chat formats of ChatGLM2-6B (`[Round n]` rounds), ChatGLM3-6B and GLM-4 (role tokens), per spec 11.4."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Protocol

from models.chat_format import ChatRejected, Message, SamplingDefaults, no_tools
from models.chatglm.chatglm6b_chat import TRAINING_TIME, to_rounds
from models.tools import chatglm3, glm4
from models.tools.base import Tool, ToolFormat
from models.tools.chatglm3 import ChatGLM3Format
from models.tools.glm4 import Glm4Format

# their chat(): top_p 0.8, temperature 0.8, no top-k; the length is the model's own context
DEFAULTS = SamplingDefaults(temperature=0.8, top_p=0.8)


class Tokenizer(Protocol):
    special: dict[str, int]

    def encode(self, text: str) -> list[int]: ...


class StripStream:
    """The answer without leading and trailing whitespace (and, for ChatGLM2, the training-time placeholder
    filled in), while text arrives: whitespace and the start of the placeholder wait until what follows is known."""

    def __init__(self, placeholder: bool) -> None:
        self._pending = ""
        self._started = False
        self._placeholder = placeholder

    def push(self, text: str) -> str:
        self._pending += text
        if not self._started:
            self._pending = self._pending.lstrip()
            self._started = bool(self._pending)
        end = len(self._pending.rstrip())
        if self._placeholder:
            end -= max(
                (n for n in range(1, len(TRAINING_TIME[0])) if self._pending.endswith(TRAINING_TIME[0][:n], 0, end)),
                default=0,
            )
        out, self._pending = self._pending[:end], self._pending[end:]
        return out.replace(*TRAINING_TIME) if self._placeholder else out

    def flush(self) -> str:
        out, self._pending = self._pending.rstrip(), ""
        return out.replace(*TRAINING_TIME) if self._placeholder else out


class RoundsFormat:
    """ChatGLM2-6B: `[gMASK] sop`, then 1-based `[Round n]` rounds with blank lines, always templated."""

    defaults = DEFAULTS
    tool_format = None

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def encode(self, messages: Sequence[Message], tools: Sequence[Tool] = ()) -> list[int]:
        no_tools(messages, tools)
        system, rounds, query = to_rounds(messages)
        prompt = "".join(f"[Round {i + 1}]\n\n问：{q}\n\n答：{a}\n\n" for i, (q, a) in enumerate(rounds))
        prompt += f"[Round {len(rounds) + 1}]\n\n问：{query}\n\n答："
        special = self.tokenizer.special
        return [
            special["[gMASK]"],
            special["sop"],
            *self.tokenizer.encode(f"{system}\n\n{prompt}" if system else prompt),
        ]

    def encode_text(self, text: str) -> list[int]:
        special = self.tokenizer.special
        return [special["[gMASK]"], special["sop"], *self.tokenizer.encode(text)]

    def response_stream(self) -> StripStream:
        return StripStream(placeholder=True)


class RolesFormat:
    """ChatGLM3-6B and GLM-4: `[gMASK] sop`, then per turn its role token, a metadata line (a call's tool name, else
    empty) and the content; the assistant's turn starts after its role token. Tools go in a system turn of each
    model's own wording first; calls in the history are written back the way the model writes them, each result is
    an observation turn (spec glm-tools.md)."""

    defaults = DEFAULTS

    def __init__(self, tokenizer: Tokenizer, sop: str) -> None:
        self.tokenizer = tokenizer
        self.sop = sop
        assistant = tokenizer.special["<|assistant|>"]
        # ChatGLM3's prefix token is `sop`, GLM-4's `<sop>`
        self.own_tool_formats = (Glm4Format(assistant), ChatGLM3Format(assistant))
        self.tool_format: ToolFormat | None = self.own_tool_formats[0 if sop == "<sop>" else 1]

    def encode(self, messages: Sequence[Message], tools: Sequence[Tool] = ()) -> list[int]:
        if not messages or messages[-1].role not in ("user", "tool"):
            raise ChatRejected("the conversation must end with a user message or a tool result")
        special = self.tokenizer.special
        ids = [special["[gMASK]"], special[self.sop]]
        for role, metadata, content in self.turns(messages, tools):
            # two encodings, as the official builder's: each gets SentencePiece's leading space of its own
            ids += [special[f"<|{role}|>"], *self.tokenizer.encode(metadata + "\n"), *self.tokenizer.encode(content)]
        return [*ids, special["<|assistant|>"]]

    def turns(self, messages: Sequence[Message], tools: Sequence[Tool]) -> list[tuple[str, str, str]]:
        """(role, metadata, content) of each turn."""
        turns: list[tuple[str, str, str]] = []
        glm4_calls = isinstance(self.tool_format, Glm4Format)
        if tools and glm4_calls:
            turns.append(("system", "", glm4.system_turn(tools)))
        elif tools:
            # ChatGLM3 has one system turn, at the start: the caller's leading system messages join the tools'
            lead = 0
            while lead < len(messages) and messages[lead].role == "system":
                lead += 1
            own = [m.content for m in messages[:lead] if m.content]
            turns.append(("system", "", "\n".join([chatglm3.system_turn(tools), *own])))
            messages = messages[lead:]
        for m in messages:
            if m.role == "tool":
                turns.append(("observation", "", m.content))
            elif m.role != "assistant" or not m.tool_calls:
                turns.append((m.role, "", m.content))
            else:
                if m.content:
                    turns.append(("assistant", "", m.content))
                turns += [("assistant", call.name, self._call_body(call.arguments)) for call in m.tool_calls]
        return turns

    def _call_body(self, arguments: str) -> str:
        if isinstance(self.tool_format, Glm4Format):
            return arguments  # as the client holds it, as the official template inserts it
        try:
            return chatglm3.call_body(json.loads(arguments))
        except (ValueError, RecursionError) as exc:
            raise ChatRejected(f"a tool call's arguments must be a JSON object for this model: {exc}") from exc

    def encode_text(self, text: str) -> list[int]:
        special = self.tokenizer.special
        return [special["[gMASK]"], special[self.sop], *self.tokenizer.encode(text)]

    def response_stream(self) -> StripStream:
        return StripStream(placeholder=False)
