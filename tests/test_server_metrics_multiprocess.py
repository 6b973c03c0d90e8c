"""`hf_paged.server.metrics` with several front-end processes (prometheus_client's multiprocess mode)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.any_transformers  # .ci/run: newest Transformers only (see pyproject)

pytest.importorskip("prometheus_client")
pytest.importorskip("msgspec")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from hf_paged.engine import RequestUpdate  # noqa: E402
from hf_paged.engine.outputs import GenerationOutput, SampleOutput  # noqa: E402
from hf_paged.engine.wire import EngineState  # noqa: E402
from hf_paged.server.metrics import MetricsSink, ServerMetrics, mark_front_end_dead  # noqa: E402

_REPO = Path(__file__).resolve().parents[1]

# A front end over two engine steps: request "a" (3 prompt tokens) finishes after 2 tokens, "b" runs
# on; 2 requests wait. Its last engine state is (blocks used, cumulative preemptions) from argv,
# published once a line comes on stdin when argv says so (to order it after the other front end).
_FRONT_END = """
import sys
from hf_paged.engine import RequestUpdate
from hf_paged.engine.outputs import GenerationOutput, SampleOutput
from hf_paged.engine.wire import EngineState
from hf_paged.server.metrics import MetricsSink, ServerMetrics

used, preemptions, wait = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "wait"
sink = MetricsSink(ServerMetrics("m"), lambda: 2)
sink(EngineState(64, 8, 56, 0.5, 1), [RequestUpdate("a", 0, [7]), RequestUpdate("b", 0, [5])])
if wait:
    sys.stdin.readline()
done = GenerationOutput("a", None, [1, 2, 3], [SampleOutput(0, [7, 8], None, "length")],
                        time_to_first_token=0.01, total_time=0.05)
sink(EngineState(64, used, 64 - used, 0.5, preemptions),
     [RequestUpdate("a", 0, [8], finish_reason="length", output=done), RequestUpdate("b", 0, [6])])
"""

# Renders, marks the front end whose pid comes on stdin dead, renders again.
_SCRAPER = """
import sys
from hf_paged.server.metrics import ServerMetrics, mark_front_end_dead

metrics = ServerMetrics("m")
pid = int(sys.stdin.readline())
sys.stdout.write(metrics.render().decode() + "\\f")
mark_front_end_dead(pid)
sys.stdout.write(metrics.render().decode())
"""


def _spawn(code: str, env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=_REPO, env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(proc: subprocess.Popen, stdin: str = "") -> str:
    out, err = proc.communicate(stdin, timeout=60)
    assert proc.returncode == 0, err
    return out


def _values(text: str) -> dict[str, float | str]:
    """Sample name (with a ``finished_reason`` if any) -> value; ``TYPE name`` -> the family's type."""
    values: dict[str, float | str] = {}
    for family in text_string_to_metric_families(text):
        values["TYPE " + family.name] = family.type
        for s in family.samples:
            reason = s.labels.get("finished_reason")
            values[s.name + (f"{{{reason}}}" if reason else "")] = s.value
    return values


def test_front_ends_add_up_and_engine_figures_do_not(tmp_path):
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    # All three start at once (imports take seconds); the second front end's last engine state and
    # the scrapes wait for their turn on stdin.
    first = _spawn(_FRONT_END, env, "12", "3", "go")
    second = _spawn(_FRONT_END, env, "10", "4", "wait")
    scraper = _spawn(_SCRAPER, env)
    _finish(first)
    _finish(second, "\n")  # the engine's latest state: 10 blocks used, 4 preemptions so far
    before, after = (_values(t) for t in _finish(scraper, f"{first.pid}\n").split("\f"))

    p = "hf_paged_"
    for v in (before, after):  # counters and histograms: the sum over both front ends, dead or alive
        assert v[p + "generation_tokens_total"] == 8
        assert v[p + "prompt_tokens_total"] == 6
        assert v[p + "request_success_total{length}"] == 2
        assert v[p + "time_to_first_token_seconds_count"] == 2
        assert v[p + "e2e_request_latency_seconds_count"] == 2
        assert v[p + "inter_token_latency_seconds_count"] == 4  # one per request and later step
        # The engine's own figures: its latest state, not a sum (22, 128) nor a stale maximum (12).
        assert v[p + "kv_blocks_used"] == 10 and v[p + "kv_blocks_free"] == 54
        assert v[p + "kv_blocks_total"] == 64
        # Its cumulative preemptions, once (a sum would say 3 + 4); still a counter.
        assert v[p + "num_preemptions_total"] == 4 and v["TYPE " + p + "num_preemptions"] == "counter"
    assert before[p + "num_requests_running"] == 2 and before[p + "num_requests_waiting"] == 4
    assert after[p + "num_requests_running"] == 1 and after[p + "num_requests_waiting"] == 2


def test_single_process_metrics_unchanged(monkeypatch, tmp_path):
    """Without the variable (this process): one registry per `ServerMetrics`, sharing nothing."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        pytest.skip("this test process runs in multiprocess mode")
    a, b = ServerMetrics("m"), ServerMetrics("m")
    done = GenerationOutput("r", None, [1, 2], [SampleOutput(0, [3], None, "stop")], total_time=0.1)
    MetricsSink(a, lambda: 5)(EngineState(32, 4, 28, 0.0, 2), [RequestUpdate("r", 0, [3], "x", "stop", done)])
    MetricsSink(b, lambda: 0).publish(EngineState(32, 0, 32, 0.0, 0))
    va, vb = _values(a.render().decode()), _values(b.render().decode())
    assert va["hf_paged_generation_tokens_total"] == 1 and vb["hf_paged_generation_tokens_total"] == 0
    assert va["hf_paged_request_success_total{stop}"] == 1 and "hf_paged_request_success_total{stop}" not in vb
    assert va["hf_paged_num_preemptions_total"] == 2 and va["TYPE hf_paged_num_preemptions"] == "counter"
    assert va["hf_paged_num_requests_waiting"] == 5 and va["hf_paged_kv_blocks_used"] == 4
    assert "hf_paged_num_preemptions_created" in va  # only a process-local registry has these
    # The supervisor's call is harmless here, and only touches the live gauges' files of that pid.
    mark_front_end_dead(os.getpid())
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    for name in ("gauge_livesum_7.db", "gauge_mostrecent_7.db", "counter_7.db"):
        (tmp_path / name).touch()
    mark_front_end_dead(7)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["counter_7.db", "gauge_mostrecent_7.db"]
