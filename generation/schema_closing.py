"""A JSON schema's objects closed to the properties they name, unless the schema says otherwise."""

from __future__ import annotations

from typing import Any

# keywords whose value is a map of names to schemas, a list of schemas, or one schema
_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_ONES = (
    "items",
    "additionalProperties",
    "additionalItems",
    "unevaluatedProperties",
    "unevaluatedItems",
    "not",
    "contains",
    "propertyNames",
    "if",
    "then",
    "else",
)
_OPEN_BY_CHOICE = ("additionalProperties", "patternProperties", "unevaluatedProperties")


def closed(schema: Any) -> Any:
    """`schema` with `additionalProperties: false` on every object that names its properties and says nothing of
    others. JSON Schema allows any other property there, and a small model fills that freedom with invented keys
    until `max_tokens`; llama.cpp's grammars and xgrammar's strict mode (vLLM's default) generate only the named
    properties too. Every answer stays valid against the schema as written. A schema that merges subschemas
    (`allOf`, or `$ref` beside `properties`) is left as written: closing one part would forbid the other's keys."""
    if _merges(schema):
        return schema
    return _close(schema)


def _subschemas(node: dict[str, Any]) -> list[Any]:
    found: list[Any] = []
    for key in _MAPS:
        if isinstance(value := node.get(key), dict):
            found.extend(value.values())
    for key in _LISTS:
        if isinstance(value := node.get(key), list):
            found.extend(value)
    for key in _ONES:
        if isinstance(value := node.get(key), dict):
            found.append(value)
    return found


def _merges(node: Any) -> bool:
    if not isinstance(node, dict):
        return False
    if "allOf" in node or ("$ref" in node and "properties" in node):
        return True
    return any(_merges(child) for child in _subschemas(node))


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
    if isinstance(node.get("properties"), dict) and node["properties"] and not any(k in node for k in _OPEN_BY_CHOICE):
        out["additionalProperties"] = False
    return out
