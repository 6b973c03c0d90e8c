"""The sort-free sampling kernel (interpreted on CPU, ~60 ms a draw there): its kept set is the sort-based one
and its draws follow the renormalised probabilities. Marked ``any_transformers``: nothing here depends on
Transformers, so CI runs it once."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from hf_paged.engine.sampler import Sampler  # noqa: E402
from hf_paged.kernels import triton_sampling  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def kept_probs(scores, temperature, top_k, top_p, min_p):
    """The sort-based filters of `Sampler` on one row: renormalised probabilities, zero where dropped."""
    row = scores[None] / temperature
    row = Sampler._top_k_top_p(row, torch.tensor([float(top_k)]), torch.tensor([top_p]))
    probs = torch.softmax(row, dim=-1)
    probs = probs.masked_fill(probs < min_p * probs.max(), 0.0)
    return (probs / probs.sum())[0]


pytestmark = pytest.mark.any_transformers


def test_draws_follow_the_kept_distribution():
    """Temperature, top-k, top-p and min-p together (each one alone is a special case of the same passes)."""
    temperature, top_k, top_p, min_p = 0.9, 40, 0.95, 0.02
    vocab, draws = 200, 300
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(vocab, generator=g) * 2.5
    want = kept_probs(scores, temperature, top_k or vocab, top_p, min_p)
    params = torch.tensor([[temperature, float(top_k or vocab), top_p, min_p]]).repeat(draws, 1)
    seeds = torch.randint(0, 2**62, (draws,), generator=g)
    got = triton_sampling.sample(scores.repeat(draws, 1).to(DEVICE), params.to(DEVICE), seeds.to(DEVICE),
                                 top_k=bool(top_k), top_p=top_p < 1, min_p=min_p > 0).cpu()
    assert want[got].min() > 0, "a draw outside the kept set"
    freq = torch.bincount(got, minlength=vocab).float() / draws
    # Total variation: ~0.1 expected from 300 draws; uniform draws over the 4 kept tokens would give 0.59 here.
    assert (freq - want).abs().sum() / 2 < 0.2
    assert (want > 0).sum() > 3  # the case keeps several tokens (the test could not pass by always taking one)


def test_kept_set_boundaries_exactly():
    """Known masses (0.4, 0.3, 0.2, 0.1), fixed seeds: each filter's boundary on both sides."""
    scores = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    rows = [  # (top_k, top_p, min_p, the tokens drawn)
        (4, 0.39, 0.0, {0}), (4, 0.41, 0.0, {0, 1}), (4, 0.69, 0.0, {0, 1}), (4, 0.71, 0.0, {0, 1, 2}),
        (4, 0.95, 0.0, {0, 1, 2, 3}), (2, 1.0, 0.0, {0, 1}),
        (3, 0.7, 0.0, {0, 1}), (3, 0.8, 0.0, {0, 1, 2}),  # top-p over the renormalised top-3 (0.44, 0.33, 0.22)
        (4, 1.0, 0.6, {0, 1}), (4, 1.0, 0.45, {0, 1, 2}),  # min-p: p >= 0.24 / p >= 0.18
    ]
    for top_k, top_p, min_p, allowed in rows:
        params = torch.tensor([[1.0, float(top_k), top_p, min_p]]).repeat(24, 1)
        got = triton_sampling.sample(scores.repeat(24, 1).to(DEVICE), params.to(DEVICE), torch.arange(24).to(DEVICE),
                                     top_k=top_k < 4, top_p=top_p < 1, min_p=min_p > 0)
        assert set(got.tolist()) == allowed, (top_k, top_p, min_p)


def test_seeded_rows_do_not_depend_on_the_batch():
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(5, 300, generator=g)
    params = torch.tensor([[1.0, 300.0, 0.9, 0.0]]).repeat(5, 1)
    seeds = torch.tensor([11, 12, 13, 14, 15])
    run = lambda s, p, z: triton_sampling.sample(s.to(DEVICE), p.to(DEVICE), z.to(DEVICE),  # noqa: E731
                                                 top_k=False, top_p=True, min_p=False).cpu()
    once = run(scores, params, seeds)
    order = torch.tensor([3, 0, 4, 1, 2])
    assert torch.equal(run(scores[order], params[order], seeds[order]), once[order])
    assert torch.equal(run(scores[2:3], params[2:3], seeds[2:3]), once[2:3])
