"""The tool-call formats by name (`--tool-call-parser`), and the one a Hugging Face chat template implies."""

from __future__ import annotations

from typing import Any

from models.tools.base import ToolFormat
from models.tools.hermes import HermesFormat
from models.tools.llama3 import Llama3Format
from models.tools.mistral import MistralFormat

# the formats a Hugging Face model may be told to use; ChatGLM3 and GLM-4 bring their own (models/chatglm)
TEMPLATE_FORMATS: dict[str, type[HermesFormat] | type[Llama3Format] | type[MistralFormat]] = {
    "hermes": HermesFormat,
    "llama3_json": Llama3Format,
    "mistral": MistralFormat,
}
PARSER_NAMES = ("chatglm3", "glm4", *TEMPLATE_FORMATS)


def from_template(template: str) -> ToolFormat | None:
    """The call format a chat template's own text shows, or None."""
    if "<tool_call>" in template:
        return HermesFormat()
    if "[TOOL_CALLS]" in template:
        return MistralFormat()
    if "<|python_tag|>" in template or "ipython" in template:
        return Llama3Format()
    return None


def by_name(name: str, own: dict[str, Any]) -> ToolFormat | None:
    """A format by its name: one of the model family's own (`own`), or a template format."""
    if name in own:
        return own[name]  # type: ignore[no-any-return]
    kind = TEMPLATE_FORMATS.get(name)
    return kind() if kind is not None else None
