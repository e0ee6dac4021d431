"""Request bodies of both APIs, each defined once as a pydantic model: the model checks a body, and its JSON Schema is
the request body /openapi.json publishes (api/openapi.py), so the two cannot disagree. A checked body becomes the
typed request the doors hand on (ChatRequest, CompletionRequest); every error names its field."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar, cast

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    ValidationError,
    ValidatorFunctionWrapHandler,
    with_config,
)
from pydantic_core import CoreSchema, PydanticCustomError, core_schema
from typing_extensions import TypedDict  # pydantic's own dependency; it needs this TypedDict before Python 3.12

from backends.base import InvalidField, Message, Sampling

MAX_STOPS = 4
MAX_CHOICES = 8
_INT_MAX = 2**63 - 1  # the ceiling of every integer field without its own (a seed's range)
_INT_MIN = -(2**63)


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


# ---- the wire: what a body may hold --------------------------------------------------------------------------------


def _integral(value: Any) -> Any:
    """3.0 is the integer 3, as JSON Schema counts it; 3.5, true and "3" stay what they are and are refused."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


# After the bounds in an integer's Annotated[...]: pydantic then checks and publishes them on the integer itself.
_INTEGRAL = BeforeValidator(_integral)


@dataclass(frozen=True)
class _Says:
    """In an Annotated[...]: a value refused at this place is refused with `predicate` ("must be ..."), however
    pydantic put it. With `beneath`, so is a value refused for what it holds (a pair's strings), unless an inner
    _Says already said why or a field is missing: those keep their own, nearer place."""

    predicate: str
    beneath: bool = False

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        schema = handler(source)
        if schema["type"] == "union":  # pydantic-core replaces its members' errors itself, at no cost per value
            union = cast("core_schema.UnionSchema", schema)
            union["custom_error_type"] = "says"
            union["custom_error_message"] = self.predicate
            union["custom_error_context"] = {"says": self.predicate}
            return union
        return core_schema.no_info_wrap_validator_function(self._check, schema)

    def _check(self, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError as exc:
            errors = exc.errors()
            here = any(not e["loc"] for e in errors)
            if here or (self.beneath and not all(e["type"] in ("says", "missing") for e in errors)):
                raise PydanticCustomError("says", "{says}", {"says": self.predicate}) from None
            raise


# JSON's own types, strictly: no "1" or true for 1, no NaN or Infinity (Python's json reads them). Unknown fields are
# ignored, as they always were: clients send the fields of other servers.
_STRICT = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class _Wire(BaseModel):
    model_config = _STRICT


class _SamplingFields(_Wire):
    """The fields both APIs share. A field left out or null takes the route's default."""

    max_tokens: Annotated[int, Field(ge=1, le=_INT_MAX), _INTEGRAL] | None = None
    stop: (
        Annotated[
            str | Annotated[list[str], Field(max_length=MAX_STOPS)],
            _Says(f"must be a string or a list of at most {MAX_STOPS} strings"),
        ]
        | None
    ) = Field(None, description="Text that ends the answer, not included in it; empty strings are ignored")
    top_k: Annotated[int, Field(ge=-1, le=1_000_000), _INTEGRAL] | None = Field(
        None, description="0 and -1 (as in vLLM) mean no cut"
    )
    temperature: Annotated[float, Field(ge=0, le=2)] | None = Field(None, description="0 is greedy")
    top_p: Annotated[float, Field(ge=0, le=1)] | None = Field(None, description="0 keeps only the likeliest token")
    repetition_penalty: Annotated[float, Field(gt=0, le=10)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = 0.0
    seed: Annotated[int, Field(ge=_INT_MIN, le=_INT_MAX), _INTEGRAL] | None = None
    min_tokens: Annotated[int, Field(ge=0, le=_INT_MAX), _INTEGRAL] | None = 0
    ignore_eos: bool | None = False


_Pair = Annotated[
    list[str], Field(min_length=2, max_length=2), _Says("must be a [user, assistant] pair of strings", beneath=True)
]


class _ChatFields(_Wire):
    query: Annotated[str, Field(min_length=1)]
    history: Annotated[list[_Pair] | None, _Says("must be an array of [user, assistant] string pairs")] = None
    system: str | None = None
    max_length: Annotated[int, Field(ge=1, le=_INT_MAX), _INTEGRAL] | None = Field(
        None, description="Prompt and answer tokens together (ChatGLM's length)"
    )


class ChatBody(_SamplingFields, _ChatFields):  # its own fields first: they are checked, and published, in this order
    """The body of `/chat` and `/stream`."""

    model_config = ConfigDict(title="ChatRequest")


# Messages and their parts are TypedDicts, not models: a long conversation is checked about twice as fast.
@with_config(_STRICT)
class TextPart(TypedDict):
    type: Literal["text"]
    text: str


@with_config(_STRICT)
class ChatMessage(TypedDict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[
        str | list[TextPart],
        _Says("must be a string or a list of text parts (only text content parts are supported)"),
    ]


class StreamOptions(_Wire):
    include_usage: bool | None = False


class _CompletionFields(_Wire):
    model: str | None = None
    messages: Annotated[
        list[ChatMessage],
        Field(min_length=1),
        _Says("must be a non-empty array"),
    ]
    max_completion_tokens: Annotated[int, Field(ge=1, le=_INT_MAX), _INTEGRAL] | None = Field(
        None, description="Takes the place of max_tokens when both are sent"
    )
    stream_options: StreamOptions | None = None
    stream: bool | None = False
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES), _INTEGRAL] | None = 1


class CompletionBody(_SamplingFields, _CompletionFields):
    """The body of `/v1/chat/completions`."""

    model_config = ConfigDict(title="CompletionRequest")


# The request bodies under the names /openapi.json gives them.
REQUEST_BODIES: dict[str, type[BaseModel]] = {"ChatRequest": ChatBody, "CompletionRequest": CompletionBody}


# ---- errors: pydantic's first, as InvalidField -------------------------------------------------------------------

_KINDS = {  # what a refused value must be, by pydantic's error type
    "missing": "is required",
    "float_type": "must be a finite number",
    "finite_number": "must be a finite number",
    "int_type": "must be an integer",
    "int_from_float": "must be an integer",
    "bool_type": "must be a boolean",
    "string_type": "must be a string",
    "string_too_short": "must not be empty",
    "string_unicode": "holds an unpaired UTF-16 surrogate, which is not text",
    "model_type": "must be an object",
    "model_attributes_type": "must be an object",
    "dict_type": "must be an object",
    "list_type": "must be an array",
    "literal_error": "must be {expected}",
}
_RANGE = frozenset({"greater_than", "greater_than_equal", "less_than", "less_than_equal"})
_BOUND_WORDS = {
    "minimum": "at least",
    "exclusiveMinimum": "greater than",
    "maximum": "at most",
    "exclusiveMaximum": "less than",
}
# ChatGLM clients send a history back as they got it: an error in it names the field as a whole, its message the pair
_BLAMED_WHOLE = frozenset({"history"})

_W = TypeVar("_W", bound=BaseModel)


@functools.cache
def _range(model: type[BaseModel], name: str) -> str:
    """A top-level number's range in the words of its published schema: 'at least 0 and at most 2'."""
    schema = model.model_json_schema()["properties"][name]
    for branch in schema.get("anyOf", [schema]):
        if branch.get("type") == "integer" and {"minimum", "maximum"} <= branch.keys():
            return f"between {branch['minimum']} and {branch['maximum']}"
        bounds = [f"{words} {branch[key]}" for key, words in _BOUND_WORDS.items() if key in branch]
        if bounds:
            return " and ".join(bounds)
    return "in range"


def _invalid(model: type[BaseModel], exc: ValidationError) -> InvalidField:
    """The first error (fields are checked in order, so it is the first bad field's) as the doors report it."""
    error = exc.errors(include_url=False)[0]
    loc = error["loc"]
    if not loc:
        return InvalidField(None, "body must be a JSON object")
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    kind, value = error["type"], error["input"]
    if kind == "float_type" and isinstance(value, int) and not isinstance(value, bool):
        kind = "less_than_equal"  # an integer too large for a float: out of range, not "not a number"
    if kind == "says":
        says = str(error["ctx"]["says"])
    elif kind in _RANGE and len(loc) == 1:
        says = f"must be {_range(model, str(loc[0]))}, got {value}"
    else:
        known = _KINDS.get(kind)
        says = known.format_map(error.get("ctx", {})) if known else f"is not valid: {error['msg']}"
    param = str(loc[0]) if loc[0] in _BLAMED_WHOLE else path
    return InvalidField(param, f"'{path}' {says}")


def _validate(model: type[_W], body: dict[str, Any]) -> _W:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise _invalid(model, exc) from exc


# ---- checked bodies as typed requests ----------------------------------------------------------------------------


def _sampling(body: _SamplingFields, max_tokens: int | None) -> Sampling:
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    return Sampling(
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=None if body.top_k is None else max(body.top_k, 0),  # 0 and -1 (as in vLLM) mean no cut
        repetition_penalty=body.repetition_penalty,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        max_tokens=max_tokens,
        seed=body.seed,
        min_tokens=body.min_tokens or 0,
        ignore_eos=bool(body.ignore_eos),
        stop=tuple(s for s in stop if s),
    )


def parse_chat(body: dict[str, Any]) -> ChatRequest:
    """Validate a ChatGLM `/chat` or `/stream` body."""
    wire = _validate(ChatBody, body)
    return ChatRequest(
        query=wire.query,
        history=tuple((pair[0], pair[1]) for pair in wire.history or ()),
        system=wire.system,
        max_length=wire.max_length,
        sampling=_sampling(wire, wire.max_tokens),
    )


def _text(content: str | list[TextPart]) -> str:
    return content if isinstance(content, str) else "".join(part["text"] for part in content)


def parse_completion(body: dict[str, Any]) -> CompletionRequest:
    """Validate an OpenAI chat completions body."""
    wire = _validate(CompletionBody, body)
    max_tokens = wire.max_tokens if wire.max_completion_tokens is None else wire.max_completion_tokens
    return CompletionRequest(
        model=wire.model,
        messages=tuple(
            Message("system" if m["role"] == "developer" else m["role"], _text(m["content"])) for m in wire.messages
        ),
        sampling=_sampling(wire, max_tokens),
        n=wire.n or 1,
        stream=bool(wire.stream),
        include_usage=bool(wire.stream_options and wire.stream_options.include_usage),
    )
