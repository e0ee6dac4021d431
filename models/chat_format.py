"""What a model family provides to turn a conversation into prompt ids and its output into the answer: the
message and defaults types, the `ChatFormat` protocol, and the chat-template format of Hugging Face models."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Message:
    """One chat message; role is system, user or assistant."""

    role: str
    content: str


class ChatRejected(Exception):
    """The model's chat template refused the conversation (say, a system message or roles out of turn)."""


@dataclass(frozen=True)
class SamplingDefaults:
    """A model family's own generation defaults, for whatever a request leaves unset."""

    temperature: float
    top_p: float
    top_k: int = 0  # 0: no top-k cut
    max_length: int | None = None  # prompt + answer tokens


class TextStream(Protocol):
    """Turns decoded text into the text a client sees, as it arrives: deltas concatenate to the final text."""

    def push(self, text: str) -> str: ...

    def flush(self) -> str: ...


class ChatFormat(Protocol):
    """How one model family turns a conversation into prompt ids and its output into the answer."""

    @property
    def defaults(self) -> SamplingDefaults | None: ...

    def encode(self, messages: Sequence[Message]) -> list[int]: ...

    def response_stream(self) -> TextStream: ...


class PassThrough:
    """The answer is the decoded text as it is."""

    def push(self, text: str) -> str:
        return text

    def flush(self) -> str:
        return ""


class TemplateFormat:
    """Hugging Face models: the tokenizer's chat template, or the plain fallback format without one."""

    defaults: SamplingDefaults | None = None

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def encode(self, messages: Sequence[Message]) -> list[int]:
        return encode_chat(self.tokenizer, messages)

    def response_stream(self) -> TextStream:
        return PassThrough()


def encode_chat(tokenizer: Any, messages: Sequence[Message]) -> list[int]:
    """Token ids for a chat, ending where the assistant's answer starts.

    Uses the tokenizer's chat template. Without one, the documented fallback is
    `{system}\\n\\n` then `User: {text}\\nAssistant: {text}\\n\\n` per round, ending `Assistant:`.
    """
    if getattr(tokenizer, "chat_template", None):
        try:
            rendered = tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in messages], tokenize=False, add_generation_prompt=True
            )
        except Exception as exc:  # templates reject what their model cannot take with raise_exception(...)
            raise ChatRejected(f"the model's chat template refused this conversation: {exc}") from exc
        # the template already writes any BOS it wants
        return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    return list(tokenizer(fallback_prompt(messages))["input_ids"])


def fallback_prompt(messages: Sequence[Message]) -> str:
    """The plain prompt format for models without a chat template."""
    parts: list[str] = []
    for m in messages:
        if m.role == "system":
            parts.append(f"{m.content}\n\n")
        elif m.role == "user":
            parts.append(f"User: {m.content}\n")
        else:
            parts.append(f"Assistant: {m.content}\n\n")
    return "".join(parts) + "Assistant:"
