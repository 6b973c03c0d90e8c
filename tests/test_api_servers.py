"""``hf-paged serve --api-server-count N``: N front-end processes over one engine process."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import time

import pytest

pytestmark = pytest.mark.any_transformers  # .ci/run: newest Transformers only (see pyproject)

pytest.importorskip("fastapi")
pytest.importorskip("zmq")
import httpx
from server_harness import metrics, save_tiny_demo, serve_process, streamed_completion

from hf_paged import SamplingParams, generate_batch
from hf_paged.loader import load_model
from hf_paged.server.cli import main

ARGS = ("--api-server-count", "2", "--num-blocks", "64", "--dtype", "float32", "--shutdown-timeout", "0")


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    return str(save_tiny_demo(tmp_path_factory.mktemp("saved") / "tiny-saved"))


@pytest.fixture
def free_port_args():
    from argparse import Namespace

    from server_harness import free_port

    return Namespace(host="127.0.0.1", port=free_port(), log_level="warning", shutdown_timeout=0.0)


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not [p for p in pids if os.path.exists(f"/proc/{p}") and "(Z)" not in _stat(p)]:
            return True
        time.sleep(0.1)
    return False


def _stat(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            status = f.read().split(") ", 1)[1][0]
        return f"({status})"
    except (FileNotFoundError, IndexError):
        return "(Z)"


def test_two_front_ends_serve_one_engine_and_stop_cleanly(saved_model):
    """Concurrent streams through both front ends give one process's tokens beside clients that leave
    mid-stream; /metrics sums the front ends and reads the engine's pool (back to zero blocks); SIGINT
    drains everything and exits 0 with no process left."""
    model, tok = load_model(saved_model, dtype="float32", device="cpu")
    prompts = [f"hello w{i}" for i in range(12)]
    want = [o.text for o in generate_batch(model, prompts, SamplingParams(max_new_tokens=6, temperature=0.0,
                                                                          ignore_eos=True),
                                           tokenizer=tok, progress=False)]
    with serve_process(saved_model, *ARGS, timeout=180) as (proc, base):
        children = _children(proc.pid)
        assert len(children) >= 3  # the engine process, two front ends (and multiprocessing's resource tracker)

        def one(prompt: str) -> str:
            body = {"prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
            return streamed_completion(base, body)

        def leave_early(i: int) -> None:  # a disconnect storm beside them
            body = {"prompt": f"w{i}", "max_tokens": 200, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as stream:
                next(line for line in stream.iter_lines() if line.startswith("data: {"))

        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            storm = [pool.submit(leave_early, i) for i in range(8)]
            got = list(pool.map(one, prompts))
            for f in storm:
                f.result()
        assert got == want
        deadline = time.monotonic() + 10
        while (m := metrics(base))["hf_paged_request_success_total"] < len(prompts) + 8:
            assert time.monotonic() < deadline, m
            time.sleep(0.2)
        assert m["hf_paged_request_success_total{finished_reason=abort}"] == 8
        assert m["hf_paged_kv_blocks_used"] == 0 and m["hf_paged_kv_blocks_total"] == 64
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "(engine process " in out and "2 API server processes" in out and "Traceback" not in out
    assert out.count("KV pool: 64 blocks of 16 tokens") == 1
    assert _gone(children, 10)


def test_engine_death_fails_streams_and_exits_non_zero(saved_model):
    """A dead engine process ends the streams in flight with its error, and the supervisor stops the front
    ends and exits 1."""
    with serve_process(saved_model, *ARGS, timeout=180) as (proc, base):
        children = _children(proc.pid)
        head = ""
        while not (found := re.search(r"engine process (\d+)", head)):
            head += proc.stdout.readline()
        engine_pid = int(found.group(1))
        assert engine_pid in children
        body = {"prompt": "hello", "max_tokens": 200, "ignore_eos": True, "stream": True}
        events = []
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=30) as stream:
            for line in stream.iter_lines():
                if line.startswith("data: ") and not events:
                    os.kill(engine_pid, signal.SIGKILL)
                if line.startswith("data: "):
                    events.append(line[6:])
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])
        assert "error" in last and "engine process died" in last["error"]["message"], last
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, out
    assert "the engine process died (exit code -9): stopping the server" in out
    assert _gone(children, 10)


def test_killed_supervisor_leaves_no_process(saved_model):
    with serve_process(saved_model, *ARGS, timeout=180) as (proc, base):
        children = _children(proc.pid)
        proc.kill()
        proc.communicate(timeout=10)
    assert _gone(children, 15), [(p, _stat(p)) for p in children]


def test_api_server_count_needs_the_engine_process(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--demo", "--api-server-count", "2", "--no-engine-process"])
    assert e.value.code == 2
    assert "--api-server-count > 1 needs the engine in a process of its own" in capsys.readouterr().err


def test_a_server_whose_engine_failed_stops_with_status_1(free_port_args):
    """`run_app` (one front end): once the engine client reports an error, uvicorn stops and the status is 1."""
    import threading

    from fastapi import FastAPI

    from hf_paged.server.api_servers import run_app

    class FailingClient:
        error = None
        shutdown_requested = False

        def request_shutdown(self, drain_timeout: float) -> None:
            self.shutdown_requested = True

    app = FastAPI()
    app.state.engine_client = client = FailingClient()
    threading.Timer(0.5, lambda: setattr(client, "error", "the engine process died (exit code -9)")).start()
    started = time.monotonic()
    assert run_app(app, free_port_args) == 1
    assert time.monotonic() - started < 10 and client.shutdown_requested
