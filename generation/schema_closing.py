"""A JSON schema's objects closed to the properties they name, unless the schema says otherwise."""

from __future__ import annotations

from typing import Any

# keywords whose value is a map of names to schemas, a list of schemas, or one schema. Never `not` or `if`: closing
# an object there would widen what counts as valid, not narrow it (llguidance refuses both today anyway)
_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_ONES = ("items", "additionalProperties", "additionalItems", "unevaluatedProperties", "unevaluatedItems", "contains")
_OPEN_BY_CHOICE = ("additionalProperties", "patternProperties", "unevaluatedProperties")


def closed(schema: Any) -> Any:
    """`schema` with `additionalProperties: false` on every object that names its properties and says nothing of
    others. JSON Schema allows any other property there, and a small model fills that freedom with invented keys
    until `max_tokens`; llama.cpp's grammars and xgrammar's strict mode (vLLM's default) generate only the named
    properties too. Every answer stays valid against the schema as written.

    Left as written: a schema where an object's keys come from more than one place (`allOf`, `anyOf`, `oneOf` or
    `$ref` beside `properties` or `required`, the usual discriminated union), where closing one part would forbid
    the other's keys; and an object whose `required`, `minProperties`, `dependentRequired`, `const` or `enum` asks for
    keys it does not name."""
    if _merges(schema):
        return schema
    return _close(schema)


def _merges(node: Any) -> bool:
    """Whether some object of the schema takes its keys from more than one place. Every value is searched, not only
    the keywords this module closes under: a `$ref` may point anywhere (`#/components/schemas/…`), and a false
    alarm only leaves the schema as written."""
    if isinstance(node, list):
        return any(_merges(item) for item in node)
    if not isinstance(node, dict):
        return False
    if "allOf" in node:
        return True
    names_keys = "properties" in node or "required" in node
    if names_keys and any(k in node for k in ("anyOf", "oneOf", "$ref")):
        return True
    return any(_merges(value) for value in node.values())


def _wants_unnamed(node: dict[str, Any], named: dict[str, Any]) -> bool:
    """Whether the object asks for keys beyond those it names (closing it would make it unsatisfiable)."""
    required = node.get("required", [])
    if isinstance(required, list) and any(name not in named for name in required):
        return True
    if isinstance(node.get("minProperties"), int) and node["minProperties"] > len(named):
        return True
    # a `const` or `enum` object may carry keys the object does not name
    return any(k in node for k in ("dependentRequired", "const", "enum"))


def _close(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    out = dict(node)
    for key in _MAPS:
        if isinstance(value := node.get(key), dict):
            out[key] = {name: _close(child) for name, child in value.items()}
    for key in _LISTS:
        if isinstance(value := node.get(key), list):
            out[key] = [_close(child) for child in value]
    for key in _ONES:
        if isinstance(value := node.get(key), dict):
            out[key] = _close(value)
    named = node.get("properties")
    if isinstance(named, dict) and named and not any(k in node for k in _OPEN_BY_CHOICE):
        if not _wants_unnamed(node, named):
            out["additionalProperties"] = False
    return out
