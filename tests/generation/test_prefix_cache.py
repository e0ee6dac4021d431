"""The prefix cache's store as plain code: which prefix a prompt finds, what it gets back, what is forgotten first.

Keys and values here are made to tell where they came from: a token's entries hold its id and its position, so a
block returned for the wrong ids or at the wrong place shows."""

from __future__ import annotations

import random
from collections import Counter

import torch

from generation.batch import KVBatch, decode_step, prefill
from generation.prefix_cache import Block, KeysValues, PrefixCache, row_kv, tokens_in
from models.loader import LoadedModel

LAYERS, HEADS, DIM, VALUE_DIM = 2, 1, 2, 3  # values of another head size than keys, as some models have
BLOCK = 4


def kv(tokens: list[int]) -> KeysValues:
    """Keys [L, H, T, D] and values [L, H, T, Dv] that say which token at which position they belong to."""
    keys, values = torch.zeros((LAYERS, HEADS, len(tokens), DIM)), torch.zeros((LAYERS, HEADS, len(tokens), VALUE_DIM))
    for pos, token in enumerate(tokens):
        keys[:, :, pos, 0], keys[:, :, pos, 1] = token, pos
        values[:, :, pos, 0], values[:, :, pos, 1] = -token, -pos
    return keys, values


def put(cache: PrefixCache, tokens: list[int]) -> int:
    keys, values = kv(tokens)
    return cache.put(tokens, lambda start, end: (keys[:, :, start:end], values[:, :, start:end]))


def joined(blocks: list[Block]) -> KeysValues | None:
    """What a hit restores: its blocks' keys and values end to end."""
    if not blocks:
        return None
    return torch.cat([b.keys for b in blocks], dim=2), torch.cat([b.values for b in blocks], dim=2)


def same(got: KeysValues | None, want: KeysValues) -> bool:
    return got is not None and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


BLOCK_BYTES = 4 * BLOCK * LAYERS * HEADS * (DIM + VALUE_DIM)


def test_a_prompt_finds_its_longest_cached_prefix_in_whole_blocks() -> None:
    cache = PrefixCache(budget=1 << 20, block=BLOCK)
    history = list(range(100, 111))  # 11 tokens: two whole blocks, and the last 3 as a tail
    assert put(cache, history) == 11
    prompt = [*history, 7, 7, 7, 7, 7]  # the next round: all of the history
    assert same(joined(cache.take(prompt, len(prompt) - 1)), kv(prompt[:11]))
    assert same(joined(cache.take(history, 10)), kv(history[:8]))  # the tail would pass the limit
    other = [*history[:9], 5, 5, 5]  # another ending of the last block: only the whole blocks
    assert same(joined(cache.take(other, len(other) - 1)), kv(other[:8]))
    # a branch after the first block: only that block
    branch = [*history[:5], 1, 2, 3, 4]
    assert same(joined(cache.take(branch, len(branch) - 1)), kv(branch[:4]))
    # the limit keeps the prompt's last token out of the hit: it must be prefilled for its logits
    assert len(cache.take(history[:8], 7)) == 1


def test_the_same_ids_at_other_positions_are_not_a_hit() -> None:
    cache = PrefixCache(budget=1 << 20, block=BLOCK)
    put(cache, [1, 2, 3, 4, 5, 6, 7, 8])
    assert cache.take([5, 6, 7, 8, 9], 4) == []  # the second block's ids, but as a first block
    assert cache.take([9, 2, 3, 4, 5, 6, 7, 8, 0], 8) == []  # a different first block: nothing after it counts


def test_blocks_held_already_are_not_copied_again() -> None:
    cache = PrefixCache(budget=1 << 20, block=BLOCK)
    calls: list[tuple[int, int]] = []
    tokens = list(range(12))
    keys, values = kv(tokens)

    def kv_of(start: int, end: int) -> KeysValues:
        calls.append((start, end))
        return keys[:, :, start:end], values[:, :, start:end]

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
    assert cache.take(a, 8)  # a is used again: now b is the older one
    put(cache, [3] * 4)
    assert len(cache.match(b, 8)) == 1 and len(cache.match(a, 8)) == 2


def test_a_block_over_the_whole_budget_is_not_kept_and_clear_forgets_everything() -> None:
    cache = PrefixCache(budget=BLOCK_BYTES - 1, block=BLOCK)
    assert put(cache, [1] * 8) == 0 and len(cache) == 0
    cache = PrefixCache(budget=1 << 20, block=BLOCK)
    put(cache, [1] * 8)
    assert cache.clear() == 2 * BLOCK_BYTES
    assert len(cache) == 0 and cache.bytes == 0 and cache.take([1] * 9, 8) == []


def test_under_a_small_budget_every_hit_is_exactly_what_was_put() -> None:
    """Random conversations that branch and grow, through a cache of 10 blocks: the budget holds, no block outlives
    its parent, and whatever a prompt finds are its own tokens' entries at their own positions."""
    rng = random.Random(7)
    cache = PrefixCache(budget=10 * BLOCK_BYTES, block=BLOCK)
    seen: list[list[int]] = []
    hits = 0
    for _ in range(400):
        if seen and rng.random() < 0.7:
            base = rng.choice(seen)
            tokens = base[: rng.randrange(len(base) + 1)] + [rng.randrange(4) for _ in range(rng.randrange(1, 10))]
        else:
            tokens = [rng.randrange(4) for _ in range(rng.randrange(1, 20))]
        blocks = cache.take(tokens, len(tokens) - 1)
        hits += bool(blocks)
        assert tokens_in(blocks) <= len(tokens) - 1
        if blocks:
            assert same(joined(blocks), kv(tokens[: tokens_in(blocks)]))
        put(cache, tokens)
        seen.append(tokens)
        held = list(cache._blocks.values())
        assert cache.bytes == sum(b.nbytes for b in held) <= cache.budget
        ids = {block.id for block in held}
        assert all(block.key[0] in ids or block.key[0] == 0 for block in held)  # no block outlives its parent
        assert all(b.children == sum(c.key[0] == b.id for c in held) for b in held)
        tails = Counter((b.key[0], b.size) for b in held if b.size < BLOCK)
        assert tails == Counter(
            {(parent, size): n for parent, sizes in cache._tails.items() for size, n in sizes.items()}
        )
    assert hits > 20


def test_a_batch_rows_kept_keys_and_values_are_a_fresh_prefill_of_what_it_fed(tiny_lm: LoadedModel) -> None:
    """Rows of different lengths, left-padded in one batch, a few decode steps on: the columns `row_kv` takes for a
    row are the keys and values a prompt of exactly the tokens that row fed would get alone."""
    prompts = [list(range(5, 45)), list(range(50, 120))]
    with torch.inference_mode():
        logits, cache, mask = prefill(tiny_lm, prompts)
        batch = KVBatch()
        batch.add(cache, mask, 4)
        fed = [list(p) for p in prompts]
        tokens = [int(t) for t in logits.argmax(-1)]
        for _ in range(3):
            for so_far, token in zip(fed, tokens, strict=True):
                so_far.append(token)
            tokens = [int(t) for t in decode_step(tiny_lm, batch, tokens).argmax(-1)]
        width = batch.cache.layers[0].keys.shape[2]
        for row, tokens_fed in enumerate(fed):
            assert batch.positions[row] == len(tokens_fed)
            keys, values = row_kv(batch.cache, row, width - len(tokens_fed))(0, len(tokens_fed))
            _, alone, _ = prefill(tiny_lm, [tokens_fed])
            want_k = torch.stack([layer.keys[0] for layer in alone.layers])
            want_v = torch.stack([layer.values[0] for layer in alone.layers])
            assert torch.allclose(keys, want_k, atol=1e-5) and torch.allclose(values, want_v, atol=1e-5)
