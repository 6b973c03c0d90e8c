"""The throughput benchmark runs end to end in its tiny mode (so the GPU run does not fail on a typo)."""

import importlib.util
import json
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "throughput.py"
    spec = importlib.util.spec_from_file_location("bench_throughput", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_benchmark_writes_results(bench, tmp_path):
    out = tmp_path / "result.json"
    argv = ["--tiny", "--num-requests", "12", "--baseline-requests", "4", "--baselines", "generate",
            "--profile", "--profile-steps", "2", "--out", str(out)]
    assert bench.main(argv) == 0
    report = json.loads(out.read_text())
    assert set(report["workloads"]) == {"uniform", "mixed"}
    for results in report["workloads"].values():
        ours = results["hf_paged"]
        assert ours["output_tokens"] > 0 and ours["output_tok_per_s"] > 0
        assert 0.0 <= ours["kv_waste"] < 1.0
        assert results["transformers_generate"]["hf_paged_speedup"] > 0
        assert results["profile"], "no window of one step kind was profiled"
        for kind, entry in results["profile"].items():
            assert kind in ("decode", "mixed") and entry["steps"] > 0 and "device_busy_pct" in entry
        assert ours["engine_warmup_s"] >= 0
    assert report["versions"]["transformers"]
