"""Data parallelism on Ray: 2 CPU replicas behind the router match one engine, and survive a replica's death."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

ray = pytest.importorskip("ray")

import hf_paged  # noqa: E402
from hf_paged import SamplingParams  # noqa: E402
from hf_paged.integrations.ray import ReplicaRouter, RoutingTable, generate_batch_dp  # noqa: E402
from tiny_model_dir import save_tiny_model, words  # noqa: E402

pytestmark = pytest.mark.any_transformers  # .ci/run: newest Transformers only (see pyproject)

ENGINE = dict(num_blocks=48, block_size=16, max_num_seqs=16, max_num_batched_tokens=256)


def mixed_requests(count: int = 50, seed: int = 3):
    """Shared prefixes (longer than a block), text and token-id prompts, greedy, seeded and n=2 requests."""
    g = torch.Generator().manual_seed(seed)
    prefixes = [torch.randint(4, 96, (20,), generator=g).tolist() for _ in range(3)]
    prompts, params = [], []
    for i in range(count):
        body = torch.randint(4, 96, (int(torch.randint(1, 24, (1,), generator=g)),), generator=g).tolist()
        ids = [1] + (prefixes[i % 3] if i % 2 == 0 else []) + body
        prompts.append(words(ids[1:]) if i % 5 == 1 else ids)
        max_new = 4 + i % 13
        if i % 7 == 3:
            params.append(SamplingParams(max_new_tokens=max_new, temperature=0.9, top_k=20, seed=100 + i,
                                         n=2 if i % 14 == 3 else 1))
        else:
            params.append(SamplingParams(max_new_tokens=max_new, temperature=0.0))
    return prompts, params


def _tokens(outs):
    return [[s.token_ids for s in o.samples] for o in outs]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("ray") / "tiny")


@pytest.fixture(scope="module")
def expected(model_dir):
    """One in-process engine's outputs for the mixed requests."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="paged").eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts, params = mixed_requests()
    return _tokens(hf_paged.generate_batch(model, prompts, params, tokenizer=tok, progress=False, **ENGINE))


@pytest.fixture(scope="module")
def ray_local():
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    print(f"ray.init took {time.perf_counter() - t0:.1f} s")
    yield
    ray.shutdown()


def test_routing_table_policy():
    table = RoutingTable([(10, 4), (10, 4)])
    p = SamplingParams(max_new_tokens=4)
    a = table.choose([1, 2, 3, 4, 5], 5, p)  # 3 blocks reserved on a
    b = table.choose([9, 9, 9, 9, 9], 5, p)  # the other replica has less work reserved
    assert {a, b} == {0, 1}
    assert table.choose([1, 2, 3, 4, 7, 7], 6, p) == a  # same first block: prefix affinity
    table.report(b, 1)  # b says it is nearly full
    assert table.choose([5, 5, 5], 3, p) == a
    table.mark_dead(a)
    assert table.choose([1, 2, 3, 4, 5], 5, p) == b  # affinity to a dead replica is dropped
    table.mark_dead(b)
    with pytest.raises(RuntimeError, match="no live replica"):
        table.choose([1], 1, p)


def test_routing_balances_work_across_unequal_pools():
    """A burst splits evenly by work, not by pool size (the larger pool is not a faster replica)."""
    table = RoutingTable([(20000, 16), (28000, 16)])
    p = SamplingParams(max_new_tokens=128)
    chosen = [table.choose(list(range(i, i + 512)), 512, p) for i in range(256)]
    assert chosen.count(0) == chosen.count(1) == 128
    table.report(0, 0)  # replica 0 is full: everything goes to 1, which still has room
    assert table.choose([7] * 600, 600, p) == 1


def test_two_replicas_match_one_engine(ray_local, model_dir, expected):
    prompts, params = mixed_requests()
    with ReplicaRouter(str(model_dir), 2, engine_kwargs=ENGINE) as router:
        outs = asyncio.run(router.generate_many(prompts, params))
        assert _tokens(outs) == expected
        assert [o.request_id for o in outs] == [f"dp-{i}" for i in range(len(prompts))]
        assert outs[1].prompt == prompts[1] and outs[1].samples[0].text is not None
        served = [s["served"] for s in router.table.snapshot()]
        assert min(served) >= 10, served  # both replicas took a share
        # A prompt whose first block a replica holds in its prefix cache goes back to that replica.
        # Fresh prefixes, so that no request of the burst above can have evicted the block in between.
        for k in range(3):
            prefix = [1] + [90 + k] * 20
            first = asyncio.run(router.generate(prefix + [5], SamplingParams(max_new_tokens=2),
                                                request_id=f"first-{k}"))
            again = asyncio.run(router.generate(prefix + [7, 8], SamplingParams(max_new_tokens=2),
                                                request_id=f"again-{k}"))
            assert router.assignments[f"again-{k}"] == router.assignments[f"first-{k}"]
            assert first.num_cached_tokens == 0 and again.num_cached_tokens == 16
        assert all(s["free_blocks"] == s["num_blocks"] for s in router.pool_stats())


def test_generate_batch_dp(ray_local, model_dir, expected):
    prompts, params = mixed_requests()
    outs = generate_batch_dp(str(model_dir), prompts[:12], params[:12], num_replicas=2, engine_kwargs=ENGINE)
    assert _tokens(outs) == expected[:12]


def test_killing_a_replica_loses_nothing(ray_local, model_dir, expected):
    prompts, params = mixed_requests()
    with ReplicaRouter(str(model_dir), 2, engine_kwargs=ENGINE) as router:
        victim = router.replicas[0]
        streamed: dict[str, dict[int, list[int]]] = {}
        texts: dict[str, dict[int, str]] = {}

        async def one(i):
            out = None
            async for u in router.stream(prompts[i], params[i], request_id=f"r{i}", stream_text=True):
                streamed.setdefault(u.request_id, {}).setdefault(u.sample_index, []).extend(u.new_token_ids)
                sample_texts = texts.setdefault(u.request_id, {})
                sample_texts[u.sample_index] = sample_texts.get(u.sample_index, "") + (u.text_delta or "")
                if u.finished:
                    out = u.output
            return out

        async def run():
            tasks = [asyncio.create_task(one(i)) for i in range(len(prompts))]
            # Kill replica 0 once it has streamed tokens and while it still has requests in flight.
            while not any(router.assignments.get(f"r{i}", [None])[0] == 0 and f"r{i}" in streamed
                          for i in range(len(prompts))):
                await asyncio.sleep(0.01)
            assert router.table.snapshot()[0]["in_flight"] > 0
            ray.kill(victim)
            return await asyncio.gather(*tasks)

        outs = asyncio.run(run())
        assert _tokens(outs) == expected
        replayed = [i for i in range(len(prompts)) if router.assignments[f"r{i}"] == [0, 1]]
        assert replayed, "no request was in flight on the killed replica"
        # What was streamed is exactly the output: nothing lost, nothing repeated (tokens and text).
        for i, o in enumerate(outs):
            assert [streamed[f"r{i}"][s.index] for s in o.samples] == [s.token_ids for s in o.samples]
            assert [texts[f"r{i}"].get(s.index, "") for s in o.samples] == [s.text for s in o.samples]
        stats = router.pool_stats()
        assert stats[0] is None
        assert stats[1]["free_blocks"] == stats[1]["num_blocks"] and not stats[1]["unfinished"]


def test_closing_a_stream_aborts_the_request(ray_local, model_dir):
    with ReplicaRouter(str(model_dir), 1, engine_kwargs=ENGINE) as router:
        async def first_update():
            agen = router.stream([1, 5, 9], SamplingParams(max_new_tokens=740, temperature=0.0, ignore_eos=True))
            update = await agen.__anext__()
            await agen.aclose()
            return update

        assert asyncio.run(first_update()).new_token_ids
        deadline = time.time() + 20
        while router.pool_stats()[0]["unfinished"] and time.time() < deadline:
            time.sleep(0.05)
        stats = router.pool_stats()[0]
        assert not stats["unfinished"] and stats["free_blocks"] == stats["num_blocks"]
        assert ray.get(router.replicas[0].engine_stats.remote()).output_tokens < 600  # aborted, not run out


def test_replay_skips_the_text_already_streamed():
    """A replay's first tokens and characters were streamed by the dead attempt: only the rest goes out."""
    from hf_paged.engine import RequestUpdate

    sent, sent_text = {}, {}
    first = {"tokens": {}, "text": {}}
    for ids, delta in (([5, 6], " w5"), ([7], " w6")):  # text held back a token behind (a stop string)
        ReplicaRouter._dedupe(RequestUpdate("r", 0, ids, delta), sent, first["tokens"], sent_text, first["text"])
    replay = {"tokens": {}, "text": {}}
    out = [ReplicaRouter._dedupe(RequestUpdate("r", 0, ids, delta), sent, replay["tokens"], sent_text, replay["text"])
           for ids, delta in (([5, 6, 7], " w5 w6 w"), ([8], "7 w8"))]
    assert [(u.new_token_ids, u.text_delta) for u in out] == [([], " w"), ([8], "7 w8")]
    assert sent == {0: [5, 6, 7, 8]} and sent_text == {0: len(" w5 w6 w7 w8")}


def test_data_parallel_client(ray_local, model_dir, expected):
    """`DataParallelClient` (what ``serve --data-parallel-size`` uses): the router's outputs, an abort
    that ends its request and frees its blocks, 429-style refusal past ``max_waiting``, then shutdown."""
    import queue

    from hf_paged.engine import EngineDeadError, QueueFullError
    from hf_paged.integrations.ray_client import DataParallelClient

    client = DataParallelClient(str(model_dir), 2, engine_kwargs=ENGINE)
    try:
        assert client.alive and client.vocab_size == 96 and client.block_size == 16
        prompts, params = mixed_requests()
        assert _tokens(client.generate(prompts, params)) == expected
        updates: queue.SimpleQueue = queue.SimpleQueue()
        rid = client.submit([1, 5, 9], SamplingParams(max_new_tokens=740, temperature=0.0, ignore_eos=True),
                            updates.put)
        assert updates.get(timeout=30).new_token_ids
        client.abort(rid)
        while not (last := updates.get(timeout=30)).finished:
            pass
        assert last.finish_reason == "abort"
        deadline = time.time() + 20
        while any(s["unfinished"] for s in client.router.pool_stats()) and time.time() < deadline:
            time.sleep(0.05)
        assert all(s["free_blocks"] == s["num_blocks"] for s in client.router.pool_stats())
        client.max_waiting = 0
        with pytest.raises(QueueFullError):
            client.submit([1, 2], None, updates.put)
    finally:
        client.shutdown(join_timeout=20)
    assert not client.alive
    with pytest.raises(EngineDeadError):
        client.submit([1, 2], None, lambda u: None)
