"""Fitting a conversation into the context: the oldest rounds go first, found in O(log n) encodings."""

from __future__ import annotations

from collections.abc import Sequence

from models.chat_format import ChatFormat, Message


class PromptTooLong(Exception):
    """The prompt alone does not fit the model's context."""

    def __init__(self, prompt_tokens: int, context_length: int) -> None:
        super().__init__(
            f"This model's maximum context length is {context_length} tokens; the prompt has {prompt_tokens} tokens."
        )
        self.prompt_tokens = prompt_tokens
        self.context_length = context_length


def drop_counts(n: int) -> list[int]:
    """How many leading messages may go, fewest first: whole user/assistant rounds, never the last message."""
    counts, dropped = [0], 0
    while n - dropped > 1:
        dropped += 2 if n - dropped > 2 else 1  # a whole round, so the chat still alternates
        counts.append(dropped)
    return counts


def fit_chat(
    chat: ChatFormat, messages: Sequence[Message], context_length: int, reserve: int, budget: int | None = None
) -> tuple[list[int], int]:
    """Encode the chat, dropping the oldest user/assistant rounds until prompt + reserve fits, and the prompt is
    at most `budget` tokens unless it has no history left.

    Returns the ids and how many leading non-system messages were dropped. The system message
    and the last message are never dropped; if they alone exceed the context, PromptTooLong.

    The result is the fewest rounds dropped, found without encoding the conversation once per round, nor all of
    it when it does not fit: the kept part doubles from the newest round back until it no longer fits, then a
    binary search, so no encoding is much more than twice what fits (O(c log n) for n messages of which c fit). A
    3000-round history whose newest 2048 tokens are kept took 0.27 s when the whole conversation was encoded first,
    nearly all of it that one encoding (bench/README.md).
    """
    system = [m for m in messages[:1] if m.role == "system"]
    rest = list(messages[len(system) :])
    counts = drop_counts(len(rest))
    encoded: dict[int, list[int]] = {}
    last = len(counts) - 1  # every droppable message dropped

    def fits(k: int) -> bool:  # counts[k] messages dropped
        encoded[k] = chat.encode(system + rest[counts[k] :])
        within = budget is None or len(encoded[k]) <= budget or k == last  # the query stays anyway
        return within and len(encoded[k]) + reserve <= context_length

    if last == 0 or not fits(last):
        best = last  # nothing to drop, or the query alone leaves no room (PromptTooLong below where it does not fit)
    else:
        # counts[last] fits: gallop towards fewer dropped until one does not fit, then bisect between the two
        fit, step, lo = last, 1, -1
        while fit > 0:
            k = max(fit - step, 0)
            if not fits(k):
                lo = k
                break
            fit, step = k, step * 2
        while lo >= 0 and fit - lo > 1:
            mid = (lo + fit) // 2
            if fits(mid):
                fit = mid
            else:
                lo = mid
        best = fit
    ids = encoded[best] if best in encoded else chat.encode(system + rest[counts[best] :])
    if len(ids) >= context_length:
        raise PromptTooLong(len(ids), context_length)
    return ids, counts[best]
