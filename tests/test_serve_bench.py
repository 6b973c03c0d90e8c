"""bench/serve.py: its dataset, arrivals and summary, and a short run against an in-process server."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from server_harness import save_tiny_demo, start_server, tiny_demo

_SPEC = importlib.util.spec_from_file_location("bench_serve", Path(__file__).parents[1] / "bench" / "serve.py")
serve = importlib.util.module_from_spec(_SPEC)
sys.modules["bench_serve"] = serve  # dataclasses look their module up
_SPEC.loader.exec_module(serve)

REQUIRED = ("gpu", "date", "server", "model", "base_url", "num_prompts", "max_concurrency", "request_rate",
            "max_tokens", "completed", "failed", "duration_s", "request_throughput", "output_throughput",
            "ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "goodput", "versions", "errors")


def test_poisson_delays_seeded_with_mean_one_over_rate():
    a = serve.poisson_delays(20000, 4.0, seed=1)
    assert a == serve.poisson_delays(20000, 4.0, seed=1)
    assert a != serve.poisson_delays(20000, 4.0, seed=2)
    assert min(a) >= 0 and np.mean(a) == pytest.approx(0.25, rel=0.03)
    assert serve.poisson_delays(5, math.inf, seed=0) == [0.0] * 5


def test_summarize_percentiles():
    s = serve.summarize([float(x) for x in range(1, 101)])
    assert s["mean"] == pytest.approx(50.5)
    assert s["p50"] == pytest.approx(50.5)
    assert s["p99"] == pytest.approx(99.01)
    assert serve.summarize([]) == {"mean": None, "p50": None, "p99": None}


def test_prompts_reproducible_and_varied():
    a = serve.make_prompts(200, seed=3)
    assert a == serve.make_prompts(200, seed=3) and a != serve.make_prompts(200, seed=4)
    lengths = [len(p.split()) for p in a]
    assert len(set(a)) > 150 and max(lengths) > 4 * min(lengths)


def test_parse_goodput():
    assert serve.parse_goodput(["ttft:500", "tpot:50"]) == {"ttft": 500.0, "tpot": 50.0}
    with pytest.raises(ValueError):
        serve.parse_goodput(["latency:5"])


@pytest.fixture(scope="module")
def server():
    model, tokenizer = tiny_demo()
    srv = start_server(model, tokenizer)
    yield srv
    srv.stop()


def test_main_against_server(server, tmp_path, capsys):
    out = tmp_path / "serve.json"
    res = serve.main(["--base-url", server.base_url, "--num-prompts", "20", "--max-concurrency", "8",
                      "--max-tokens", "8", "--ignore-eos", "--goodput", "ttft:60000", "tpot:60000",
                      "--timeout", "20", "--deadline", "25", "--out", str(out)])
    assert res["completed"] == 20 and res["failed"] == 0, res["errors"]
    assert res["model"] == "tiny" and res["total_output_tokens"] == 20 * 8
    assert res["input_tokens_known"] and res["total_input_tokens"] > 20
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert 0 < res[key]["p50"] <= res[key]["p99"], key
    assert res["ttft_ms"]["p99"] <= res["e2e_ms"]["p99"]
    assert res["goodput"]["good_requests"] == 20
    saved = json.loads(out.read_text())
    assert all(k in saved for k in REQUIRED)
    assert saved["versions"]["python"] and saved["versions"]["httpx"]
    assert "TTFT ms mean/p50/p99" in capsys.readouterr().out


def test_client_processes_share_the_prompts(server):
    """--num-clients 2: both processes' requests come back in prompt order, with each process's CPU share;
    --server-pid records the server's processes (here this one, which runs the test server)."""
    import os

    res = serve.main(["--base-url", server.base_url, "--num-prompts", "10", "--max-concurrency", "4",
                      "--max-tokens", "4", "--ignore-eos", "--num-clients", "2", "--server-pid", str(os.getpid()),
                      "--timeout", "20", "--deadline", "25", "--out", os.devnull])
    assert res["completed"] == 10 and res["failed"] == 0 and res["total_output_tokens"] == 40, res["errors"]
    assert res["num_clients"] == 2 and len(res["client_busy"]) == 2
    assert 0 < res["duration_s"] < 20  # from the common start, not from when the processes were spawned
    assert [p["pid"] for p in res["server_processes"]][0] == os.getpid()


def test_chunk_counting_without_usage_and_poisson_arrivals(server):
    prompts = serve.make_prompts(10, seed=5)
    results, duration = asyncio.run(serve.run_benchmark(
        server.base_url, "tiny", prompts, endpoint="completions", request_rate=50.0, max_tokens=6,
        ignore_eos=True, timeout=20, deadline=25, include_usage=False))
    assert all(r.ok for r in results), [r.error for r in results]
    for r in results:  # each content chunk is one arrival; without usage, tokens are counted by chunks
        assert r.prompt_tokens is None and r.output_tokens == r.chunks and 1 <= r.chunks <= 6
        assert len(r.itl) == r.chunks - 1
    rep = serve.report(results, duration)
    assert rep["completed"] == 10 and "goodput" not in rep and not rep["input_tokens_known"]


def test_failures_are_recorded(server):
    results, duration = asyncio.run(serve.run_benchmark(
        server.base_url, "tiny", ["hello"] * 3, max_tokens=-1, timeout=10, deadline=15))
    rep = serve.report(results, duration)
    assert rep["completed"] == 0 and rep["failed"] == 3 and rep["errors"][0].startswith("HTTP 4")


def test_offline_engine_beside_the_server(server, tmp_path):
    """--offline runs the same chats through the offline Engine and records the server's share of its tok/s."""
    model_dir = save_tiny_demo(tmp_path / "tiny")
    res = serve.main(["--base-url", server.base_url, "--num-prompts", "12", "--max-concurrency", "4",
                      "--max-tokens", "6", "--ignore-eos", "--offline", str(model_dir), "--timeout", "20",
                      "--deadline", "25", "--out", str(tmp_path / "serve.json")])
    assert res["completed"] == 12 and res["offline"]["output_tokens"] == 12 * 6
    assert res["output_throughput_over_offline"] == res["output_throughput"] / res["offline"]["output_throughput"]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_process_cpu_counts_this_process_work():
    import os
    import time

    before = serve.process_cpu_s(os.getpid())
    end = time.process_time() + 0.2
    while time.process_time() < end:  # 0.2 s of this process's CPU
        pass
    spent = serve.process_cpu_s(os.getpid()) - before
    assert 0.1 <= spent <= 5.0, spent
    assert serve.process_cpu_s(2**22 + 12345) is None  # no such process
