"""`AsyncEngine` (the one engine client), `Engine.close`, engine reuse by `generate_batch`, and large ``n``."""

from __future__ import annotations

import asyncio
import time

import pytest
from tiny_models import make_pair, make_tokenizer

from hf_paged import AsyncEngine, Engine, SamplingParams, generate_batch
from hf_paged.engine import EngineDeadError, QueueFullError, release_engine

GREEDY = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
PROMPTS = [[1, 5, 9, 13], [2, 7], [3, 4, 5, 6, 7, 8, 9]]


@pytest.fixture(scope="module")
def model():
    paged, _ = make_pair("llama-gqa")
    return paged


def test_stream_astream_generate_match_the_engine(model):
    tok = make_tokenizer()
    expected = Engine(model, num_blocks=64, tokenizer=tok).generate(PROMPTS, GREEDY)
    with AsyncEngine(Engine(model, num_blocks=64, tokenizer=tok)) as client:
        assert [o.token_ids for o in client.generate(PROMPTS, GREEDY)] == [o.token_ids for o in expected]
        updates = list(client.stream(PROMPTS[0], GREEDY, stream_text=True))
        assert [t for u in updates for t in u.new_token_ids] == expected[0].token_ids
        assert "".join(u.text_delta for u in updates) == updates[-1].output.text == expected[0].text

        async def both():
            return await asyncio.gather(*(client.agenerate(p, GREEDY) for p in PROMPTS))

        assert [o.token_ids for o in asyncio.run(both())] == [o.token_ids for o in expected]


def test_failing_forward_fails_its_step_and_the_engine_serves_on(model):
    engine = Engine(model, num_blocks=64)
    execute = engine.runner.execute
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("CUDA error: boom")
        return execute(*args, **kwargs)

    engine.runner.execute = flaky
    with AsyncEngine(engine) as client:
        (first,) = client.generate([PROMPTS[0]], GREEDY)
        assert first.finish_reason == "error" and "model step failed: RuntimeError: CUDA error: boom" in first.error
        (second,) = client.generate([PROMPTS[1]], GREEDY)
        assert second.error is None and len(second.token_ids) == 6
        assert client.alive


def test_broken_engine_stops_and_says_why(model):
    engine = Engine(model, num_blocks=64)

    def broken_step():
        raise AssertionError("scheduler invariant violated")

    engine.step = broken_step
    client = AsyncEngine(engine)
    (out,) = client.generate([PROMPTS[0]], GREEDY)
    assert out.finish_reason == "error" and "scheduler invariant violated" in out.error
    deadline = time.monotonic() + 10
    while client.alive and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not client.alive and "scheduler invariant violated" in client.error
    with pytest.raises(EngineDeadError, match="scheduler invariant violated"):
        client.submit(PROMPTS[1], GREEDY, lambda u: None)
    client.shutdown()


def test_max_waiting_refuses_with_queue_full(model):
    engine = Engine(model, num_blocks=64)
    client = AsyncEngine(engine, max_waiting=1)
    with client._cond:  # noqa: SLF001  hold the engine thread so the first request stays waiting
        first = client.submit(PROMPTS[0], GREEDY, lambda u: None)
        with pytest.raises(QueueFullError, match="at most 1"):
            client.submit(PROMPTS[1], GREEDY, lambda u: None)
        # An aborted request frees its slot at once, before the engine thread has seen either command
        # (a server refusing one prompt of several aborts the others, and the next request must get in).
        client.abort(first)
        assert client.num_waiting == 0
        client.submit(PROMPTS[1], GREEDY, lambda u: None)
    client.shutdown()


def test_close_frees_the_pool_and_refuses_requests(model):
    engine = Engine(model, num_blocks=64)
    engine.add_request(PROMPTS[0], GREEDY)
    with engine:
        engine.step()
    assert engine.kv_pool.nbytes == 0 and not engine.has_unfinished()
    with pytest.raises(RuntimeError, match="closed"):
        engine.add_request(PROMPTS[0], GREEDY)


def test_generate_batch_reuses_its_engine(model):
    tok = make_tokenizer()
    first = generate_batch(model, ["w1 w2 w3"], GREEDY, tokenizer=tok, progress=False)
    engine = model.__dict__["_hf_paged_engine"].engine
    again = generate_batch(model, ["w1 w2 w3"], GREEDY, tokenizer=tok, progress=False)
    assert model.__dict__["_hf_paged_engine"].engine is engine  # no new pool, no new graphs
    assert again[0].token_ids == first[0].token_ids
    # Other options, or a batch the pool cannot hold at once, build a new engine.
    generate_batch(model, ["w1 w2 w3"], GREEDY, tokenizer=tok, progress=False, max_num_seqs=8)
    assert model.__dict__["_hf_paged_engine"].engine is not engine and engine.kv_pool.nbytes == 0
    release_engine(model)
    assert "_hf_paged_engine" not in model.__dict__


def test_huge_n_is_linear_and_does_not_starve_others(model):
    params = SamplingParams(max_new_tokens=4, temperature=1.0, n=2000, seed=0, ignore_eos=True)
    small = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
    with AsyncEngine(Engine(model, num_blocks=4096, max_num_seqs=256)) as client:
        t0 = time.perf_counter()
        big, other = client.generate([[1, 2, 3], [4, 5, 6]], [params, small])
        elapsed = time.perf_counter() - t0
    assert len(big.samples) == 2000 and all(len(s.token_ids) == 4 for s in big.samples)
    assert other.error is None and len(other.token_ids) == 4
    assert elapsed < 60
