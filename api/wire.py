"""The validation machinery every request body shares (api/schema.py and the field groups it is built from): JSON's
own types strictly (`Wire`, `STRICT`), whole floats as integers (`INTEGRAL`), a field's refusal in its own words
(`Says`), and pydantic's first error turned into the `InvalidField` the doors report (`validate`). Kept apart from the
bodies so each group of fields can use it without importing the others."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    GetCoreSchemaHandler,
    ValidationError,
    ValidatorFunctionWrapHandler,
)
from pydantic_core import CoreSchema, PydanticCustomError, core_schema

from backends.base import InvalidField

NO_EFFECT = "Accepted, without effect here"  # a field's description where clients send it and nothing changes
INT_MAX = 2**63 - 1  # the ceiling of every integer field without its own (a seed's range)
INT_MIN = -(2**63)


def unpaired_surrogate(body: dict[str, Any]) -> str | None:
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


def compact(value: Any) -> str:
    """JSON text without spaces, its keys in their order (a tool's parameters, a schema, a choice's strings)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


# ---- the wire: what a body may hold --------------------------------------------------------------------------------


def _integral(value: Any) -> Any:
    """3.0 is the integer 3, as JSON Schema counts it; 3.5, true and "3" stay what they are and are refused."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


# After the bounds in an integer's Annotated[...]: pydantic then checks and publishes them on the integer itself.
INTEGRAL = BeforeValidator(_integral)


@dataclass(frozen=True)
class Says:
    """In an Annotated[...]: a value refused at this place is refused with `predicate` ("must be ..."), however
    pydantic put it. With `beneath`, so is a value refused for what it holds (a pair's strings), unless an inner
    Says already said why or a field is missing: those keep their own, nearer place."""

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
STRICT = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")


class Wire(BaseModel):
    model_config = STRICT


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


def validate(model: type[_W], body: dict[str, Any]) -> _W:
    """The body as `model`, checked; its first error as an InvalidField."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise _invalid(model, exc) from exc
