"""The server's ceilings on prompt and answer length, checked by every backend."""

from __future__ import annotations

from backends.base import InvalidField, Limits


def check_limits(limits: Limits, max_tokens: int | None, prompt_tokens: int, prompt_param: str) -> None:
    """The server's ceilings on answer and prompt length: 400 naming the limit."""
    if max_tokens is not None and max_tokens > limits.max_tokens_limit:
        raise InvalidField(
            "max_tokens", f"'max_tokens' is {max_tokens}; this server allows at most {limits.max_tokens_limit}"
        )
    if limits.max_prompt_tokens is not None and prompt_tokens > limits.max_prompt_tokens:
        raise InvalidField(
            prompt_param,
            f"the prompt has {prompt_tokens} tokens; this server allows at most {limits.max_prompt_tokens}",
        )
