"""Request bodies of both APIs, each defined once as a pydantic model: the model checks a body, and its JSON Schema is
the request body /openapi.json publishes (api/openapi.py), so the two cannot disagree. A checked body becomes the
typed request the doors hand on (ChatRequest, CompletionRequest); every error names its field.

Nothing a client sends is silently ignored: a field this server does not implement is a 400 naming it (the few that
SDKs send and that change nothing here are accepted, and documented as having no effect)."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, Literal, NotRequired, TypeVar, cast

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

from backends.base import Constraint, InvalidField, Message, Sampling, Tool, ToolCall, ToolChoice

MAX_STOPS = 4
MAX_CHOICES = 8
MAX_TOP_LOGPROBS = 20  # OpenAI's ceiling
MAX_LOGIT_BIAS = 300  # entries; OpenAI's limit
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
    logprobs: bool = False  # the answer carries each token's logprobs (how many alternatives: sampling.logprobs)
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = field(default_factory=ToolChoice)
    legacy_functions: bool = False  # the request spoke of `functions`: calls are answered as `function_call`


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


# JSON's own types, strictly: no "1" or true for 1, no NaN or Infinity (Python's json reads them). An unknown field is
# refused, at every level: ignored, a field the client relies on (tools, a schema in another server's spelling) would
# pass unnoticed while the answer disregards it.
_STRICT = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")


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


_Content = Annotated[
    str | list[TextPart],
    _Says("must be a string or a list of text parts (only text content parts are supported)"),
]
_FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


@with_config(_STRICT)
class CalledFunction(TypedDict):
    name: _FunctionName
    arguments: str


@with_config(_STRICT)
class MessageToolCall(TypedDict):
    id: Annotated[str, Field(min_length=1)]
    type: Literal["function"]
    function: CalledFunction


@with_config(_STRICT)
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


class FunctionDefinition(_Wire):
    name: _FunctionName = Field(description="Letters, digits, _ and -, at most 64")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="A JSON Schema of the arguments")
    strict: bool | None = Field(None, description="A forced call's arguments are held to `parameters`")


class ToolDefinition(_Wire):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Wire):
    name: _FunctionName


class NamedToolChoice(_Wire):
    type: Literal["function"]
    function: NamedFunction


class _ToolFields(_Wire):
    """Tools the model may call (and the legacy `functions` spelling of the same)."""

    tools: Annotated[list[ToolDefinition], Field(max_length=128)] | None = None
    tool_choice: (
        Annotated[
            Literal["none", "auto", "required"] | NamedToolChoice,
            _Says('must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}'),
        ]
        | None
    ) = Field(None, description="auto by default when tools are sent; required and a named function are enforced")
    parallel_tool_calls: bool | None = Field(None, description="false: at most one call per answer")
    functions: Annotated[list[FunctionDefinition], Field(max_length=128)] | None = Field(
        None, description="Legacy: tools as bare functions; answers carry `function_call`"
    )
    function_call: (
        Annotated[
            Literal["none", "auto"] | NamedFunction,
            _Says('must be "none", "auto" or {"name": ...}'),
        ]
        | None
    ) = Field(None, description="Legacy tool_choice")


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


class JsonSchemaFormat(_Wire):
    """A JSON Schema the answer is held to (OpenAI's `response_format.json_schema`)."""

    name: Annotated[str, Field(min_length=1)] = Field(description="Required, as OpenAI requires it; no effect here")
    schema_: dict[str, Any] = Field(alias="schema", description="The JSON Schema; a keyword it cannot hold is a 400")
    strict: bool | None = Field(None, description="The answer is always held to the schema, as with strict: true")
    description: str | None = Field(None, description="No effect here: the schema alone shapes the answer")


class ResponseFormat(_Wire):
    """OpenAI's response_format: text (no constraint), any JSON object, or JSON that fits `json_schema`."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = Field(None, description="Required with type json_schema, only then")


_Choice = Annotated[str, Field(min_length=1)]


class StructuredOutputs(_Wire):
    """vLLM's structured_outputs (sent in the OpenAI SDK's `extra_body`): exactly one of its fields."""

    json_: Annotated[dict[str, Any] | str, _Says("must be a JSON schema: an object, or its JSON text")] | None = Field(
        None, alias="json", description="A JSON Schema, or its JSON text"
    )
    regex: Annotated[str, Field(min_length=1)] | None = None
    choice: (
        Annotated[
            list[_Choice], Field(min_length=1), _Says("must be a non-empty array of non-empty strings", beneath=True)
        ]
        | None
    ) = Field(None, description="The answer is one of these strings")
    grammar: Annotated[str, Field(min_length=1)] | None = Field(None, description="A Lark grammar")
    json_object: bool | None = Field(None, description="true: any JSON object")


_LOGIT_BIAS = (
    f'must map token ids (whole numbers from 0, as strings: {{"1234": -100}}) to numbers between -100 and 100, '
    f"at most {MAX_LOGIT_BIAS} of them"
)


class _OutputFields(_Wire):
    """What the answer is held to, and what it reports of its tokens."""

    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    logprobs: bool | None = Field(False, description="Each answer token's logprob in `choices[].logprobs`")
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS), _INTEGRAL] | None = Field(
        None, description="The likeliest alternatives to list with each token; needs logprobs: true"
    )
    logit_bias: (
        Annotated[
            dict[
                Annotated[str, Field(pattern=r"^(0|[1-9][0-9]*)$")],
                Annotated[float, Field(ge=-100, le=100)],
            ],
            Field(max_length=MAX_LOGIT_BIAS, json_schema_extra={"additionalProperties": False}),
            _Says(_LOGIT_BIAS, beneath=True),
        ]
        | None
    ) = Field(None, description="Added to the named tokens' logits; -100 bans a token, 100 all but forces it")


_NO_EFFECT = "Accepted, without effect here"


class _NoEffectFields(_Wire):
    """Fields SDKs and clients send that change nothing on this server: accepted, so those clients work, and
    documented as without effect. Fields that would change the answer are refused instead (see `_UNSUPPORTED`)."""

    user: str | None = Field(None, description=_NO_EFFECT)
    store: Annotated[Literal[False], _Says("must be false or null: this server stores no completions")] | None = Field(
        None, description="Only false: this server stores no completions"
    )
    metadata: dict[str, str] | None = Field(None, description=_NO_EFFECT)
    service_tier: str | None = Field(None, description=_NO_EFFECT)
    prompt_cache_key: str | None = Field(None, description=f"{_NO_EFFECT}: common prompt prefixes are not cached")
    safety_identifier: str | None = Field(None, description=_NO_EFFECT)
    modalities: (
        Annotated[
            list[Literal["text"]],
            Field(min_length=1, max_length=1),
            _Says('must be ["text"]: this server answers in text only', beneath=True),
        ]
        | None
    ) = Field(None, description='Only ["text"]')


class CompletionBody(_NoEffectFields, _ToolFields, _OutputFields, _SamplingFields, _CompletionFields):
    """The body of `/v1/chat/completions`. A field not listed here is refused (400), among them audio, prediction,
    reasoning_effort, web_search_options and verbosity."""

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

_OLD_VLLM = "vLLM's older spelling, not supported: send structured_outputs (json, regex, choice or grammar)"
# Fields other servers implement that this one refuses (any other unknown field gets the general words): each would
# change the answer, so accepting it and doing nothing would be a silent lie
_UNSUPPORTED = {
    "audio": "not supported: this server answers in text only",
    "prediction": "not supported: this server does not use predicted outputs",
    "reasoning_effort": "not supported: this server has no reasoning setting",
    "verbosity": "not supported: this server has no verbosity setting",
    "web_search_options": "not supported: this server does not search the web",
    "guided_json": _OLD_VLLM,
    "guided_regex": _OLD_VLLM,
    "guided_choice": _OLD_VLLM,
    "guided_grammar": _OLD_VLLM,
    "guided_decoding_backend": _OLD_VLLM,
    "guided_whitespace_pattern": _OLD_VLLM,
}

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
    if kind == "extra_forbidden":
        return _unknown(path, loc)
    if kind == "says":
        says = str(error["ctx"]["says"])
    elif kind in _RANGE and len(loc) == 1:
        says = f"must be {_range(model, str(loc[0]))}, got {value}"
    else:
        known = _KINDS.get(kind)
        says = known.format_map(error.get("ctx", {})) if known else f"is not valid: {error['msg']}"
    param = str(loc[0]) if loc[0] in _BLAMED_WHOLE else path
    return InvalidField(param, f"'{path}' {says}")


def _unknown(path: str, loc: tuple[int | str, ...]) -> InvalidField:
    """A field this server does not implement (OpenAI's code for one a model does not take)."""
    why = _UNSUPPORTED.get(str(loc[0])) if len(loc) == 1 else None
    says = why or "not a field this server implements: it is refused rather than ignored"
    return InvalidField(path, f"'{path}' is {says}", "unsupported_parameter")


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
    tools, choice = _tools(wire, body)
    return CompletionRequest(
        model=wire.model,
        messages=_answered(tuple(_message(i, m) for i, m in enumerate(wire.messages))),
        tools=tools,
        tool_choice=choice,
        legacy_functions=wire.functions is not None or wire.function_call is not None,
        sampling=replace(
            _sampling(wire, max_tokens),
            logit_bias=tuple(sorted((int(token), float(bias)) for token, bias in (wire.logit_bias or {}).items())),
            logprobs=_logprobs(wire),
            constraint=_constraint(wire),
        ),
        n=wire.n or 1,
        stream=bool(wire.stream),
        include_usage=bool(wire.stream_options and wire.stream_options.include_usage),
        logprobs=bool(wire.logprobs),
    )


def _message(i: int, m: ChatMessage) -> Message:
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


def _answered(messages: tuple[Message, ...]) -> tuple[Message, ...]:
    """The messages, once each tool result is found to answer a call made before it (as OpenAI checks)."""
    made: set[str] = set()
    for i, m in enumerate(messages):
        made.update(call.id for call in m.tool_calls)
        if m.role == "tool" and m.tool_call_id is not None and m.tool_call_id not in made:
            param = f"messages[{i}].tool_call_id"
            raise InvalidField(param, f"'{param}' {m.tool_call_id!r} answers no tool call of an earlier message")
    return messages


def _tools(wire: _ToolFields, body: dict[str, Any]) -> tuple[tuple[Tool, ...], ToolChoice]:
    """The tools and the choice among them; the legacy `functions` and `function_call` map onto the same."""
    if wire.tools is not None and wire.functions is not None:
        raise InvalidField("functions", "'functions' cannot be sent with 'tools'")
    for other in ("tool_choice", "tools"):
        if wire.function_call is not None and getattr(wire, other) is not None:
            raise InvalidField("function_call", f"'function_call' cannot be sent with '{other}'")
    legacy = wire.functions is not None or wire.function_call is not None
    name_of = "functions" if legacy else "tools"
    sent = body.get(name_of) or []
    raw = [entry if legacy else entry["function"] for entry in sent]  # as sent: key order shows in some prompts
    defined = wire.functions if legacy else [t.function for t in wire.tools or ()]
    tools: list[Tool] = []
    for i, (fn, spec) in enumerate(zip(defined or (), raw, strict=True)):
        if any(t.name == fn.name for t in tools):
            raise InvalidField(f"{name_of}[{i}]", f"'{name_of}[{i}]' repeats the name {fn.name!r}")
        parameters = None if fn.parameters is None else _compact(fn.parameters)
        tools.append(Tool(fn.name, json.dumps(spec, ensure_ascii=False), parameters, bool(fn.strict)))
    if wire.parallel_tool_calls is not None and not tools:
        raise InvalidField("parallel_tool_calls", "'parallel_tool_calls' is only allowed when 'tools' are sent")
    choice_field = "function_call" if legacy else "tool_choice"
    choice = wire.function_call if legacy else wire.tool_choice
    # a legacy answer holds one function_call
    parallel = wire.parallel_tool_calls is not False and not legacy
    if choice is None:
        return tuple(tools), ToolChoice("auto" if tools else "none", parallel=parallel)
    if not tools:
        raise InvalidField(choice_field, f"'{choice_field}' is only allowed when '{name_of}' are sent")
    if isinstance(choice, str):
        return tuple(tools), ToolChoice(choice, parallel=parallel)
    name = choice.function.name if isinstance(choice, NamedToolChoice) else choice.name
    if all(t.name != name for t in tools):
        raise InvalidField(choice_field, f"'{choice_field}' names {name!r}, which is not among the '{name_of}'")
    return tuple(tools), ToolChoice("function", name, parallel)


def _logprobs(wire: _OutputFields) -> int | None:
    """Sampling.logprobs: None when not asked, else how many alternatives each token lists."""
    if wire.logprobs:
        return wire.top_logprobs or 0
    if wire.top_logprobs is not None:  # as OpenAI: alternatives of logprobs nobody asked for are a mistake
        raise InvalidField("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    return None


_SCHEMA_PARAM = "response_format.json_schema.schema"


def _constraint(wire: _OutputFields) -> Constraint | None:
    """The one constraint response_format or structured_outputs asks for; None for free text."""
    form = wire.response_format
    if form is not None and form.json_schema is not None and form.type != "json_schema":
        raise InvalidField("response_format.json_schema", "'response_format.json_schema' is only for type json_schema")
    if form is None or form.type == "text":
        return None if wire.structured_outputs is None else _structured(wire.structured_outputs)
    if wire.structured_outputs is not None:  # two constraints: which one would win is anybody's guess
        raise InvalidField(
            "structured_outputs", f"'structured_outputs' cannot be sent with 'response_format' of type {form.type}"
        )
    if form.type == "json_object":
        return Constraint("json_object", "", "response_format")
    if form.json_schema is None:
        raise InvalidField("response_format.json_schema", "'response_format.json_schema' is required")
    return Constraint("json_schema", _schema_text(form.json_schema.schema_, _SCHEMA_PARAM), _SCHEMA_PARAM)


def _structured(outputs: StructuredOutputs) -> Constraint:
    """vLLM's structured_outputs as a constraint: exactly one of its fields."""
    sent = {
        "json": outputs.json_,
        "regex": outputs.regex,
        "choice": outputs.choice,
        "grammar": outputs.grammar,
        "json_object": outputs.json_object or None,  # false asks for nothing
    }
    given = [name for name, value in sent.items() if value is not None]
    if len(given) != 1:
        got = f", got {' and '.join(given)}" if given else ""
        raise InvalidField(
            "structured_outputs",
            f"'structured_outputs' must hold exactly one of json, regex, choice, grammar or json_object: true{got}",
        )
    (name,) = given
    param = f"structured_outputs.{name}"
    if name == "json":
        return Constraint("json_schema", _schema_text(sent[name], param), param)
    if name == "choice":
        return Constraint("choice", _compact(sent[name]), param)
    if name == "json_object":
        return Constraint("json_object", "", param)
    return Constraint("regex" if name == "regex" else "grammar", str(sent[name]), param)


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _schema_text(schema: Any, param: str) -> str:
    """A schema, sent as an object or as its JSON text, as compact JSON text (its keys kept in their order: it is
    the order the answer's properties come in)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema, parse_constant=_no_constant)
        except (ValueError, RecursionError) as exc:
            raise InvalidField(param, f"'{param}' is not valid JSON: {exc}") from exc
        if not isinstance(schema, dict):
            raise InvalidField(param, f"'{param}' must be a JSON schema: an object, or its JSON text")
        if _unpaired_surrogate(schema) is not None:
            raise InvalidField(param, f"'{param}' holds an unpaired UTF-16 surrogate, which is not text")
    try:
        return _compact(schema)
    except RecursionError as exc:  # nested deeper than the encoder goes
        raise InvalidField(param, f"'{param}' is nested too deeply") from exc
