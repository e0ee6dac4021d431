"""What a model family provides to turn a conversation into prompt ids and its output into the answer: the
message and defaults types, the `ChatFormat` protocol, and the chat-template format of Hugging Face models."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from models.tools.base import Tool, ToolCall, ToolFormat
from models.tools.formats import from_template
from models.tools.glm4 import Glm4Format

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Message:
    """One chat message; role is system, user, assistant or tool (a call's result, `tool_call_id` naming the call).
    An assistant message may hold the calls it made."""

    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None  # the tool whose result this is (legacy function messages name it)


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

    @property
    def tool_format(self) -> ToolFormat | None:
        """How this model calls tools (None: it cannot)."""

    def encode(self, messages: Sequence[Message], tools: Sequence[Tool] = ()) -> list[int]:
        """Prompt ids; `tools` are the ones the model is told it may call."""

    def encode_text(self, text: str) -> list[int]:
        """A raw prompt's ids (OpenAI completions, Ollama's raw generate): the text as it is, with no chat template,
        and the special tokens the family's model starts a text with (a BOS, ChatGLM's `[gMASK] sop`)."""

    def response_stream(self) -> TextStream: ...


def no_tools(messages: Sequence[Message], tools: Sequence[Tool]) -> None:
    """For a family without a tool format: a conversation about tools is refused, never rendered without them."""
    if tools or any(m.role == "tool" or m.tool_calls for m in messages):
        raise ChatRejected("this model has no tool-call format: its conversations cannot hold tools or tool calls")


class PassThrough:
    """The answer is the decoded text as it is."""

    def push(self, text: str) -> str:
        return text

    def flush(self) -> str:
        return ""


class TemplateFormat:
    """Hugging Face models: the tokenizer's chat template, or the plain fallback format without one. A template that
    renders tools itself gets them; the call format is the one its text shows (`models/tools/formats.py`)."""

    defaults: SamplingDefaults | None = None

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.renders_tools = renders_tools(tokenizer)
        template = getattr(tokenizer, "chat_template", None)
        # GLM-4-9B-chat-hf and GLM-4-0414: the GLM format, on the role tokens of a Hugging Face tokenizer
        assistant = _token_id(tokenizer, "<|assistant|>")
        glm = isinstance(template, str) and "<|observation|>" in template and assistant is not None
        self.own_tool_formats: tuple[ToolFormat, ...] = (
            (Glm4Format(assistant),) if glm and assistant is not None else ()
        )
        self.tool_format: ToolFormat | None = None
        if self.renders_tools and isinstance(template, str):
            self.tool_format = self.own_tool_formats[0] if self.own_tool_formats else from_template(template)

    def encode(self, messages: Sequence[Message], tools: Sequence[Tool] = ()) -> list[int]:
        if not self.renders_tools and self.tool_format is not None and (tools or any(m.tool_calls for m in messages)):
            # a format named on the command line for a template that ignores tools: its own instructions in the
            # system message, the history's calls in its own markup
            messages = with_tool_prompt(messages, self.tool_format, tools)
            tools = ()
        glm = isinstance(self.tool_format, Glm4Format)
        return encode_chat(self.tokenizer, messages, tools, glm_turns if glm else template_messages)

    def encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])  # the tokenizer's own special tokens: a BOS where it adds one

    def response_stream(self) -> TextStream:
        return PassThrough()


def _token_id(tokenizer: Any, token: str) -> int | None:
    """The id of a token the tokenizer holds whole, or None."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return next((i for i, t in added.items() if t.content == token), None)


_PROBE = "zz_probe_tool"


def renders_tools(tokenizer: Any) -> bool:
    """Whether the chat template writes the tools it is given into the prompt."""
    if not getattr(tokenizer, "chat_template", None):
        return False
    probe = {"type": "function", "function": {"name": _PROBE, "description": "", "parameters": {"type": "object"}}}
    try:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}], tools=[probe], tokenize=False, add_generation_prompt=True
        )
    except Exception as exc:  # a template that chokes on tools does not render them
        log.info("the chat template does not take tools: %s", exc)
        return False
    return _PROBE in str(rendered)


def with_tool_prompt(messages: Sequence[Message], fmt: ToolFormat | None, tools: Sequence[Tool]) -> list[Message]:
    """For a template that ignores tools: the format's tool instructions at the front of the system message, and the
    history's calls written into their messages in the format's own markup (the template would drop them)."""
    prompt, render = getattr(fmt, "system_prompt", None), getattr(fmt, "render_calls", None)
    if prompt is None or render is None:
        raise ChatRejected("this model has no tool-call format for its tools")
    out = [
        Message(m.role, "\n".join(p for p in (m.content, str(render(m.tool_calls))) if p)) if m.tool_calls else m
        for m in messages
    ]
    if not tools:  # calls in the history, none offered now
        return out
    text = str(prompt(tools))
    if out and out[0].role == "system":
        return [Message("system", f"{out[0].content}\n\n{text}"), *out[1:]]
    return [Message("system", text), *out]


def template_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Messages as chat templates take them: calls with their arguments as objects, results with their call's id."""
    out: list[dict[str, Any]] = []
    for m in messages:
        item: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            item["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.argument_object()}}
                for c in m.tool_calls
            ]
        if m.tool_call_id is not None:
            item["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            item["name"] = m.name
        out.append(item)
    return out


def glm_turns(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Messages as GLM-4's templates take them: each call its own assistant turn with the tool's name as metadata
    and the arguments as content, each result an observation (spec glm-tools.md 3.3)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        if m.role == "tool":
            out.append({"role": "observation", "content": m.content})
            continue
        if m.content or not m.tool_calls:
            out.append({"role": m.role, "content": m.content})
        out += [{"role": "assistant", "metadata": c.name, "content": c.arguments} for c in m.tool_calls]
    return out


def encode_chat(
    tokenizer: Any,
    messages: Sequence[Message],
    tools: Sequence[Tool] = (),
    shape: Callable[[Sequence[Message]], list[dict[str, Any]]] | None = None,
) -> list[int]:
    """Token ids for a chat, ending where the assistant's answer starts.

    Uses the tokenizer's chat template. Without one, the documented fallback is
    `{system}\\n\\n` then `User: {text}\\nAssistant: {text}\\n\\n` per round, ending `Assistant:`.
    """
    if getattr(tokenizer, "chat_template", None):
        extra = {"tools": [{"type": "function", "function": t.function()} for t in tools]} if tools else {}
        try:
            rendered = tokenizer.apply_chat_template(
                (shape or template_messages)(messages), tokenize=False, add_generation_prompt=True, **extra
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
        elif m.role == "tool":
            parts.append(f"Tool: {m.content}\n")
        else:
            calls = "".join(f"\n{json.dumps({'name': c.name, 'arguments': c.argument_object()})}" for c in m.tool_calls)
            parts.append(f"Assistant: {m.content}{calls}\n\n")
    return "".join(parts) + "Assistant:"
