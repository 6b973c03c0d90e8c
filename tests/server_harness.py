"""Run the OpenAI-compatible server in a thread on 127.0.0.1 for the server tests."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from hf_paged import Engine
from hf_paged.server import ServerConfig, build_app
from hf_paged.server.demo import build_demo


def tiny_demo(seed: int = 0):
    """The demo model at test size (hidden 64, 2 layers) and its word-level tokenizer."""
    return build_demo(hidden_size=64, num_layers=2, max_position_embeddings=256, seed=seed)


def save_tiny_demo(path):
    """`tiny_demo` saved (model and tokenizer) at ``path``: what ``hf-paged serve DIR`` loads."""
    model, tok = tiny_demo()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def streamed_completion(base_url: str, body: dict, timeout: float = 120.0) -> str:
    """The text of a streamed ``/v1/completions`` request (choice 0's chunks joined)."""
    text = ""
    with httpx.stream("POST", f"{base_url}/v1/completions", json=dict(body, stream=True), timeout=timeout) as resp:
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                text += json.loads(line[6:])["choices"][0]["text"]
    return text


class ServerThread:
    """A uvicorn server for ``app`` in a daemon thread, on a free port bound before it starts."""

    def __init__(self, app) -> None:
        self.app = app
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def start(self, timeout: float = 30.0) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()
        assert not self._thread.is_alive(), "the test server did not stop"


def start_server(model, tokenizer, *, num_blocks: int = 256, max_num_seqs: int = 32, **config) -> ServerThread:
    engine = Engine(model, num_blocks=num_blocks, max_num_seqs=max_num_seqs, tokenizer=tokenizer)
    config.setdefault("model_name", "tiny")
    return ServerThread(build_app(engine, tokenizer, ServerConfig(**config))).start()


def metrics(base_url: str) -> dict[str, float]:
    """``/metrics`` parsed with prometheus_client's parser.

    Keys: each sample name (summed over labels), and ``name{label=value}`` for samples with a label
    besides ``model_name``.
    """
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
            extra = sorted((k, v) for k, v in sample.labels.items() if k != "model_name")
            if extra:
                key = sample.name + "{" + ",".join(f"{k}={v}" for k, v in extra) + "}"
                values[key] = values.get(key, 0.0) + sample.value
    return values


def wait_pool_whole(base_url: str, timeout: float = 20.0) -> dict[str, float]:
    """Poll ``/metrics`` until no request runs or waits and every KV block is free; returns the metrics."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(base_url)
        idle = m["hf_paged_num_requests_running"] == 0 and m["hf_paged_num_requests_waiting"] == 0
        if idle and m["hf_paged_kv_blocks_free"] == m["hf_paged_kv_blocks_total"]:
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"the KV pool is not whole again: {m}")
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_process(*args: str, timeout: float = 90.0):
    """``python -m hf_paged serve *args`` on a free port: yields ``(process, base URL)`` once ``/health``
    answers; the process is killed if it still runs at the end."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "hf_paged", "serve", *args, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        yield proc, base
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
