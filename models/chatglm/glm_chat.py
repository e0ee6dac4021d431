"""The chat formats of ChatGLM2-6B (`[Round n]` rounds), ChatGLM3-6B and GLM-4 (role tokens), per spec 11.4."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from models.chat_format import ChatRejected, Message, SamplingDefaults
from models.chatglm.chatglm6b_chat import TRAINING_TIME, to_rounds

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

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def encode(self, messages: Sequence[Message]) -> list[int]:
        system, rounds, query = to_rounds(messages)
        prompt = "".join(f"[Round {i + 1}]\n\n问：{q}\n\n答：{a}\n\n" for i, (q, a) in enumerate(rounds))
        prompt += f"[Round {len(rounds) + 1}]\n\n问：{query}\n\n答："
        special = self.tokenizer.special
        return [
            special["[gMASK]"],
            special["sop"],
            *self.tokenizer.encode(f"{system}\n\n{prompt}" if system else prompt),
        ]

    def response_stream(self) -> StripStream:
        return StripStream(placeholder=True)


class RolesFormat:
    """ChatGLM3-6B and GLM-4: `[gMASK] sop`, then per message its role token, a newline and the content; the
    assistant's turn starts after its role token."""

    defaults = DEFAULTS

    def __init__(self, tokenizer: Tokenizer, sop: str) -> None:
        self.tokenizer = tokenizer
        self.sop = sop

    def encode(self, messages: Sequence[Message]) -> list[int]:
        if not messages or messages[-1].role != "user":
            raise ChatRejected("the conversation must end with a user message")
        special = self.tokenizer.special
        ids = [special["[gMASK]"], special[self.sop]]
        newline = self.tokenizer.encode("\n")  # the empty metadata line
        for m in messages:
            ids += [special[f"<|{m.role}|>"], *newline, *self.tokenizer.encode(m.content)]
        return [*ids, special["<|assistant|>"]]

    def response_stream(self) -> StripStream:
        return StripStream(placeholder=False)
