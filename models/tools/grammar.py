"""Pieces of the Lark grammars (llguidance's dialect) that force a call."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any


def json_rule(schema: dict[str, Any]) -> str:
    """A JSON value held to `schema`, spaced as Python's `json.dumps` spaces it (`", "`, `": "`): the way these models
    saw calls in training and see them in their history. Fixed, not free: a small model free to choose whitespace
    can fill its answer with it."""
    spacing = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    held = {**schema, "x-guidance": spacing}
    return f"%json {json.dumps(held, ensure_ascii=False)}"


def split_defs(schema: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A schema without its `$defs`/`definitions`, and those: a schema placed inside another keeps its references
    resolvable only when they stand at the top of the outer one."""
    defs: dict[str, Any] = {k: schema[k] for k in ("$defs", "definitions") if k in schema}
    return {k: v for k, v in schema.items() if k not in defs}, defs


def one_of(alternatives: Sequence[str]) -> str:
    """A grammar whose answer is one of the alternatives (each a sequence of Lark items)."""
    rules = [f"call{i}: {alt}" for i, alt in enumerate(alternatives)]
    return "\n".join([f"start: {' | '.join(f'call{i}' for i in range(len(alternatives)))}", *rules])
