"""The pieces /openapi.json is written with (api/openapi.py), shared by each door's own entries: a reference to a
schema, a JSON body, a door's error answers, one operation."""

from __future__ import annotations

from typing import Any

REF = "#/components/schemas/{model}"


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def errors(*statuses: int, schema: str = "Error") -> dict[str, Any]:
    """Error answers of these statuses, in the shape of the door's error schema (OpenAI's `Error` unless named)."""
    return {str(s): {"description": "error", **json_content(ref(schema))} for s in statuses}


def op(summary: str, responses: dict[str, Any], body: str | None = None, *, open_: bool = False) -> dict[str, Any]:
    """One operation; `body`: its request body's schema name; `open_`: no API key, even when the server has one."""
    out: dict[str, Any] = {"summary": summary, "responses": responses}
    if body:
        out["requestBody"] = {"required": True, **json_content(ref(body))}
    if open_:
        out["security"] = []
    return out
