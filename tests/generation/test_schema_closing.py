"""Objects that name their properties get only those, unless the schema says otherwise; every answer stays valid
against the schema as the user wrote it."""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonschema
import pytest

from generation.constraints import grammars_for
from generation.schema_closing import closed
from generation.structured import Constraint
from models.loader import LoadedModel

POINT = {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}


def test_every_object_that_names_its_properties_is_closed() -> None:
    schema = {
        "$defs": {"point": POINT},
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "points": {"type": "array", "items": {"$ref": "#/$defs/point"}},
            "either": {"anyOf": [POINT, {"type": "null"}]},
            "pair": {"type": "array", "prefixItems": [POINT, POINT]},
        },
    }
    before = copy.deepcopy(schema)
    out = closed(schema)
    assert schema == before  # the request's own schema is not changed
    assert out["additionalProperties"] is False
    assert out["$defs"]["point"]["additionalProperties"] is False
    assert out["properties"]["either"]["anyOf"][0]["additionalProperties"] is False
    assert out["properties"]["pair"]["prefixItems"][1]["additionalProperties"] is False
    assert "additionalProperties" not in out["properties"]["name"]  # not an object with properties
    # a property named like a keyword is a name, not a keyword
    named = closed({"type": "object", "properties": {"properties": POINT}})
    assert named["properties"]["properties"]["additionalProperties"] is False


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object"},  # any object: nothing named, nothing to close
        {"type": "object", "properties": {"a": {}}, "additionalProperties": True},
        {"type": "object", "properties": {"a": {}}, "additionalProperties": {"type": "integer"}},
        {"type": "object", "properties": {"a": {}}, "patternProperties": {"^x-": {}}},
        {"allOf": [POINT, {"properties": {"y": {"type": "number"}}}]},  # closing one part would forbid the other's
        {"$defs": {"p": POINT}, "$ref": "#/$defs/p", "properties": {"y": {}}},
        {  # a discriminated union: the branch's keys and the parent's are one object
            "properties": {"kind": {"type": "string"}},
            "required": ["kind", "x"],
            "oneOf": [{"properties": {"x": {"type": "number"}}, "required": ["x"]}],
        },
        {"properties": {"a": {}}, "anyOf": [{"$ref": "#/$defs/ext"}], "$defs": {"ext": POINT}},
        {"type": "object", "properties": {"name": {}}, "required": ["name", "id"]},  # "id" is asked for, not named
        {"type": "object", "properties": {"a": {}}, "required": ["a"], "minProperties": 2},
        {  # a union under a key no keyword names, reached by `$ref` (OpenAPI's components)
            "$defs": {"base": POINT},
            "components": {
                "x": {"properties": {"kind": {}}, "required": ["kind"], "oneOf": [{"$ref": "#/$defs/base"}]}
            },
            "$ref": "#/components/x",
        },
        {"type": "object", "properties": {"a": {}}, "const": {"a": 1, "b": 2}},
    ],
    ids=[
        "any-object",
        "open",
        "typed-extras",
        "pattern",
        "all-of",
        "ref-beside-properties",
        "one-of-beside-properties",
        "any-of-ref-beside-properties",
        "required-unnamed",
        "min-properties",
        "union-under-components",
        "const-object",
    ],
)
def test_what_the_schema_says_of_other_properties_is_kept(schema: dict[str, Any], tiny_lm: LoadedModel) -> None:
    assert closed(schema) == schema
    compiles(tiny_lm, schema)  # still a schema the server takes


def compiles(lm: LoadedModel, schema: dict[str, Any]) -> Any:
    grammars = grammars_for(lm.tokenizer, tuple(sorted(lm.eos_token_ids)))
    return grammars.compile(Constraint("json_schema", json.dumps(schema), "response_format"))


def accepts(lm: LoadedModel, schema: dict[str, Any], document: str) -> bool:
    """Whether the compiled constraint lets an answer be exactly `document`."""
    matcher = compiles(lm, schema).matcher()
    ids = lm.tokenizer.encode(document, add_special_tokens=False)
    return bool(matcher.ll.try_consume_tokens(ids) == len(ids) and matcher.ll.is_accepting())


def test_the_answer_holds_only_the_named_properties(tiny_lm: LoadedModel) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "array", "items": POINT}}}
    assert accepts(tiny_lm, schema, '{"a":1,"b":[{"x":2}]}')
    jsonschema.validate({"a": 1, "zz": 2}, schema)  # JSON Schema would allow these ...
    assert not accepts(tiny_lm, schema, '{"a":1,"zz":2}')  # ... the answer does not get them
    assert not accepts(tiny_lm, schema, '{"a":1,"b":[{"x":2,"y":3}]}')
    opened = {**schema, "additionalProperties": True}
    assert accepts(tiny_lm, opened, '{"a":1,"zz":2}')  # where the schema asks for them, they may come


def test_a_discriminated_union_still_takes_its_own_answers(tiny_lm: LoadedModel) -> None:
    union = {
        "type": "object",
        "properties": {"kind": {"const": "circle"}},
        "required": ["kind", "r"],
        "oneOf": [{"properties": {"r": {"type": "number"}}, "required": ["r"]}],
    }
    assert accepts(tiny_lm, union, '{"kind":"circle","r":2}')
