"""Request bodies of both APIs, each defined once as a pydantic model: the model checks a body, and its JSON Schema is
the request body /openapi.json publishes (api/openapi.py), so the two cannot disagree. A checked body becomes the
typed request the doors hand on (ChatRequest, CompletionRequest); every error names its field.

Nothing a client sends is silently ignored: a field this server does not implement is a 400 naming it (the few that
SDKs send and that change nothing here are accepted, and documented as having no effect).

The bodies are put together here from their field groups, each in its own module with what it checks: the messages
(api/messages.py), the tools (api/tool_fields.py), the answer's shape and logprobs (api/output_fields.py); what every
body shares (strict JSON types, errors as InvalidField) is api/wire.py."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from api.messages import ChatMessage, answered, message
from api.output_fields import OutputFields, constraint, logprobs
from api.tool_fields import ToolFields, tools_of
from api.wire import INT_MAX, INT_MIN, INTEGRAL, NO_EFFECT, Says, Wire, unpaired_surrogate, validate
from backends.base import InvalidField, Message, Sampling, Tool, ToolChoice

MAX_STOPS = 4
MAX_CHOICES = 8


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
    broken = unpaired_surrogate(body)
    if broken is not None:
        raise InvalidField(broken, f"'{broken}' holds an unpaired UTF-16 surrogate, which is not text")
    return body


# ---- the bodies: their fields, in the order they are checked and published ---------------------------------------


class _SamplingFields(Wire):
    """The fields both APIs share. A field left out or null takes the route's default."""

    max_tokens: Annotated[int, Field(ge=1, le=INT_MAX), INTEGRAL] | None = None
    stop: (
        Annotated[
            str | Annotated[list[str], Field(max_length=MAX_STOPS)],
            Says(f"must be a string or a list of at most {MAX_STOPS} strings"),
        ]
        | None
    ) = Field(None, description="Text that ends the answer, not included in it; empty strings are ignored")
    top_k: Annotated[int, Field(ge=-1, le=1_000_000), INTEGRAL] | None = Field(
        None, description="0 and -1 (as in vLLM) mean no cut"
    )
    temperature: Annotated[float, Field(ge=0, le=2)] | None = Field(None, description="0 is greedy")
    top_p: Annotated[float, Field(ge=0, le=1)] | None = Field(None, description="0 keeps only the likeliest token")
    repetition_penalty: Annotated[float, Field(gt=0, le=10)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = 0.0
    seed: Annotated[int, Field(ge=INT_MIN, le=INT_MAX), INTEGRAL] | None = None
    min_tokens: Annotated[int, Field(ge=0, le=INT_MAX), INTEGRAL] | None = 0
    ignore_eos: bool | None = False


_Pair = Annotated[
    list[str], Field(min_length=2, max_length=2), Says("must be a [user, assistant] pair of strings", beneath=True)
]


class _ChatFields(Wire):
    query: Annotated[str, Field(min_length=1)]
    history: Annotated[list[_Pair] | None, Says("must be an array of [user, assistant] string pairs")] = None
    system: str | None = None
    max_length: Annotated[int, Field(ge=1, le=INT_MAX), INTEGRAL] | None = Field(
        None, description="Prompt and answer tokens together (ChatGLM's length)"
    )


class ChatBody(_SamplingFields, _ChatFields):  # its own fields first: they are checked, and published, in this order
    """The body of `/chat` and `/stream`."""

    model_config = ConfigDict(title="ChatRequest")


class StreamOptions(Wire):
    include_usage: bool | None = False


class _CompletionFields(Wire):
    model: str | None = None
    messages: Annotated[
        list[ChatMessage],
        Field(min_length=1),
        Says("must be a non-empty array"),
    ]
    max_completion_tokens: Annotated[int, Field(ge=1, le=INT_MAX), INTEGRAL] | None = Field(
        None, description="Takes the place of max_tokens when both are sent"
    )
    stream_options: StreamOptions | None = None
    stream: bool | None = False
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES), INTEGRAL] | None = 1


class _NoEffectFields(Wire):
    """Fields SDKs and clients send that change nothing on this server: accepted, so those clients work, and
    documented as without effect. Fields that would change the answer are refused instead (see api/wire.py's
    `_UNSUPPORTED`)."""

    user: str | None = Field(None, description=NO_EFFECT)
    store: Annotated[Literal[False], Says("must be false or null: this server stores no completions")] | None = Field(
        None, description="Only false: this server stores no completions"
    )
    metadata: dict[str, str] | None = Field(None, description=NO_EFFECT)
    service_tier: str | None = Field(None, description=NO_EFFECT)
    prompt_cache_key: str | None = Field(None, description=f"{NO_EFFECT}: common prompt prefixes are not cached")
    safety_identifier: str | None = Field(None, description=NO_EFFECT)
    modalities: (
        Annotated[
            list[Literal["text"]],
            Field(min_length=1, max_length=1),
            Says('must be ["text"]: this server answers in text only', beneath=True),
        ]
        | None
    ) = Field(None, description='Only ["text"]')


class CompletionBody(_NoEffectFields, ToolFields, OutputFields, _SamplingFields, _CompletionFields):
    """The body of `/v1/chat/completions`. A field not listed here is refused (400), among them audio, prediction,
    reasoning_effort, web_search_options and verbosity."""

    model_config = ConfigDict(title="CompletionRequest")


# The request bodies under the names /openapi.json gives them.
REQUEST_BODIES: dict[str, type[BaseModel]] = {"ChatRequest": ChatBody, "CompletionRequest": CompletionBody}


# ---- checked bodies as typed requests ----------------------------------------------------------------------------


def sampling_of(body: _SamplingFields, max_tokens: int | None) -> Sampling:
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
    wire = validate(ChatBody, body)
    return ChatRequest(
        query=wire.query,
        history=tuple((pair[0], pair[1]) for pair in wire.history or ()),
        system=wire.system,
        max_length=wire.max_length,
        sampling=sampling_of(wire, wire.max_tokens),
    )


def parse_completion(body: dict[str, Any]) -> CompletionRequest:
    """Validate an OpenAI chat completions body."""
    wire = validate(CompletionBody, body)
    if wire.stream_options is not None and not wire.stream:  # as OpenAI: options of a stream that is not one
        raise InvalidField("stream_options", "'stream_options' is only allowed when 'stream' is true")
    max_tokens = wire.max_tokens if wire.max_completion_tokens is None else wire.max_completion_tokens
    tools, choice = tools_of(wire, body)
    return CompletionRequest(
        model=wire.model,
        messages=answered(tuple(message(i, m) for i, m in enumerate(wire.messages))),
        tools=tools,
        tool_choice=choice,
        legacy_functions=wire.functions is not None or wire.function_call is not None,
        sampling=replace(
            sampling_of(wire, max_tokens),
            logit_bias=tuple(sorted((int(token), float(bias)) for token, bias in (wire.logit_bias or {}).items())),
            logprobs=logprobs(wire),
            constraint=constraint(wire),
        ),
        n=wire.n or 1,
        stream=bool(wire.stream),
        include_usage=bool(wire.stream_options and wire.stream_options.include_usage),
        logprobs=bool(wire.logprobs),
    )
