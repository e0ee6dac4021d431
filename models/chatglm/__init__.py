"""Native ChatGLM: the original checkpoints served without their remote code (which only runs on old transformers).

`family` tells from a `config.json` which of our native implementations a checkpoint needs, if any.
"""

from __future__ import annotations

from typing import Any

GLM_V1 = "ChatGLM-6B"
GLM_V2 = "ChatGLM2-6B/ChatGLM3-6B/GLM-4-9B-chat (original layout)"


def family(config: dict[str, Any]) -> str | None:
    """GLM_V1 for ChatGLM-6B's layout, GLM_V2 for its successors' (multi-query attention), else None."""
    if config.get("model_type") != "chatglm":
        return None
    return GLM_V2 if "multi_query_attention" in config else GLM_V1
