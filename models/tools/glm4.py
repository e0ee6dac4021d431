"""GLM-4-9B-chat and GLM-4-0414: tools in a `# 可用工具` system turn, byte for byte the official chat template's
(as transformers renders it); a call is the segment `name\\n{json arguments}`; results come back as observation
turns (spec glm-tools.md, section 3)."""

from __future__ import annotations

import json
from collections.abc import Sequence

from models.tools.base import CallStream, SegmentCalls, Tool, json_arguments, loads
from models.tools.grammar import json_rule, one_of

NAME = "glm4"
SELF = (
    "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。"
)
SUFFIX = "在调用上述函数时，请使用 Json 格式表示调用的参数。"


def system_turn(tools: Sequence[Tool]) -> str:
    """The content of the tools' system turn (one newline before each `##`: transformers trims the template's
    blocks)."""
    sections = "".join(
        f"\n## {tool.name}\n\n{json.dumps(tool.function(), ensure_ascii=False, indent=4)}\n{SUFFIX}" for tool in tools
    )
    return f"{SELF}\n\n# 可用工具{sections}"


def parse_body(name: str, body: str) -> str | None:
    """A call's arguments: the body is one JSON object (compact or over several lines)."""
    try:
        value = loads(body.strip())
    except ValueError:
        return None
    return json_arguments(value)


class Glm4Format:
    name = NAME
    markers: tuple[str, ...] = ()  # its calls are plain text between role tokens

    def __init__(self, assistant: int) -> None:
        self.assistant = assistant  # the role token that starts each segment

    def calls(self, tools: Sequence[Tool]) -> CallStream:
        return SegmentCalls([t.name for t in tools], parse_body, self.assistant)

    def forced(self, tools: Sequence[Tool]) -> str:
        return one_of([f"{json.dumps(t.name + chr(10))} {json_rule(t.schema())}" for t in tools])
