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
            "--profile", "--profile-steps", "2", "--head-dim", "32", "--out", str(out)]
    assert bench.main(argv) == 0
    report = json.loads(out.read_text())
    shape = report["model"]["shape"]
    assert (shape["head_dim"], shape["num_attention_heads"], shape["num_key_value_heads"]) == (32, 2, 1)
    assert set(report["workloads"]) == {"uniform", "mixed"}
    for results in report["workloads"].values():
        ours = results["hf_paged"]
        assert ours["output_tokens"] > 0 and ours["output_tok_per_s"] > 0
        assert 0.0 <= ours["kv_waste"] < 1.0
        assert results["transformers_generate"]["hf_paged_speedup"] > 0
        assert results["profile"], "no window of one step kind was profiled"
        for kind, entry in results["profile"].items():
            assert kind in ("decode", "mixed", "prefill") and entry["steps"] > 0 and "device_busy_pct" in entry
        assert ours["engine_warmup_s"] >= 0
        # the steps' periods: the slowest names a step of the run, at least as long as the median
        assert ours["slowest_step_ms"] >= ours["median_step_ms"] > 0
        assert 0 <= ours["slowest_step_index"] < ours["steps"] and ours["slowest_step_tokens"] > 0
    assert report["versions"]["transformers"]


def test_one_engine_per_kernel_backend(bench, tmp_path, monkeypatch):
    """--backends: each backend gets an engine of its own in the same process; results per backend."""
    import torch

    from hf_paged.kernels import get_backend, hookimpl, plugin_manager, reference

    class Other:  # the reference under a second name: CPU has one backend only
        name = "other"
        store_kv = staticmethod(reference.store_kv)
        paged_attention = staticmethod(reference.paged_attention)

        @hookimpl
        def hf_paged_kernel_backend(self, device, dtype):
            return self if device.type == "cpu" else None

    monkeypatch.setenv("HF_PAGED_BACKEND", "reference")  # restored afterwards: the benchmark sets it
    plugin = Other()
    plugin_manager().register(plugin, name="other")
    out = tmp_path / "result.json"
    try:
        argv = ["--tiny", "--num-requests", "6", "--baselines", "none", "--backends", "reference,other",
                "--out", str(out)]
        assert bench.main(argv) == 0
    finally:
        plugin_manager().unregister(plugin)
        monkeypatch.delenv("HF_PAGED_BACKEND")
        get_backend.cache_clear()
    report = json.loads(out.read_text())
    assert report["kernel_backends"] == ["reference", "other"]
    for results in report["workloads"].values():
        assert results["hf_paged_reference"]["kernel_backend"] == "reference"
        assert results["hf_paged_other"]["kernel_backend"] == "other"
        assert results["hf_paged"] == results["hf_paged_reference"]
        assert results["hf_paged_other"]["output_tokens"] == results["hf_paged_reference"]["output_tokens"] > 0
    assert get_backend(torch.device("cpu"), torch.float32).name == "reference"


@pytest.mark.any_transformers  # bench/scale.py's plumbing; TP itself is tested on both Transformers by test_distributed
def test_scale_benchmark_tiny_tp1_and_tp2(tmp_path):
    """bench/scale.py on CPU: a tiny checkpoint whose weights each rank draws at load time, one
    process vs TP=2 over gloo; the JSON has the issue's fields."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "bench" / "scale.py"
    out = tmp_path / "scale.json"
    cmd = [sys.executable, str(script), "--shape", "tiny", "--build", "--draw-weights", "--device", "cpu",
           "--model-dir", str(tmp_path / "tiny"), "--configs", "tp1,tp2", "--workloads", "uniform",
           "--num-requests", "4", "--latency-tokens", "8", "--max-num-seqs", "4", "--dtype", "float32", "--timeout", "240", "--out", str(out),
           "--logs", str(tmp_path / "logs"), "--profile", "--profile-steps", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = sorted((tmp_path / "logs").glob("scale-*.log"))  # each configuration's log, all ranks in it, named
    assert [p.name.split("-")[1] for p in logs] == ["tp1", "tp2"] and all(str(p) in proc.stdout for p in logs)
    report = json.loads(out.read_text())
    from safetensors import safe_open

    with safe_open(str(tmp_path / "tiny" / "model.safetensors"), "pt") as saved:
        assert list(saved.keys()) == ["model.norm.weight"]  # the ranks drew every other weight
    for key in ("date", "gpu", "tp1_tok_s", "tp2_tok_s", "tp2_over_tp1", "tp2_batch1_latency_ratio"):
        assert report[key] is not None, key
    assert report["runs"]["tp2"]["tensor_parallel_size"] == 2
    for config in ("tp1", "tp2"):  # --profile: the batch-1 decode steps after the first three, op by op
        profiled = report["runs"][config]["batch1_profile"]
        assert profiled["steps"] == 8 - 3 and profiled["top"][0]["calls_per_step"] > 0, profiled
    # Greedy tokens: TP=2 draws its own random weights, so only the shape of the answer is compared.
    assert len(report["runs"]["tp2"]["greedy_tokens"]) == len(report["runs"]["tp1"]["greedy_tokens"]) == 8


def test_generate_speed_benchmark_runs(tmp_path):
    """bench/generate_speed.py (model.generate, paged vs sdpa) in its tiny mode, in a process of its own."""
    import subprocess
    import sys

    out = tmp_path / "speed.json"
    script = Path(__file__).resolve().parents[1] / "bench" / "generate_speed.py"
    proc = subprocess.run([sys.executable, str(script), "--tiny", "--dtype", "float32", "--batches", "1,2", "--profile", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 2]
    # fp32: same tokens (the CPU has no graphs: "paged" and "paged eager" both run eagerly here)
    assert all(r["paged_ms_per_token"] > 0 and r["same_tokens"] == r["same_tokens_paged_eager"] == 1.0 for r in rows)
    # --tiny times one repeat: the paired ratio is that repeat's sdpa over paged seconds
    assert all(len(r["paged_s"]) == 1 and r["paged_paired_speedup"] == pytest.approx(r["sdpa_s"][0] / r["paged_s"][0])
               for r in rows)
    assert all(r["paged_profile"] and r["paged_profile"][0]["calls"] > 0 for r in rows)
