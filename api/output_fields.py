"""The output fields of an OpenAI body: what the answer's shape is held to (`response_format`, vLLM's
`structured_outputs`), checked into one `Constraint`, and what the answer reports of its tokens (`logprobs`,
`top_logprobs`) or does to them (`logit_bias`)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import Field

from api.wire import INTEGRAL, Says, Wire, compact, unpaired_surrogate
from backends.base import Constraint, InvalidField

MAX_TOP_LOGPROBS = 20  # OpenAI's ceiling
MAX_LOGIT_BIAS = 300  # entries; OpenAI's limit


class JsonSchemaFormat(Wire):
    """A JSON Schema the answer is held to (OpenAI's `response_format.json_schema`)."""

    name: Annotated[str, Field(min_length=1)] = Field(description="Required, as OpenAI requires it; no effect here")
    schema_: dict[str, Any] = Field(alias="schema", description="The JSON Schema; a keyword it cannot hold is a 400")
    strict: bool | None = Field(None, description="The answer is always held to the schema, as with strict: true")
    description: str | None = Field(None, description="No effect here: the schema alone shapes the answer")


class ResponseFormat(Wire):
    """OpenAI's response_format: text (no constraint), any JSON object, or JSON that fits `json_schema`."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = Field(None, description="Required with type json_schema, only then")


_Choice = Annotated[str, Field(min_length=1)]


class StructuredOutputs(Wire):
    """vLLM's structured_outputs (sent in the OpenAI SDK's `extra_body`): exactly one of its fields."""

    json_: Annotated[dict[str, Any] | str, Says("must be a JSON schema: an object, or its JSON text")] | None = Field(
        None, alias="json", description="A JSON Schema, or its JSON text"
    )
    regex: Annotated[str, Field(min_length=1)] | None = None
    choice: (
        Annotated[
            list[_Choice], Field(min_length=1), Says("must be a non-empty array of non-empty strings", beneath=True)
        ]
        | None
    ) = Field(None, description="The answer is one of these strings")
    grammar: Annotated[str, Field(min_length=1)] | None = Field(None, description="A Lark grammar")
    json_object: bool | None = Field(None, description="true: any JSON object")


_LOGIT_BIAS = (
    f'must map token ids (whole numbers from 0, as strings: {{"1234": -100}}) to numbers between -100 and 100, '
    f"at most {MAX_LOGIT_BIAS} of them"
)


class OutputFields(Wire):
    """What the answer is held to, and what it reports of its tokens."""

    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    logprobs: bool | None = Field(False, description="Each answer token's logprob in `choices[].logprobs`")
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS), INTEGRAL] | None = Field(
        None, description="The likeliest alternatives to list with each token; needs logprobs: true"
    )
    logit_bias: (
        Annotated[
            dict[
                Annotated[str, Field(pattern=r"^(0|[1-9][0-9]*)$")],
                Annotated[float, Field(ge=-100, le=100)],
            ],
            Field(max_length=MAX_LOGIT_BIAS, json_schema_extra={"additionalProperties": False}),
            Says(_LOGIT_BIAS, beneath=True),
        ]
        | None
    ) = Field(None, description="Added to the named tokens' logits; -100 bans a token, 100 all but forces it")


def logprobs(wire: OutputFields) -> int | None:
    """Sampling.logprobs: None when not asked, else how many alternatives each token lists."""
    if wire.logprobs:
        return wire.top_logprobs or 0
    if wire.top_logprobs is not None:  # as OpenAI: alternatives of logprobs nobody asked for are a mistake
        raise InvalidField("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    return None


_SCHEMA_PARAM = "response_format.json_schema.schema"


def constraint(wire: OutputFields) -> Constraint | None:
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
    return Constraint("json_schema", schema_text(form.json_schema.schema_, _SCHEMA_PARAM), _SCHEMA_PARAM)


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
        return Constraint("json_schema", schema_text(sent[name], param), param)
    if name == "choice":
        return Constraint("choice", compact(sent[name]), param)
    if name == "json_object":
        return Constraint("json_object", "", param)
    return Constraint("regex" if name == "regex" else "grammar", str(sent[name]), param)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def schema_text(schema: Any, param: str) -> str:
    """A schema, sent as an object or as its JSON text, as compact JSON text (its keys kept in their order: it is
    the order the answer's properties come in)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema, parse_constant=_no_constant)
        except (ValueError, RecursionError) as exc:
            raise InvalidField(param, f"'{param}' is not valid JSON: {exc}") from exc
        if not isinstance(schema, dict):
            raise InvalidField(param, f"'{param}' must be a JSON schema: an object, or its JSON text")
        if unpaired_surrogate(schema) is not None:
            raise InvalidField(param, f"'{param}' holds an unpaired UTF-16 surrogate, which is not text")
    try:
        return compact(schema)
    except RecursionError as exc:  # nested deeper than the encoder goes
        raise InvalidField(param, f"'{param}' is nested too deeply") from exc
