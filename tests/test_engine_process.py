"""`EngineProcessClient`: the engine in a process of its own (parity, abort, death, shutdown)."""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import time

import pytest

pytest.importorskip("zmq")
pytest.importorskip("msgspec")

from tiny_model_dir import save_tiny_model

from hf_paged.engine import EngineDeadError, SamplingParams
from hf_paged.engine.core_process import engine_factory, load_engine
from hf_paged.engine.process_client import EngineProcessClient, EngineStartError
from hf_paged.engine.wire import EngineState

pytestmark = pytest.mark.any_transformers  # .ci/run: newest Transformers only (see pyproject)

LOAD = {"dtype": "float32", "device": "cpu"}
ENGINE = {"num_blocks": 64, "max_num_seqs": 8}
PROMPTS = ["w4 w5 w6 w7", "w10 w11", [1, 20, 30, 40, 50, 60], "w90 w91 w92 w93 w94 w95 w4"]
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0)


def _long(n: int = 240) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(save_tiny_model(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="module")
def client(model_dir):
    c = EngineProcessClient(engine_factory(model_dir, LOAD, ENGINE), ready_timeout=120)
    yield c
    c.shutdown(join_timeout=10)


def _wait_first(updates: queue.SimpleQueue, timeout: float = 10.0):
    return updates.get(timeout=timeout)


def test_ready_describes_the_engine(client):
    assert client.alive and client.error is None
    assert client.vocab_size == 96
    assert client.capacity_tokens == 64 * 16
    assert client.max_model_len == 256
    assert client.info.device == "cpu" and client.info.dtype == "torch.float32"
    assert isinstance(client.state, EngineState) and client.state.num_blocks == 64


def test_greedy_outputs_match_the_in_process_engine(client, model_dir):
    engine = load_engine(model_dir, LOAD, ENGINE)
    try:
        expected = engine.generate(PROMPTS, GREEDY)
    finally:
        engine.close()
    got = client.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    assert [o.text for o in got] == [o.text for o in expected]
    assert [o.finish_reason for o in got] == [o.finish_reason for o in expected]
    assert [o.prompt_token_ids for o in got] == [o.prompt_token_ids for o in expected]
    assert all(o.time_to_first_token is not None and o.total_time > 0 for o in got)

    # Streamed: text deltas join to the final text, tokens to the final tokens.
    updates = list(client.stream(PROMPTS[0], GREEDY, stream_text=True))
    final = updates[-1].output
    assert final is not None and final.token_ids == expected[0].token_ids
    assert "".join(u.text_delta or "" for u in updates) == final.text == expected[0].text
    assert [t for u in updates for t in u.new_token_ids] == final.token_ids


def test_front_end_detokenization_matches_the_in_process_engine(model_dir):
    """With a tokenizer the client decodes token-id requests itself (the engine process sends ids
    only); text, streamed deltas and stop strings (decoded in the engine) come out as in-process."""
    from hf_paged.loader import load_tokenizer

    tok = load_tokenizer(True, model_dir)
    engine = load_engine(model_dir, LOAD, ENGINE)
    prompts = [tok(p)["input_ids"] if isinstance(p, str) else p for p in PROMPTS]
    stop = SamplingParams(max_new_tokens=12, temperature=0.0, stop=["w9"])
    try:
        expected = engine.generate(prompts, GREEDY)
        expected_stop = engine.generate(prompts, stop)
    finally:
        engine.close()
    c = EngineProcessClient(engine_factory(model_dir, LOAD, ENGINE), ready_timeout=120, tokenizer=tok)
    try:
        for prompt, want in zip(prompts, expected):
            updates = list(c.stream(prompt, GREEDY, stream_text=True))
            final = updates[-1].output
            assert final.token_ids == want.token_ids and final.text == want.text
            assert "".join(u.text_delta or "" for u in updates) == want.text
            assert c._client_detokenizer(prompt, {}, True) is not None  # decoded here, not in the engine
        got = c.generate(prompts, stop)
        assert [o.text for o in got] == [o.text for o in expected_stop]
        assert [o.finish_reason for o in got] == [o.finish_reason for o in expected_stop]
    finally:
        c.shutdown(join_timeout=10)


def test_logprobs_and_bad_requests_cross_the_wire(client):
    out = client.generate(["w4 w5"], SamplingParams(max_new_tokens=3, temperature=0.0, logprobs=2,
                                                    prompt_logprobs=1))[0]
    assert len(out.logprobs) == 3 and all(len(top) == 2 for _, top in out.logprobs)
    assert all(isinstance(k, int) for _, top in out.logprobs for k in top)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(out.prompt_token_ids)
    bad = client.generate([[1, 500]], GREEDY)[0]  # a token id outside the vocabulary
    assert bad.finish_reason == "error" and "outside the vocabulary" in bad.error


def test_abort(client):
    updates: queue.SimpleQueue = queue.SimpleQueue()
    rid = client.submit("w4 w5", _long(), updates.put)
    first = _wait_first(updates)
    assert first.request_id == rid and not first.finished
    client.abort(rid)
    deadline = time.monotonic() + 10
    update = first
    while not update.finished:
        update = updates.get(timeout=max(0.1, deadline - time.monotonic()))
    assert update.output.finish_reason == "abort"
    assert len(update.output.token_ids) < 240
    assert client.num_waiting == 0

    # Closing a stream early aborts its request too; the engine goes on serving.
    stream = client.stream("w6 w7", _long())
    next(stream)
    stream.close()
    assert client.generate(["w8"], GREEDY)[0].finish_reason in ("length", "stop")


def test_sink_gets_engine_state_and_metrics_accept_it(client):
    pytest.importorskip("prometheus_client")
    from hf_paged.server.metrics import MetricsSink, ServerMetrics

    metrics = ServerMetrics("tiny")
    sink = MetricsSink(metrics, lambda: client.num_waiting)
    seen: list = []
    client.add_sink(lambda state, updates: seen.append((state, len(updates))))
    client.add_sink(sink)
    client.generate(PROMPTS[:2], GREEDY)
    deadline = time.monotonic() + 5
    while client.state.num_blocks_used and time.monotonic() < deadline:  # the idle state follows the last batch
        time.sleep(0.05)
    assert seen and all(isinstance(s, EngineState) for s, _ in seen)
    assert client.state.num_blocks_used == 0 and client.state.num_blocks_free == 64
    text = metrics.render().decode()
    assert 'hf_paged_kv_blocks_total{model_name="tiny"} 64.0' in text
    assert 'hf_paged_request_success_total{finished_reason="length",model_name="tiny"}' in text or \
        'hf_paged_request_success_total{finished_reason="stop",model_name="tiny"}' in text


def test_app_serves_through_the_process_client(client, model_dir):
    """`build_app` takes the client in place of an `Engine` (no lifespan here: the client lives on)."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from hf_paged.loader import load_tokenizer
    from hf_paged.server.app import build_app
    from hf_paged.server.config import ServerConfig

    tok = load_tokenizer(True, model_dir)
    config = ServerConfig(model_name="tiny", max_waiting=8)
    http = TestClient(build_app(client, tok, config))
    assert config.max_model_len == 256 and client.max_waiting == 8
    assert http.get("/health").json() == {"status": "ok"}
    expected = client.generate(["w4 w5 w6 w7"], GREEDY)[0]
    body = {"model": "tiny", "prompt": "w4 w5 w6 w7", "max_tokens": 12, "temperature": 0}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == expected.text
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as stream:
        events = [line for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert "hf_paged_kv_blocks_total{model_name=\"tiny\"} 64.0" in http.get("/metrics").text
    client.max_waiting = None


def test_shutdown_drains_and_leaves_no_child(client):
    updates: queue.SimpleQueue = queue.SimpleQueue()
    client.submit("w4", SamplingParams(max_new_tokens=20, temperature=0.0, ignore_eos=True), updates.put)
    started = time.monotonic()
    client.shutdown(drain_timeout=20, join_timeout=10)
    assert time.monotonic() - started < 20
    last = None
    while not updates.empty():
        last = updates.get()
    assert last is not None and last.finished and last.output.finish_reason == "length"
    assert not client.alive and client.error is None
    assert multiprocessing.active_children() == []
    with pytest.raises(EngineDeadError, match="shutting down"):
        client.submit("w4", GREEDY, lambda u: None)
    client.shutdown()  # idempotent


def test_killed_engine_process_fails_requests_and_refuses_new_ones(model_dir):
    client = EngineProcessClient(engine_factory(model_dir, LOAD, ENGINE), ready_timeout=120)
    try:
        updates: queue.SimpleQueue = queue.SimpleQueue()
        waiting: queue.SimpleQueue = queue.SimpleQueue()
        client.submit("w4 w5", _long(), updates.put)
        first = _wait_first(updates)
        assert not first.finished
        os.kill(client.pid, signal.SIGKILL)
        killed = time.monotonic()
        update = first
        while not update.finished:
            update = updates.get(timeout=5)
        assert time.monotonic() - killed < 5
        assert update.output.finish_reason == "error"
        assert update.output.error == "the engine process died (exit code -9)"
        assert not client.alive and client.error == "the engine process died (exit code -9)"
        with pytest.raises(EngineDeadError, match="exit code -9"):
            client.submit("w4", GREEDY, waiting.put)
        client.abort("nobody")  # no-op, no hang
    finally:
        started = time.monotonic()
        client.shutdown(join_timeout=5)
        assert time.monotonic() - started < 5
    assert multiprocessing.active_children() == []


def _engine_failing_after(model_dir: str, steps: int):
    """An engine whose `step` raises after ``steps`` steps (an error the engine cannot contain)."""
    engine = load_engine(model_dir, LOAD, ENGINE)
    real, count = engine.step, iter(range(steps))

    def step():
        if next(count, None) is None:
            raise RuntimeError("boom")
        return real()

    engine.step = step
    return engine


def test_engine_failure_in_the_process_fails_requests_with_its_reason(model_dir):
    import functools

    client = EngineProcessClient(functools.partial(_engine_failing_after, model_dir, 3), ready_timeout=120)
    try:
        out = client.generate(["w4 w5"], _long())[0]
        reason = "the engine stopped after an internal error: RuntimeError: boom"
        assert out.finish_reason == "error" and out.error == reason
        assert client.error == reason and not client.alive
        with pytest.raises(EngineDeadError, match="boom"):
            client.submit("w4", GREEDY, lambda u: None)
    finally:
        client.shutdown(join_timeout=5)
    assert multiprocessing.active_children() == []


def test_engine_that_cannot_be_built_says_why(tmp_path):
    started = time.monotonic()
    with pytest.raises(EngineStartError, match="failed to start: building the engine failed"):
        EngineProcessClient(engine_factory(str(tmp_path / "missing"), LOAD, ENGINE), ready_timeout=60)
    assert time.monotonic() - started < 60
    assert multiprocessing.active_children() == []


def test_serve_with_engine_process_end_to_end(model_dir):
    """``hf-paged serve DIR --engine-process``: one completion, then SIGINT: exit 0, no engine process left."""
    pytest.importorskip("fastapi")
    import httpx
    from server_harness import serve_process

    args = (model_dir, "--engine-process", "--num-blocks", "64", "--dtype", "float32", "--shutdown-timeout", "0")
    with serve_process(*args) as (proc, base):
        body = {"prompt": "w4 w5", "max_tokens": 5, "temperature": 0, "ignore_eos": True}
        r = httpx.post(f"{base}/v1/completions", json=body, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5, r.text
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "(engine process " in out and "KV pool: 64 blocks of 16 tokens" in out
    assert "engine stopped" in out and "Traceback" not in out
    pid = int(out.split("(engine process ")[1].split(")")[0])
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_one_engine_process_serves_two_front_ends(model_dir):
    """`EngineCoreProcess` for two front ends: each gets its own requests' updates only; one leaving (its
    long request aborted at its drain deadline) does not disturb the other; the core exits once both left."""
    from hf_paged.engine.process_client import EngineCoreProcess

    with load_engine(model_dir, LOAD, ENGINE) as alone:  # the same engine in this process
        want = [o.samples[0].token_ids for o in alone.generate(PROMPTS, GREEDY)]
    core = EngineCoreProcess(engine_factory(model_dir, LOAD, ENGINE), 2)
    try:
        a = EngineProcessClient.attach(core.front_ends[0], core.pid, 0, ready_timeout=120)
        b = EngineProcessClient.attach(core.front_ends[1], core.pid, 1, ready_timeout=120)
        seen: dict[str, set[str]] = {"a": set(), "b": set()}
        got_a: queue.SimpleQueue = queue.SimpleQueue()
        long_a = a.submit("w4 w5", _long(), lambda u: (seen["a"].add(u.request_id), got_a.put(u)))
        assert not _wait_first(got_a).finished
        outs = b.generate(PROMPTS, GREEDY)  # while a's request runs
        assert [o.samples[0].token_ids for o in outs] == want
        b_ids = {o.request_id for o in outs}
        assert seen["a"] == {long_a} and not b_ids & seen["a"]
        a.shutdown(drain_timeout=0.2, join_timeout=10)  # a leaves; its request is aborted, b stays
        last = None
        while not got_a.empty():
            last = got_a.get()
        assert last.finished and last.output.finish_reason == "abort"
        assert core.process.is_alive() and b.alive
        assert b.generate(["w10 w11"], _long(5))[0].finish_reason == "length"
        b.shutdown(join_timeout=10)
        core.process.join(10)
        assert core.process.exitcode == 0
    finally:
        core.close()
    assert multiprocessing.active_children() == []
