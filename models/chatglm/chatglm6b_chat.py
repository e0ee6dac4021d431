"""ChatGLM-6B's chat layer (spec section 7): the prompt of its `chat()`, its generation defaults, and its response
post-processing, applied while streaming so that the deltas still concatenate to the final response."""

from __future__ import annotations

import re
from collections.abc import Sequence

from models.chat_format import ChatRejected, Message, SamplingDefaults, no_tools
from models.chatglm.chatglm6b_tokenizer import CLEANUP, ChatGLMTokenizer, clean_up_tokenization
from models.tools.base import Tool

# `chat()`: sampling with top_p 0.7, temperature 0.95, transformers' silent top_k 50, 2048 tokens in all
DEFAULTS = SamplingDefaults(temperature=0.95, top_p=0.7, top_k=50, max_length=2048)
TRAINING_TIME = ("[[训练时间]]", "2023年")
MARKS = ",!:;?"
_FULL_WIDTH = {",": "，", "!": "！", ":": "：", ";": "；", "?": "？"}
_CJK = "[\u4e00-\u9fff]"
# held back while streaming: text that could still become one of these once more text arrives
_PATTERNS = (TRAINING_TIME[0], *(before for before, _ in CLEANUP))


def build_prompt(query: str, history: Sequence[tuple[str, str]]) -> str:
    """The original `chat()` prompt: the bare query without history, else 0-based `[Round i]` rounds."""
    if not history:
        return query
    rounds = "".join(f"[Round {i}]\n问：{q}\n答：{a}\n" for i, (q, a) in enumerate(history))
    return f"{rounds}[Round {len(history)}]\n问：{query}\n答："


def to_rounds(messages: Sequence[Message]) -> tuple[str | None, list[tuple[str, str]], str]:
    """(system, past rounds, query) of a conversation; ChatRejected when it does not end with the user's turn.

    Consecutive user messages are joined by a newline; an assistant message with no question before it pairs with
    an empty one."""
    system = "\n".join(m.content for m in messages if m.role == "system") or None
    rounds: list[tuple[str, str]] = []
    asked: list[str] = []
    for m in messages:
        if m.role == "user":
            asked.append(m.content)
        elif m.role == "assistant":
            rounds.append(("\n".join(asked), m.content))
            asked = []
    if not asked or messages[-1].role != "user":
        raise ChatRejected("the conversation must end with a user message")
    return system, rounds, "\n".join(asked)


def process_response(text: str) -> str:
    """The original post-processing: strip, the training-time placeholder, full-width marks next to CJK."""
    return _marks(text.strip().replace(*TRAINING_TIME))


def _marks(text: str) -> str:
    for ascii_mark, full in _FULL_WIDTH.items():
        mark = re.escape(ascii_mark)
        text = re.sub(f"({_CJK}){mark}", rf"\1{full}", text)
        text = re.sub(f"{mark}({_CJK})", rf"{full}\1", text)
    return text


def _unstable_tail(text: str) -> int:
    """How many characters at the end of raw text could still change once more text follows: trailing whitespace
    (stripped at the end), an ASCII mark (its right neighbour decides), the start of a pattern."""
    end = len(text)
    while end:
        if text[end - 1].isspace() or text[end - 1] in MARKS:
            end -= 1
            continue
        partial = max((n for p in _PATTERNS for n in range(1, len(p)) if text.endswith(p[:n], 0, end)), default=0)
        if not partial:
            break
        end -= partial
    return len(text) - end


class ResponseStream:
    """`process_response(clean_up(text))` while text arrives: emits only what more text can no longer change.

    Every rule looks at most one character to the left, so a chunk is processed with the last character already
    emitted as its left context; what could still change at the right end waits for the next push."""

    def __init__(self) -> None:
        self._pending = ""
        self._left = ""  # the last character emitted: the left context of the next chunk
        self._started = False  # leading whitespace is dropped until the first character

    def push(self, text: str) -> str:
        """Add raw decoded text; return the processed text that is now final."""
        self._pending += text
        cut = len(self._pending) - _unstable_tail(self._pending)
        if cut <= 0:
            return ""
        chunk, self._pending = self._pending[:cut], self._pending[cut:]
        return self._emit(chunk)

    def flush(self) -> str:
        """The rest, once generation has ended: trailing whitespace is dropped."""
        chunk, self._pending = self._pending, ""
        return self._emit(chunk, final=True)

    def _emit(self, chunk: str, final: bool = False) -> str:
        text = clean_up_tokenization(self._left + chunk)
        if final:
            text = text.rstrip()
        text = _marks(text.replace(*TRAINING_TIME))[len(self._left) :]
        if not self._started:
            text = text.lstrip()
            self._started = bool(text)
        if text:
            self._left = text[-1]
        return text


class ChatGLM6BFormat:
    """ChatGLM-6B's chat format for the engine: prompt ids, defaults and the response stream."""

    defaults = DEFAULTS
    tool_format = None

    def __init__(self, tokenizer: ChatGLMTokenizer) -> None:
        self.tokenizer = tokenizer

    def encode(self, messages: Sequence[Message], tools: Sequence[Tool] = ()) -> list[int]:
        """The ids of `chat(query, history)`; a system message, which ChatGLM-6B has no slot for, leads the prompt."""
        no_tools(messages, tools)
        system, rounds, query = to_rounds(messages)
        prompt = build_prompt(query, rounds)
        return self.tokenizer.encode(f"{system}\n{prompt}" if system else prompt)

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)  # ends `[gMASK] <sop>`, where ChatGLM-6B's answer starts

    def response_stream(self) -> ResponseStream:
        return ResponseStream()
