"""Text in and out of the model: chat prompts, incremental detokenization, stop strings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

REPLACEMENT = "\ufffd"
# How many prompt tokens the detokenizer decodes along with the first new tokens, so that
# tokenizers which drop a word's leading space at the start of a decode keep it.
_CONTEXT_TOKENS = 4


@dataclass(frozen=True)
class Message:
    """One chat message; role is system, user or assistant."""

    role: str
    content: str


class PromptTooLong(Exception):
    """The prompt alone does not fit the model's context."""

    def __init__(self, prompt_tokens: int, context_length: int) -> None:
        super().__init__(
            f"This model's maximum context length is {context_length} tokens; the prompt has {prompt_tokens} tokens."
        )
        self.prompt_tokens = prompt_tokens
        self.context_length = context_length


class ChatRejected(Exception):
    """The model's chat template refused the conversation (say, a system message or roles out of turn)."""


def chatglm_messages(system: str | None, history: Sequence[tuple[str, str]], query: str) -> list[Message]:
    """History rounds become user/assistant messages, then the new query."""
    messages = [Message("system", system)] if system else []
    for user, assistant in history:
        messages += [Message("user", user), Message("assistant", assistant)]
    messages.append(Message("user", query))
    return messages


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


def drop_counts(n: int) -> list[int]:
    """How many leading messages may go, fewest first: whole user/assistant rounds, never the last message."""
    counts, dropped = [0], 0
    while n - dropped > 1:
        dropped += 2 if n - dropped > 2 else 1  # a whole round, so the chat still alternates
        counts.append(dropped)
    return counts


def fit_chat(
    chat: ChatFormat, messages: Sequence[Message], context_length: int, reserve: int, budget: int | None = None
) -> tuple[list[int], int]:
    """Encode the chat, dropping the oldest user/assistant rounds until prompt + reserve fits, and the prompt is
    at most `budget` tokens unless it has no history left.

    Returns the ids and how many leading non-system messages were dropped. The system message
    and the last message are never dropped; if they alone exceed the context, PromptTooLong.

    The result is the fewest rounds dropped, found without encoding the conversation once per round: after the
    whole conversation, the kept part doubles from the newest round back until it no longer fits, then a binary
    search, so every encoding after the first is at most about twice what fits (O(n + c log n) for n messages).
    """
    system = [m for m in messages[:1] if m.role == "system"]
    rest = list(messages[len(system) :])
    counts = drop_counts(len(rest))
    encoded: dict[int, list[int]] = {}
    last = len(counts) - 1  # every droppable message dropped

    def fits(k: int) -> bool:  # counts[k] messages dropped
        encoded[k] = chat.encode(system + rest[counts[k] :])
        within = budget is None or len(encoded[k]) <= budget or k == last  # the query stays anyway
        return within and len(encoded[k]) + reserve <= context_length

    if fits(0) or last == 0:
        best = 0
    elif not fits(last):
        best = last
    else:
        # counts[last] fits and counts[0] does not: gallop towards fewer dropped, then bisect
        fit, step = last, 1
        while fit - step > 0 and fits(fit - step):
            fit, step = fit - step, step * 2
        lo = max(fit - step, 0)  # does not fit
        while fit - lo > 1:
            mid = (lo + fit) // 2
            if fits(mid):
                fit = mid
            else:
                lo = mid
        best = fit
    ids = encoded[best] if best in encoded else chat.encode(system + rest[counts[best] :])
    if len(ids) >= context_length:
        raise PromptTooLong(len(ids), context_length)
    return ids, counts[best]


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas that never split a character.

    Decodes a small window of ids and emits only once the window's text grows and does not
    end in U+FFFD, i.e. once the bytes of a multi-byte character have all arrived.
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self._ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix = 0  # start of the decode window
        self._read = len(self._ids)  # end of the text already emitted

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))

    def push(self, token_id: int) -> str:
        """Add one token; return the new complete text (possibly empty)."""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before) :]

    def flush(self) -> str:
        """Text still held at the end; an unfinished character at the very end is dropped."""
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return after[len(before) :].rstrip(REPLACEMENT)


class StopMatcher:
    """Holds back text that could still become a stop string, so none ever reaches a client."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit, whether a stop string was found)."""
        if not self._stops:
            return text, False
        self._pending += text
        hits = [i for i in (self._pending.find(s) for s in self._stops) if i >= 0]
        if hits:
            out, self._pending = self._pending[: min(hits)], ""
            return out, True
        hold = self._partial_suffix()
        cut = len(self._pending) - hold
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out, False

    def _partial_suffix(self) -> int:
        """Length of the longest end of pending text that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self._pending)), best, -1):
                if self._pending.endswith(stop[:n]):
                    best = n
                    break
        return best

    def flush(self) -> str:
        """The held text, once generation has ended without a stop string."""
        out, self._pending = self._pending, ""
        return out
