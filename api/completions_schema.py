"""The wire of OpenAI legacy completions (`POST /v1/completions`):
its request bodies (pydantic models that check them and are published as they are),
its answers' schemas and its /openapi.json paths.

The sampling fields are the chat door's own (`api.schema._SamplingFields`, `logit_bias` from api/output_fields.py),
so both doors take and refuse the same values; only what the legacy API says differently is defined here."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from api.http import OPENAI_DEFAULTS
from api.openapi_parts import errors, op, ref
from api.output_fields import OutputFields
from api.schema import MAX_CHOICES, StreamOptions, _SamplingFields, sampling_of
from api.wire import INT_MAX, INTEGRAL, Says, Wire, validate
from backends.base import ChatJob, InvalidField, Limits, Sampling

LEGACY_MAX_TOKENS = 16  # OpenAI's default for a legacy completion that names no max_tokens
MAX_LOGPROBS = 5  # OpenAI's ceiling for the legacy integer logprobs
MAX_PROMPTS = 32  # prompts of one request, and choices of all of them together (prompts × n)

if TYPE_CHECKING:
    LogitBias = dict[str, float] | None
else:  # the chat door's definition itself, so the two cannot drift apart
    LogitBias = OutputFields.model_fields["logit_bias"].annotation


@dataclass(frozen=True)
class LegacyCompletionRequest:
    """A checked `/v1/completions` request: one raw text prompt per entry of `prompts`, `n` choices each."""

    model: str | None
    prompts: tuple[str, ...]
    sampling: Sampling
    n: int
    stream: bool
    include_usage: bool
    echo: bool  # each choice's text starts with its prompt
    logprobs: int | None  # the legacy integer: each token's logprob and this many alternatives; None: no logprobs

    def jobs(self, limits: Limits) -> list[ChatJob]:
        """One job per prompt, `n` choices each."""
        return [raw_job(prompt, limits, self.sampling, self.n) for prompt in self.prompts]


def raw_job(prompt: str, limits: Limits, sampling: Sampling | None = None, n: int = 1) -> ChatJob:
    """The job of one raw prompt: its text as it is, errors about it blamed on `prompt`. The one builder of it, for
    /v1/completions to generate from and for /tokenize to count, so the ids /tokenize gives are the ids generated
    from."""
    return ChatJob(
        (),
        sampling or Sampling(),
        OPENAI_DEFAULTS,
        n=n,
        limits=limits,
        prompt_param="prompt",
        template_param="prompt",
        prompt=prompt,
    )


class _LegacyFields(Wire):
    model: str | None = None
    prompt: Annotated[
        str | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)],
        Says(
            f"must be a string or a non-empty array of at most {MAX_PROMPTS} strings "
            "(only text prompts are served, not token ids)"
        ),
    ] = Field(description="The text to continue, as it is (no chat template); several: one set of choices each")
    suffix: Annotated[
        None, Says("must be null: this server does not fill in the middle (no text after the answer)")
    ] = Field(None, description="Only null: no fill-in-the-middle")
    echo: bool | None = Field(False, description="Each choice's text starts with its prompt")
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS), INTEGRAL] | None = Field(
        None, description="Each answer token's logprob and this many likeliest alternatives"
    )
    best_of: (
        Annotated[
            Annotated[int, Field(ge=1, le=1), INTEGRAL],
            Says("must be 1 or null: this server does not pick the best of several answers"),
        ]
        | None
    ) = Field(None, description="Only 1: no server-side best-of")
    logit_bias: LogitBias = Field(None, description=OutputFields.model_fields["logit_bias"].description)
    stream_options: StreamOptions | None = Field(None, description="Only with stream: true")
    stream: bool | None = False
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES), INTEGRAL] | None = 1
    user: str | None = Field(None, description="Accepted, without effect here")


class LegacyCompletionBody(_SamplingFields, _LegacyFields):  # its own fields first: checked, and published, in order
    """The body of `/v1/completions`. A field not listed here is refused (400)."""

    model_config = ConfigDict(title="LegacyCompletionRequest")

    # the chat door's field, with the legacy API's own default
    max_tokens: Annotated[int, Field(ge=1, le=INT_MAX), INTEGRAL] | None = Field(
        LEGACY_MAX_TOKENS, description=f"{LEGACY_MAX_TOKENS} when not sent, as OpenAI's; null: the server's default"
    )


def parse_legacy_completion(body: dict[str, Any]) -> LegacyCompletionRequest:
    """Validate an OpenAI legacy completions body."""
    wire = validate(LegacyCompletionBody, body)
    if wire.echo and wire.logprobs is not None:
        raise InvalidField("echo", "'echo' cannot be sent with 'logprobs': the prompt's logprobs are not computed")
    if wire.stream_options is not None and not wire.stream:  # as OpenAI: options of a stream that is not one
        raise InvalidField("stream_options", "The 'stream_options' parameter is only allowed when 'stream' is enabled")
    prompts = (wire.prompt,) if isinstance(wire.prompt, str) else tuple(wire.prompt)
    n = wire.n or 1
    if len(prompts) * n > MAX_PROMPTS:
        raise InvalidField("n", f"'n' times the {len(prompts)} prompts is more than {MAX_PROMPTS} choices in all")
    bias = tuple(sorted((int(token), float(value)) for token, value in (wire.logit_bias or {}).items()))
    return LegacyCompletionRequest(
        model=wire.model,
        prompts=prompts,
        sampling=replace(sampling_of(wire, wire.max_tokens), logit_bias=bias, logprobs=wire.logprobs),
        n=n,
        stream=bool(wire.stream),
        include_usage=bool(wire.stream_options and wire.stream_options.include_usage),
        echo=bool(wire.echo),
        logprobs=wire.logprobs,
    )


BODIES: dict[str, type[BaseModel]] = {"LegacyCompletionRequest": LegacyCompletionBody}

_NULLABLE_STRING = {"type": ["string", "null"]}
SCHEMAS: dict[str, Any] = {  # answers' schemas under their names
    "LegacyLogprobs": {
        "type": "object",
        "properties": {
            "tokens": {
                "type": "array",
                "items": {"type": "string"},
                "description": "Each token; one that is not UTF-8 on its own (part of a character) as OpenAI writes "
                "it, `bytes:` and its bytes as \\xNN escapes",
            },
            "token_logprobs": {"type": "array", "items": {"type": "number"}},
            "top_logprobs": {
                "type": "array",
                "items": {"type": "object", "additionalProperties": {"type": "number"}},
                "description": "Per token, the `logprobs` likeliest tokens and the token itself (one more where it is "
                "not among them), written as in `tokens`",
            },
            "text_offset": {
                "type": "array",
                "items": {"type": "integer"},
                "description": "Where each token starts in the choice's text, in characters",
            },
        },
    },
    "LegacyCompletion": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "text_completion"},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "text": {"type": "string"},
                        "index": {"type": "integer"},
                        "logprobs": {"anyOf": [ref("LegacyLogprobs"), {"type": "null"}]},
                        "finish_reason": {"enum": ["stop", "length", None]},
                        "stop_reason": {**_NULLABLE_STRING, "description": "The stop string that ended the choice"},
                    },
                },
            },
            "usage": ref("Usage"),
        },
    },
}

_ANSWER = {
    "description": "the completion, or with stream: a text/event-stream of LegacyCompletion chunks ending [DONE]",
    "content": {"application/json": {"schema": ref("LegacyCompletion")}, "text/event-stream": {}},
}
PATHS: dict[str, Any] = {
    "/v1/completions": {
        "post": op(
            "OpenAI legacy completions: a raw text prompt continued",
            {"200": _ANSWER, **errors(400, 401, 404, 413, 429, 503)},
            "LegacyCompletionRequest",
        )
    }
}
