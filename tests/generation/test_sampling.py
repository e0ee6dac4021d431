"""The sampler picks from the distribution a request asks for: top-p's nucleus as a whole sort would find it,
top-k's candidates, and draws in proportion to the probabilities, whatever shortcut it takes to get there."""

from __future__ import annotations

import pytest
import torch

from generation.sampling import NUCLEUS_STAGES, History, SamplingParams, draw, nucleus, pick, sample, top_k

VOCAB = 49152  # the bundled model's


def sorted_nucleus(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The nucleus by the textbook: sort everything, keep the tokens with less than top_p of mass before them."""
    ordered, ids = torch.sort(probs, descending=True)
    keep = (torch.cumsum(ordered, dim=-1) - ordered) < top_p
    keep[0] = True
    return ordered[keep], ids[keep]


@pytest.mark.parametrize(
    ("spread", "top_p"),
    [(8.0, 0.7), (8.0, 0.95), (3.0, 0.5), (3.0, 0.9), (1.0, 0.9), (0.3, 0.99), (0.0, 0.5), (8.0, 0.0)],
)
def test_the_nucleus_is_the_one_a_whole_sort_finds(spread: float, top_p: float) -> None:
    # peaked (a few tokens), spread out (past the first stages) and flat (every token alike) distributions
    probs = torch.softmax(torch.randn(VOCAB, generator=torch.Generator().manual_seed(7)) * spread, dim=-1)
    got_p, got_ids = nucleus(probs, None, top_p)
    want_p, want_ids = sorted_nucleus(probs, top_p)
    assert len(got_ids) == len(want_ids)
    assert set(got_ids.tolist()) == set(want_ids.tolist()) or spread == 0.0  # all alike: any of the ties will do
    assert torch.equal(got_p, want_p)


def test_the_cases_above_end_inside_each_stage_and_past_them() -> None:
    sizes = []
    for spread, top_p in [(8.0, 0.7), (3.0, 0.9), (1.0, 0.9)]:
        probs = torch.softmax(torch.randn(VOCAB, generator=torch.Generator().manual_seed(7)) * spread, dim=-1)
        sizes.append(len(sorted_nucleus(probs, top_p)[1]))
    assert sizes[0] < NUCLEUS_STAGES[0] < sizes[1] < NUCLEUS_STAGES[-1] < sizes[2]


def test_draws_follow_the_probabilities_and_never_take_an_impossible_token() -> None:
    probs = torch.tensor([0.5, 0.0, 0.3, 0.2, 0.0])
    generator = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([draw(probs, None, 5, generator) for _ in range(20000)]), minlength=5)
    assert counts[1] == counts[4] == 0
    assert torch.allclose(counts.float() / 20000, probs, atol=0.015)
    ids = torch.tensor([40, 41, 42, 43, 44])
    assert {draw(probs, ids, 45, generator) for _ in range(200)} == {40, 42, 43}


def test_a_seed_draws_the_same_tokens_again() -> None:
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(3)) * 4
    params = SamplingParams(temperature=0.95, top_p=0.7)

    def tokens(seed: int) -> list[int]:
        generator = torch.Generator().manual_seed(seed)
        return [pick(logits, params, generator) for _ in range(50)]

    assert tokens(1) == tokens(1) != tokens(2)


def test_top_k_and_top_p_keep_to_their_candidates() -> None:
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(5)) * 4
    generator = torch.Generator().manual_seed(0)
    top40 = set(torch.topk(logits, 40).indices.tolist())
    picked = {pick(logits, SamplingParams(temperature=2.0, top_k=40), generator) for _ in range(2000)}
    assert picked <= top40 and len(picked) > 20  # hot enough to wander over most of them, never outside
    nucleus_ids = set(sorted_nucleus(torch.softmax(logits / 0.8, dim=-1), 0.6)[1].tolist())
    picked = {pick(logits, SamplingParams(temperature=0.8, top_p=0.6), generator) for _ in range(2000)}
    assert picked <= nucleus_ids and len(picked) > 1
    both = {pick(logits, SamplingParams(temperature=0.8, top_p=0.6, top_k=3), generator) for _ in range(500)}
    assert both <= top40 and len(both) <= 3


def test_logits_that_are_not_numbers_cannot_be_sampled() -> None:
    logits = torch.full((VOCAB,), float("nan"))
    for params in (SamplingParams(temperature=1.0), SamplingParams(temperature=0.9, top_p=0.5)):
        with pytest.raises(ValueError, match="cannot sample"):
            pick(logits, params, torch.Generator().manual_seed(0))


def test_ignore_eos_still_ends_where_nothing_else_is_allowed() -> None:
    eos = frozenset({2})
    history = History.of([5, 6], VOCAB, torch.Generator().manual_seed(0), torch.device("cpu"))
    params = SamplingParams(temperature=0, ignore_eos=True)
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(1))
    logits[2] = 100.0
    assert sample(logits, params, history, eos).token != 2
    only_end = torch.full((VOCAB,), float("-inf"))
    only_end[2] = 0.0  # a grammar that is complete allows only the end
    assert sample(only_end, params, history, eos).token == 2


def test_top_k_keeps_every_token_tied_with_the_kth() -> None:
    # bf16 logits tie often: a cut at the k-th logit keeps all of its ties, as transformers' top-k does
    logits = torch.tensor([5.0, 4.0, 3.0, 3.0, 3.0, 1.0, 0.5])
    values, ids = top_k(logits, 3)
    assert sorted(ids.tolist()) == [0, 1, 2, 3, 4] and values.tolist() == [5.0, 4.0, 3.0, 3.0, 3.0]
    generator = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=1.0, top_k=3)
    assert {pick(logits, params, generator) for _ in range(400)} == {0, 1, 2, 3, 4}


def test_top_k_beyond_what_a_grammar_allows_draws_only_allowed_tokens() -> None:
    logits = torch.full((VOCAB,), float("-inf"))
    allowed = [7, 300, 40000]  # fewer than top_k: the -inf ties are not widened into a sort of everything
    logits[allowed] = torch.tensor([1.0, 0.5, 0.2])
    values, _ = top_k(logits, 40)
    assert len(values) == 40
    generator = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0.8, top_p=0.95, top_k=40)
    assert {pick(logits, params, generator) for _ in range(300)} == set(allowed)


def test_a_seed_mostly_draws_the_same_token_from_slightly_different_logits() -> None:
    # a prompt served from the prefix cache computes its logits a little differently: a seeded request should
    # still give the same answer almost always (inverting the sorted cumulative distribution kept 81% here)
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(0)) * 3
    moved = logits + torch.randn(VOCAB, generator=torch.Generator().manual_seed(1)) * 0.02
    params = SamplingParams(temperature=0.7)
    same = sum(
        pick(logits, params, torch.Generator().manual_seed(seed))
        == pick(moved, params, torch.Generator().manual_seed(seed))
        for seed in range(300)
    )
    assert same >= 0.95 * 300
