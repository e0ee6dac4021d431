"""The wire of `POST /tokenize` and `POST /detokenize`:
its request bodies (pydantic models that check them and are published as they are),
its answers' schemas and its /openapi.json paths."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

BODIES: dict[str, type[BaseModel]] = {}  # request bodies under their /openapi.json names
SCHEMAS: dict[str, Any] = {}  # answers' schemas under their names
PATHS: dict[str, Any] = {}  # /openapi.json paths
