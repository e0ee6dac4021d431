"""An OpenAI body's `messages`: their wire shape (`ChatMessage`, its text parts and tool calls) and each checked one as
the backends' `Message` (`message`), then the conversation checked as a whole (`answered`: each tool result answers an
earlier call)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, NotRequired

from pydantic import Field, with_config
from typing_extensions import TypedDict  # pydantic's own dependency; it needs this TypedDict before Python 3.12

from api.tool_fields import FunctionName
from api.wire import STRICT, Says
from backends.base import InvalidField, Message, ToolCall


# Messages and their parts are TypedDicts, not models: a long conversation is checked about twice as fast.
@with_config(STRICT)
class TextPart(TypedDict):
    type: Literal["text"]
    text: str


_Content = Annotated[
    str | list[TextPart],
    Says("must be a string or a list of text parts (only text content parts are supported)"),
]


@with_config(STRICT)
class CalledFunction(TypedDict):
    name: FunctionName
    arguments: str


@with_config(STRICT)
class MessageToolCall(TypedDict):
    id: Annotated[str, Field(min_length=1)]
    type: Literal["function"]
    function: CalledFunction


@with_config(STRICT)
class ChatMessage(TypedDict):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: NotRequired[_Content | None]
    name: NotRequired[str]
    tool_calls: NotRequired[list[MessageToolCall] | None]
    tool_call_id: NotRequired[str]
    function_call: NotRequired[CalledFunction | None]
    # an SDK's answer message sent back whole (`message.model_dump()`) holds these as null: nothing to ignore
    refusal: NotRequired[None]
    annotations: NotRequired[Annotated[list[Any], Field(max_length=0)] | None]
    audio: NotRequired[None]


def _text(content: str | list[TextPart]) -> str:
    return content if isinstance(content, str) else "".join(part["text"] for part in content)


def message(i: int, m: ChatMessage) -> Message:
    """A checked message as the backends take it: developer is system, a legacy function result a tool result."""
    role, content = m["role"], m.get("content")
    where = f"messages[{i}]"
    calls = tuple(
        ToolCall(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in m.get("tool_calls") or ()
    )
    if (legacy := m.get("function_call")) is not None:
        calls += (ToolCall(f"call_{i}", legacy["name"], legacy["arguments"]),)
    for key in ("tool_calls", "function_call"):
        if m.get(key) is not None and role != "assistant":
            raise InvalidField(f"{where}.{key}", f"'{where}.{key}' is only for assistant messages")
    if "name" in m and role not in ("tool", "function"):  # a participant's name would change nothing here
        raise InvalidField(f"{where}.name", f"'{where}.name' is only for tool and function messages")
    if "tool_call_id" in m and role != "tool":
        raise InvalidField(f"{where}.tool_call_id", f"'{where}.tool_call_id' is only for tool messages")
    if content is None and not (role == "assistant" and calls):
        raise InvalidField(f"{where}.content", f"'{where}.content' is required")
    if role == "tool" and not m.get("tool_call_id"):
        raise InvalidField(f"{where}.tool_call_id", f"'{where}.tool_call_id' is required for tool messages")
    if role == "function" and not m.get("name"):
        raise InvalidField(f"{where}.name", f"'{where}.name' is required for function messages")
    text = "" if content is None else _text(content)
    if role in ("tool", "function"):
        return Message("tool", text, tool_call_id=m.get("tool_call_id"), name=m.get("name"))
    return Message("system" if role == "developer" else role, text, tool_calls=calls)


def answered(messages: tuple[Message, ...]) -> tuple[Message, ...]:
    """The messages, once each tool result is found to answer a call made before it (as OpenAI checks)."""
    made: set[str] = set()
    for i, m in enumerate(messages):
        made.update(call.id for call in m.tool_calls)
        if m.role == "tool" and m.tool_call_id is not None and m.tool_call_id not in made:
            param = f"messages[{i}].tool_call_id"
            raise InvalidField(param, f"'{param}' {m.tool_call_id!r} answers no tool call of an earlier message")
    return messages
