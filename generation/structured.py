"""What a request asks its answer's shape to be, as plain data: it travels from the doors through the backends (an
upstream passes it on) to the prompt thread, where `generation.constraints` compiles it. No torch, no grammar
library here: the upstream proxy imports neither."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]


@dataclass(frozen=True)
class Constraint:
    """What a request asks its answer to be. `source`: the schema as JSON text, the regex, the grammar, or the
    choices as a JSON array; `param`: the request field it came from, for errors."""

    kind: Kind
    source: str
    param: str
