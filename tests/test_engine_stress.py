"""Random pool sizes, budgets, sharing, sampling and aborts: no request is lost or corrupted, no block leaks."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import VOCAB, make_pair

from hf_paged import Engine, SamplingParams


@pytest.fixture(scope="module")
def model():
    return make_pair("llama-gqa")[0]


def _workload(seed: int):
    rng = random.Random(seed)
    shared = [rng.randrange(4, VOCAB) for _ in range(rng.randint(0, 20))]
    prompts, params = [], []
    for i in range(rng.randint(3, 7)):
        tail = [rng.randrange(4, VOCAB) for _ in range(rng.randint(1, 16))]
        prompts.append((shared if rng.random() < 0.6 else []) + tail)
        if rng.random() < 0.5:
            p = SamplingParams(max_new_tokens=rng.randint(1, 10), temperature=0.0)
        else:
            p = SamplingParams(max_new_tokens=rng.randint(1, 10), temperature=1.2, top_k=rng.choice([0, 20]),
                               seed=rng.randrange(1000), n=rng.choice([1, 1, 2]))
        params.append(p)
    return prompts, params


def _run(model, prompts, params, abort_at=None, **kwargs):
    engine = Engine(model, **kwargs)
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    outputs, steps = {}, 0
    while engine.has_unfinished():
        for update in engine.step():
            if update.output is not None:
                assert update.request_id not in outputs, "request reported twice"
                outputs[update.request_id] = update.output
        steps += 1
        if abort_at is not None and steps == abort_at[1]:
            engine.abort(ids[abort_at[0]])
        assert steps < 2000, "engine does not make progress"
    blocks = engine.kv_pool.blocks
    assert blocks.num_free == blocks.num_blocks and all(blocks.refcount(b) == 0 for b in range(blocks.num_blocks))
    assert set(outputs) == set(ids), "a request was lost"
    return [outputs[i] for i in ids], engine


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 10_000),
    num_blocks=st.integers(6, 24),
    block_size=st.sampled_from([2, 4, 8]),
    budget=st.integers(3, 48),
    max_num_seqs=st.integers(1, 6),
    caching=st.booleans(),
    abort=st.one_of(st.none(), st.tuples(st.integers(0, 2), st.integers(1, 6))),
    overlap=st.booleans(),
)
def test_random_schedules_match_a_roomy_run(model, seed, num_blocks, block_size, budget, max_num_seqs, caching, abort,
                                            overlap):
    prompts, params = _workload(seed)
    expected, _ = _run(model, prompts, params, num_blocks=256, block_size=16)
    got, engine = _run(
        model, prompts, params, abort_at=abort, num_blocks=num_blocks, block_size=block_size,
        max_num_batched_tokens=budget, max_num_seqs=max_num_seqs, enable_prefix_caching=caching,
        async_scheduling=overlap,
    )
    capacity = num_blocks * block_size
    for i, (prompt, sp, want, out) in enumerate(zip(prompts, params, expected, got)):
        if len(prompt) + sp.max_new_tokens > capacity:
            assert out.finish_reason == "error" and "pool" in out.error
        elif abort is not None and i == abort[0] and any(s.finish_reason == "abort" for s in out.samples):
            assert all(len(s.token_ids) <= sp.max_new_tokens for s in out.samples)
        else:
            assert out.error is None
            assert [s.token_ids for s in out.samples] == [s.token_ids for s in want.samples], (i, prompt, sp)
            assert len(out.samples) == sp.n


def test_single_request_that_needs_the_whole_pool(model):
    """A request exactly as large as the pool completes; one token more is a clear error."""
    prompt = torch.arange(4, 4 + 27).tolist()
    sp = SamplingParams(max_new_tokens=5, temperature=0.0, ignore_eos=True)
    outs, engine = _run(model, [prompt, prompt + [9]], [sp, sp], num_blocks=8, block_size=4, max_num_batched_tokens=8)
    assert outs[0].error is None and len(outs[0].token_ids) == 5
    assert outs[1].finish_reason == "error" and "33 KV slots" in outs[1].error
