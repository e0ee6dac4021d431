"""The float32 cache layer (generation/kv_cache.py) against concatenation and row selection: whatever decode steps,
joins and leaves a batch goes through, its keys and values are what copying everything each time would give, and
joins into spare rows and leaves without dropped columns do not move the rows held."""

from __future__ import annotations

import random

import pytest
import torch

from generation.kv_cache import Fp32Layer


def buffer(layer: Fp32Layer) -> torch.Tensor:
    """The keys' whole buffer, room included."""
    assert layer._k is not None
    return layer._k


def padded(t: torch.Tensor, n: int) -> torch.Tensor:
    return torch.cat([t.new_zeros((*t.shape[:2], n, t.shape[3])), t], dim=2)


@pytest.mark.parametrize("seed", range(4))
def test_joins_leaves_and_steps_keep_what_copying_would(seed: int) -> None:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    layer = Fp32Layer()
    first = torch.randn(2, 3, 5, 4, dtype=torch.bfloat16)
    layer.update(first, -first)
    want = first.float()  # the reference: keys held, rebuilt by concatenation and index_select
    for _ in range(60):
        op = rng.choice(["step", "step", "join", "leave"])
        if op == "step":
            new = torch.randn(want.shape[0], 3, 1, 4, dtype=torch.bfloat16)
            layer.update(new, -new)
            want = torch.cat([want, new.float()], dim=2)
        elif op == "join":
            new = torch.randn(rng.randint(1, 3), 3, rng.randint(1, want.shape[2] + 8), 4)
            width = max(want.shape[2], new.shape[2])
            grow, pad = width - want.shape[2], width - new.shape[2]
            held, room = buffer(layer).data_ptr(), buffer(layer).shape[0]
            layer.join(new, -new, grow, pad, max_rows=16)
            if not grow and room >= want.shape[0] + new.shape[0]:
                assert buffer(layer).data_ptr() == held  # written into spare rows
            want = torch.cat([padded(want, grow), padded(new, pad)], dim=0)
        elif want.shape[0] > 1:
            rows = sorted(rng.sample(range(want.shape[0]), rng.randint(1, want.shape[0] - 1)))
            start = rng.choice([0, 0, rng.randint(0, want.shape[2] - 1)])
            held = buffer(layer).data_ptr()
            layer.keep(rows, start)
            assert start or buffer(layer).data_ptr() == held  # rows moved up in place
            want = want[rows][:, :, start:]
        assert layer.keys is not None and layer.values is not None
        assert torch.equal(layer.keys, want) and torch.equal(layer.values, -want)
        assert layer.get_seq_length() == want.shape[2]


def test_a_join_into_spare_rows_leaves_the_rows_held_where_they_are() -> None:
    layer = Fp32Layer()
    layer.join(torch.ones(2, 1, 4, 2), torch.ones(2, 1, 4, 2), 4, 0, max_rows=8)  # room for 4 rows from here
    held = buffer(layer).data_ptr()
    layer.join(torch.full((1, 1, 3, 2), 2.0), torch.full((1, 1, 3, 2), 2.0), 0, 1, max_rows=8)
    assert buffer(layer).data_ptr() == held and buffer(layer).shape[0] == 4
    assert layer.keys is not None and layer.keys[:, 0, :, 0].tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [0, 2, 2, 2]]
