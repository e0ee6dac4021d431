"""The prefix cache: keys and values of tokens computed for earlier requests, kept for later ones whose prompt starts
with the same tokens, so that only the rest of a prompt is prefilled (a conversation resends its whole history every
round; a system prompt is shared by every conversation).

Kept in blocks of `BLOCK` tokens. A block is named by its parent block and its own token ids, so a chain of blocks
from the prompt's start names a prefix: the same ids at the same positions, nothing else (the name holds the ids
themselves, not a hash of them, so two prefixes never share a block by collision). One prefix cache belongs to one
engine, hence to one model and dtype. Chains rather than a radix tree over tokens: the batch's cache is one contiguous
buffer per layer (generation/kv_cache.py), not pages, so a hit is copied out of the store anyway; a dict of blocks
finds a prompt's longest cached prefix with one lookup per block and forgets the least recently used block without a
tree to rebalance, and a tree's token granularity would save at most `BLOCK - 1` tokens of prefill.

Blocks are copied in when a request leaves the batch (its prompt and its answer: a conversation's next round starts
with both) and when a prompt cancelled mid-prefill is dropped (its finished chunks); they are copied out into a new
request's own cache. A running request never holds a block, so evicting one can never hurt a request; the store stays
within its byte budget by forgetting the least recently used blocks, a block's descendants before it.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import count
from typing import Any

import torch
from transformers.cache_utils import DynamicCache

from generation.kv_cache import new_cache
from generation.prepare import kv_bytes_per_token
from models.devices import free_memory
from models.loader import LoadedModel

log = logging.getLogger(__name__)

BLOCK = 32  # tokens per block: a hit is a whole number of blocks
GROUP = 16  # blocks copied out of a row at a time: the copy's transient memory stays small whatever the row's length

Key = tuple[int, tuple[int, ...]]  # (parent block's id, 0 for a prompt's first block; the block's token ids)
KeysValues = tuple[torch.Tensor, torch.Tensor]  # keys [L, H, T, Dk] and values [L, H, T, Dv] of T tokens, all layers


@dataclass(eq=False)
class Block:
    """The keys and values of one block of tokens, after its parent's."""

    id: int
    key: Key
    keys: torch.Tensor  # [L, H, BLOCK, Dk]
    values: torch.Tensor  # [L, H, BLOCK, Dv]
    children: int = 0  # blocks cached after this one (it is forgotten only after them)

    @property
    def size(self) -> int:
        """Its tokens: `BLOCK`, fewer for a tail (the end of a prompt that filled no whole block)."""
        return len(self.key[1])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))


class PrefixCache:
    """Blocks of computed keys and values by token prefix, least recently used first, within `budget` bytes.
    Used by the engine's worker thread only (the counters may be read from anywhere)."""

    def __init__(self, budget: int, block: int = BLOCK) -> None:
        self.budget = budget
        self.block = block
        self._blocks: OrderedDict[Key, Block] = OrderedDict()  # least recently used first
        self._by_id: dict[int, Block] = {}
        self._tails: dict[int, Counter[int]] = {}  # a block's id: the sizes of the tails kept after it
        self._ids = count(1)
        self.bytes = 0
        self.hit_tokens = 0  # prompt tokens served from the cache
        self.query_tokens = 0  # prompt tokens of the requests that looked

    def __len__(self) -> int:
        return len(self._blocks)

    def match(self, tokens: Sequence[int], limit: int, tail: bool = True) -> list[Block]:
        """The blocks of the longest cached prefix of `tokens` no longer than `limit` tokens (read only): whole
        blocks, then (`tail`) the longest tail after the last of them that the tokens go on with."""
        found: list[Block] = []
        parent = 0
        for start in range(0, limit - self.block + 1, self.block):
            block = self._blocks.get((parent, tuple(tokens[start : start + self.block])))
            if block is None:
                break
            found.append(block)
            parent = block.id
        start = len(found) * self.block
        for size in sorted(self._tails.get(parent, ()), reverse=True) if tail else ():
            if start + size <= limit and (block := self._blocks.get((parent, tuple(tokens[start : start + size])))):
                found.append(block)
                break
        return found

    def take(self, tokens: Sequence[int], limit: int) -> list[Block]:
        """The blocks of the longest cached prefix of `tokens` no longer than `limit` tokens, marked used. Their
        tensors are the store's: copy them (`restored`), never write into them."""
        blocks = self.match(tokens, limit)
        self._touch(blocks)
        return blocks

    def counted(self, prompt: int, hit: int) -> None:
        """A prompt of `prompt` tokens looked, and `hit` of them were served."""
        self.query_tokens += prompt
        self.hit_tokens += hit

    def put(self, tokens: Sequence[int], kv_of: Callable[[int, int], KeysValues]) -> int:
        """Keep the whole blocks of `tokens`, whose keys and values from token `start` to `end` `kv_of(start, end)`
        gives: the blocks not held yet are copied in, as far as the budget allows after forgetting others. Returns
        the tokens added."""
        end = len(tokens) // self.block * self.block
        chain = self.match(tokens, end, tail=False)
        self._touch(chain)  # the prefix the new blocks hang on is the last thing to forget
        keep = {b.id for b in chain}
        added = 0
        for group in range(len(chain) * self.block, end, GROUP * self.block):
            keys, values = kv_of(group, min(end, group + GROUP * self.block))
            for offset in range(0, keys.shape[2], self.block):
                at = group + offset
                # a copy of its own, so the group's copy is freed once its blocks are taken
                k = keys[:, :, offset : offset + self.block].clone()
                v = values[:, :, offset : offset + self.block].clone()
                if not self._append(chain, keep, tokens[at : at + self.block], k, v):
                    self._touch(chain)
                    return added
                added += self.block
        added += self._put_tail(tokens, end, chain, kv_of, keep)
        self._touch(chain)
        return added

    def _append(
        self, chain: list[Block], keep: set[int], tokens: Sequence[int], keys: torch.Tensor, values: torch.Tensor
    ) -> bool:
        """Keep `tokens`' keys and values as a block after the chain's last, if the budget makes room for it."""
        parent = chain[-1] if chain else None
        block = Block(next(self._ids), (parent.id if parent else 0, tuple(tokens)), keys, values)
        if not self._make_room(block.nbytes, keep):
            return False
        self._blocks[block.key] = block
        self._by_id[block.id] = block
        self.bytes += block.nbytes
        if parent is not None:
            parent.children += 1
        if block.size < self.block:
            self._tails.setdefault(block.key[0], Counter())[block.size] += 1
        chain.append(block)
        keep.add(block.id)
        return True

    def _put_tail(
        self,
        tokens: Sequence[int],
        end: int,
        chain: list[Block],
        kv_of: Callable[[int, int], KeysValues],
        keep: set[int],
    ) -> int:
        """Keep the tokens after the last whole block as a tail: the next round of a conversation starts with them
        (its last answer's end), and a prompt ends on one as often as not. A tail is a leaf: nothing hangs after it."""
        if end == len(tokens) or (chain[-1].id if chain else 0, tuple(tokens[end:])) in self._blocks:
            return 0
        keys, values = kv_of(end, len(tokens))
        return len(tokens) - end if self._append(chain, keep, tokens[end:], keys, values) else 0

    def clear(self) -> int:
        """Forget every block; returns the bytes freed."""
        freed = self.bytes
        self._blocks.clear()
        self._by_id.clear()
        self._tails.clear()
        self.bytes = 0
        return freed

    def describe(self) -> dict[str, int]:
        return {
            "budget_bytes": self.budget,
            "bytes": self.bytes,
            "blocks": len(self._blocks),
            "block_tokens": self.block,
            "hit_tokens": self.hit_tokens,
            "query_tokens": self.query_tokens,
        }

    def _touch(self, chain: list[Block]) -> None:
        # the chain's first block ends up the most recent: a block is always forgotten before its parent
        for block in reversed(chain):
            self._blocks.move_to_end(block.key)

    def _make_room(self, nbytes: int, keep: set[int]) -> bool:
        """Forget least recently used leaf blocks (not in `keep`) until `nbytes` more fit; False if they cannot. The
        least recently used block is nearly always a leaf (`_touch`): the scan past parents is short."""
        if nbytes > self.budget:
            return False
        while self.bytes + nbytes > self.budget:
            victim = next((b for b in self._blocks.values() if not b.children and b.id not in keep), None)
            if victim is None:
                return False
            del self._blocks[victim.key]
            del self._by_id[victim.id]
            self.bytes -= victim.nbytes
            if victim.size < self.block:
                sizes = self._tails[victim.key[0]]
                sizes[victim.size] -= 1
                if not sizes[victim.size]:
                    del sizes[victim.size]
                    if not sizes:
                        del self._tails[victim.key[0]]
            if (parent := self._by_id.get(victim.key[0])) is not None:
                parent.children -= 1
        return True


def row_kv(cache: Any, row: int, first: int) -> Callable[[int, int], KeysValues]:
    """`kv_of` for `PrefixCache.put` over one row of a cache [B, H, T, D] per layer whose token 0 is column `first`
    (rows are left-padded)."""

    def kv_of(start: int, end: int) -> KeysValues:
        layers = cache.layers
        out = []
        for name in ("keys", "values"):
            like: torch.Tensor = getattr(layers[0], name)
            t = like.new_empty((len(layers), like.shape[1], end - start, like.shape[3]))
            for i, layer in enumerate(layers):
                t[i] = getattr(layer, name)[row, :, first + start : first + end]
            out.append(t)
        return out[0], out[1]

    return kv_of


def tokens_in(blocks: list[Block]) -> int:
    """The tokens a chain of blocks holds."""
    return sum(b.size for b in blocks)


def restored(model: Any, fp32: bool, blocks: list[Block], reserve: int) -> Any:
    """A one-row cache holding the keys and values of a prompt's first tokens (`blocks`, copied), with room for
    `reserve` tokens (the whole prompt), ready for the rest of the prompt to extend it."""
    cache = new_cache(model, fp32, reserve) or DynamicCache(config=model.config)
    for i in range(blocks[0].keys.shape[0]):  # a layer at a time: the transient copy is one layer's
        keys = torch.cat([b.keys[i] for b in blocks], dim=1).unsqueeze(0)  # [1, H, n, Dk]
        values = torch.cat([b.values[i] for b in blocks], dim=1).unsqueeze(0)
        cache.update(keys, values, i)
    return cache


def prefix_cache_for(lm: LoadedModel, mb: float | None, max_batch_size: int) -> PrefixCache | None:
    """The prefix cache a loaded model gets: `mb` megabytes (None: `default_budget`; 0: none), and only where a
    prompt can be prefilled after a cache (ChatGLM-6B's prompt attends to itself both ways, so a new round changes
    the old tokens' keys and values) and the model is on one device (blocks are kept beside the batch's cache)."""
    why = None
    if mb == 0:
        why = "turned off"
    elif not lm.chunked_prefill:
        why = "this model cannot extend a cache"
    elif len(lm.devices) > 1:
        why = "the model is spread over several devices"
    if why is not None:
        log.info("prefix cache: off (%s)", why)
        return None
    if mb is not None:
        budget = int(mb * 2**20)
    else:
        dtype = torch.float32 if lm.fp32_attention else getattr(torch, lm.dtype)
        batch_cache = kv_bytes_per_token(lm.model.config, dtype) * lm.context_length * max_batch_size
        budget = default_budget(free_memory([lm.device]), batch_cache)
        if budget <= 0:
            log.info("prefix cache: off (no memory left after the batch's cache; --prefix-cache-mb sets it)")
            return None
    log.info("prefix cache: up to %.0f MB (--prefix-cache-mb)", budget / 2**20)
    return PrefixCache(budget)


def default_budget(free: int, batch_cache: int) -> int:
    """Bytes the prefix cache may take by default: a quarter of the memory left after the weights (already out of
    `free`) and the running batch's cache at full context (`batch_cache`)."""
    return max(0, free - batch_cache) // 4
