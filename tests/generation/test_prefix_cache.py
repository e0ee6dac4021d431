"""The prefix cache's store as plain code: which prefix a prompt finds, what it gets back, what is forgotten first.

Keys and values here are made to tell where they came from: a token's entries hold its id and its position, so a
block returned for the wrong ids or at the wrong place shows."""

from __future__ import annotations

import random

import torch

from generation.prefix_cache import PrefixCache

LAYERS, HEADS, DIM = 2, 1, 2
BLOCK = 4


def kv(tokens: list[int]) -> torch.Tensor:
    """Keys and values [2, L, H, T, D] that say which token at which position they belong to."""
    out = torch.zeros((2, LAYERS, HEADS, len(tokens), DIM))
    for pos, token in enumerate(tokens):
        out[0, :, :, pos, 0] = token
        out[0, :, :, pos, 1] = pos
        out[1, :, :, pos, 0] = -token
        out[1, :, :, pos, 1] = -pos
    return out


def put(cache: PrefixCache, tokens: list[int]) -> int:
    full = kv(tokens)
    return cache.put(tokens, lambda start, end: full[:, :, :, start:end])


BLOCK_BYTES = kv([0] * BLOCK).numel() * 4


def test_a_prompt_finds_its_longest_cached_prefix_in_whole_blocks() -> None:
    cache = PrefixCache(budget=1 << 20, block=BLOCK)
    history = list(range(100, 111))  # 11 tokens: two whole blocks kept, the last 3 tokens not
    assert put(cache, history) == 8
    prompt = [*history, 7, 7, 7, 7, 7]
    got = cache.take(prompt, len(prompt) - 1)
    assert got is not None and torch.equal(got, kv(prompt[:8]))
    # a branch after the first block: only that block
    branch = [*history[:5], 1, 2, 3, 4]
    got = cache.take(branch, len(branch) - 1)
    assert got is not None and torch.equal(got, kv(branch[:4]))
    # the limit keeps the prompt's last token out of the hit: it must be prefilled for its logits
    got = cache.take(history[:8], 7)
    assert got is not None and got.shape[3] == 4
    assert (cache.hit_tokens, cache.query_tokens) == (16, len(prompt) + len(branch) + 8)


def test_the_same_ids_at_other_positions_are_not_a_hit() -> None:
    cache = PrefixCache(budget=1 << 20, block=BLOCK)
    put(cache, [1, 2, 3, 4, 5, 6, 7, 8])
    assert cache.take([5, 6, 7, 8, 9], 4) is None  # the second block's ids, but as a first block
    assert cache.take([9, 2, 3, 4, 5, 6, 7, 8, 0], 8) is None  # a different first block: nothing after it counts


def test_blocks_held_already_are_not_copied_again() -> None:
    cache = PrefixCache(budget=1 << 20, block=BLOCK)
    calls: list[tuple[int, int]] = []
    tokens = list(range(12))
    full = kv(tokens)

    def kv_of(start: int, end: int) -> torch.Tensor:
        calls.append((start, end))
        return full[:, :, :, start:end]

    assert cache.put(tokens[:8], kv_of) == 8
    assert cache.put(tokens, kv_of) == 4  # only the third block is new
    assert cache.put(tokens, kv_of) == 0
    assert calls == [(0, 8), (8, 12)]
    assert len(cache) == 3 and cache.bytes == 3 * BLOCK_BYTES


def test_the_least_recently_used_blocks_go_first_and_never_a_parent_before_its_child() -> None:
    cache = PrefixCache(budget=4 * BLOCK_BYTES, block=BLOCK)
    a = [1] * 12  # three blocks
    b = [2] * 8  # two blocks
    put(cache, a)
    put(cache, b)  # one block over: a's last block goes (its least recently used leaf)
    assert cache.bytes <= cache.budget and len(cache) == 4
    assert len(cache.match(a, 12)) == 2 and len(cache.match(b, 8)) == 2
    assert cache.take(a, 8) is not None  # a is used again: now b is the older one
    put(cache, [3] * 4)
    assert len(cache.match(b, 8)) == 1 and len(cache.match(a, 8)) == 2


def test_a_block_over_the_whole_budget_is_not_kept_and_clear_forgets_everything() -> None:
    cache = PrefixCache(budget=BLOCK_BYTES - 1, block=BLOCK)
    assert put(cache, [1] * 8) == 0 and len(cache) == 0
    cache = PrefixCache(budget=1 << 20, block=BLOCK)
    put(cache, [1] * 8)
    assert cache.clear() == 2 * BLOCK_BYTES
    assert len(cache) == 0 and cache.bytes == 0 and cache.take([1] * 9, 8) is None


def test_under_a_small_budget_every_hit_is_exactly_what_was_put() -> None:
    """Random conversations that branch and grow, through a cache of 10 blocks: the budget holds, no block outlives
    its parent, and whatever a prompt finds are its own tokens' entries at their own positions."""
    rng = random.Random(7)
    cache = PrefixCache(budget=10 * BLOCK_BYTES, block=BLOCK)
    seen: list[list[int]] = []
    for _ in range(400):
        if seen and rng.random() < 0.7:
            base = rng.choice(seen)
            tokens = base[: rng.randrange(len(base) + 1)] + [rng.randrange(4) for _ in range(rng.randrange(1, 10))]
        else:
            tokens = [rng.randrange(4) for _ in range(rng.randrange(1, 20))]
        got = cache.take(tokens, len(tokens) - 1)
        if got is not None:
            assert got.shape[3] % BLOCK == 0 and got.shape[3] <= len(tokens) - 1
            assert torch.equal(got, kv(tokens[: got.shape[3]]))
        put(cache, tokens)
        seen.append(tokens)
        assert cache.bytes <= cache.budget
        ids = {block.id for block in cache._blocks.values()}
        assert all(block.key[0] in ids or block.key[0] == 0 for block in cache._blocks.values())
    assert cache.hit_tokens > 0
