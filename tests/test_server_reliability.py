"""Reliability of the OpenAI-compatible server on CPU: many concurrent streams, a disconnect storm, a soak.

One server (tiny demo model, 2048 KV blocks, 256 running sequences) runs in a thread for the whole
module; every test works on metric deltas and leaves it idle with the KV pool whole. Every wait is a
bounded poll or an ``asyncio.wait_for``, never a bare sleep.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import random
import time
from typing import Self

import httpx
import pytest

pytestmark = pytest.mark.any_transformers  # .ci/run: newest Transformers only (see pyproject)

pytest.importorskip("fastapi")
psutil = pytest.importorskip("psutil")

from server_harness import metrics, start_server, tiny_demo, wait_pool_whole  # noqa: E402

from hf_paged.server.demo import _WORDS  # noqa: E402

ABORT = "hf_paged_request_success_total{finished_reason=abort}"
LENGTH = "hf_paged_request_success_total{finished_reason=length}"


@pytest.fixture(scope="module")
def server():
    model, tok = tiny_demo(seed=3)
    srv = start_server(model, tok, num_blocks=2048, max_num_seqs=256, model_name="tiny")
    yield srv
    srv.stop()


def sse_payloads(lines: list[str]) -> list[dict]:
    """Parsed ``data:`` payloads of an SSE body; the last one must be ``[DONE]``."""
    events = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]


def wait_idle(base_url: str, timeout: float = 30.0) -> dict[str, float]:
    """`wait_pool_whole`, then check no block is owned by a sequence."""
    m = wait_pool_whole(base_url, timeout=timeout)
    assert m["hf_paged_kv_blocks_used"] == 0, m
    return m


def delta(after: dict, before: dict, key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


# -- 1. many concurrent streams -------------------------------------------------------------------


def test_512_concurrent_streaming_clients(server):
    clients, max_tokens = 512, 4
    before = metrics(server.base_url)

    async def scenario():
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60, limits=limits) as http:

            async def one(i: int):
                body = {"prompt": f"hello {_WORDS[i % len(_WORDS)]}", "max_tokens": max_tokens,
                        "temperature": 0, "ignore_eos": True, "stream": True,
                        "stream_options": {"include_usage": True}}
                async with http.stream("POST", "/v1/completions", json=body) as r:
                    assert r.status_code == 200, await r.aread()
                    events = sse_payloads([line async for line in r.aiter_lines()])
                finish = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
                assert finish == ["length"], events
                assert events[-1]["usage"]["completion_tokens"] == max_tokens
                return True

            results = await asyncio.wait_for(
                asyncio.gather(*(one(i) for i in range(clients)), return_exceptions=True), 60)
            return results

    results = asyncio.run(scenario())
    failed = [r for r in results if r is not True]
    assert not failed, f"{len(failed)} of {clients} failed, e.g. {failed[:3]!r}"
    m = wait_idle(server.base_url)
    assert delta(m, before, LENGTH) == clients
    assert delta(m, before, ABORT) == 0


# -- 2. disconnect storm --------------------------------------------------------------------------


def test_disconnect_storm(server):
    """64 streams; the odd ones leave after their first event. The dropped ones ask for 240 tokens
    (the CPU server cannot finish them before it notices the client left), the others for 64."""
    clients, keep_tokens, drop_tokens = 64, 64, 240
    before = metrics(server.base_url)

    async def scenario():
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60, limits=limits) as http:

            async def one(i: int):
                drop = i % 2 == 1
                body = {"prompt": f"the cache of {_WORDS[i % len(_WORDS)]}",
                        "max_tokens": drop_tokens if drop else keep_tokens, "temperature": 0.7, "seed": i,
                        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
                lines = []
                async with http.stream("POST", "/v1/completions", json=body) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        lines.append(line)
                        if drop and line.startswith("data: {"):
                            return None  # leaving the block closes the connection mid-stream
                events = sse_payloads(lines)
                text_events = [e for e in events if e["choices"] and e["choices"][0]["finish_reason"] is None]
                finish = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
                assert finish == ["length"]
                assert events[-1]["usage"]["completion_tokens"] == keep_tokens
                assert 0 < len(text_events) <= keep_tokens
                return events[-1]["usage"]["completion_tokens"]

            return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(clients))), 60)

    results = asyncio.run(scenario())
    assert results[0::2] == [keep_tokens] * (clients // 2)
    m = wait_idle(server.base_url)
    assert delta(m, before, ABORT) == clients // 2, m
    assert delta(m, before, LENGTH) == clients // 2, m
    # The dropped ones stopped early: far fewer tokens than if they had run to the end.
    generated = delta(m, before, "hf_paged_generation_tokens_total")
    assert generated < clients // 2 * (keep_tokens + drop_tokens // 2), generated


# -- 3. soak --------------------------------------------------------------------------------------

STOP_WORDS = ["the", "of", "and", "water", "cache", "token", ".", "!", "hello world", "time"]
PROMPT_WORDS = [w for w in _WORDS if w.isalpha()]


def _random_request(rng: random.Random) -> tuple[str, dict]:
    chat = rng.random() < 0.4
    body: dict = {"model": "tiny", "max_tokens": rng.randint(1, 12), "n": rng.randint(1, 3),
                  "stream": rng.random() < 0.5}
    words = " ".join(rng.choices(PROMPT_WORDS, k=rng.randint(1, 12)))
    if chat:
        body["messages"] = [{"role": "user", "content": words}]
    else:
        body["prompt"] = words
    if rng.random() < 0.8:
        body["temperature"] = round(rng.uniform(0.0, 1.5), 2)
    if rng.random() < 0.5:
        body["top_p"] = round(rng.uniform(0.3, 1.0), 2)
    if rng.random() < 0.5:
        body["top_k"] = rng.choice([-1, 1, 5, 20, 100])
    if rng.random() < 0.5:
        body["seed"] = rng.randint(0, 2**31 - 1)
    if rng.random() < 0.4:
        body["stop"] = rng.sample(STOP_WORDS, rng.randint(1, 3))
    if rng.random() < 0.3:
        body["ignore_eos"] = True
    if body["stream"] and rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}
    return ("/v1/chat/completions" if chat else "/v1/completions"), body


def _check_response(path: str, body: dict, status: int, payload) -> None:
    """A completed response is well formed: one finished choice per sample, usage consistent."""
    assert status == 200, (status, payload)
    n, chat = body["n"], path.endswith("chat/completions")
    if body["stream"]:
        finishes: dict[int, str] = {}
        usage = None
        for event in payload:
            assert event["object"] == ("chat.completion.chunk" if chat else "text_completion")
            if event.get("usage"):
                assert not event["choices"]
                usage = event["usage"]
            for c in event["choices"]:
                assert 0 <= c["index"] < n
                assert c["index"] not in finishes, "an event after the choice finished"
                if c["finish_reason"] is not None:
                    finishes[c["index"]] = c["finish_reason"]
                else:
                    assert isinstance(c["delta"]["content"] if chat else c["text"], str)
        assert sorted(finishes) == list(range(n)), finishes
        assert set(finishes.values()) <= {"stop", "length"}, finishes
        if body.get("stream_options", {}).get("include_usage"):
            assert usage is not None and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
            assert usage["completion_tokens"] <= n * body["max_tokens"]
        return
    assert payload["object"] == ("chat.completion" if chat else "text_completion")
    choices = payload["choices"]
    assert sorted(c["index"] for c in choices) == list(range(n))
    for c in choices:
        assert c["finish_reason"] in ("stop", "length"), c
        assert isinstance(c["message"]["content"] if chat else c["text"], str)
    usage = payload["usage"]
    assert usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["completion_tokens"] <= n * body["max_tokens"]
    if all(c["finish_reason"] == "length" for c in choices):
        assert usage["completion_tokens"] == n * body["max_tokens"], payload


class _ErrorLog(logging.Handler):
    """Collects ERROR records of the server's loggers (uvicorn's do not reach pytest's caplog)."""

    NAMES = ("uvicorn.error", "uvicorn.asgi", "hf_paged")

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(self.format(record))

    def __enter__(self) -> Self:
        for name in self.NAMES:
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        for name in self.NAMES:
            logging.getLogger(name).removeHandler(self)


def _rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def test_soak_mixed_random_requests_with_aborts(server):
    """Scaled to CI: 2 x 500 requests (``HF_PAGED_SOAK_REQUESTS=10000`` for the full soak; completions
    and chat, streaming and not, random sampling parameters, n in 1..3, stop strings), about 20%
    cancelled by the client after a random short delay, at most 64 in flight. No 5xx, every completed response well formed, no leaked KV block,
    and the process RSS (the server runs in this process) grows by at most 64 MiB from the end of
    the first half to the end of the second."""
    per_half, concurrency, abort_share = int(os.environ.get("HF_PAGED_SOAK_REQUESTS", "1000")) // 2, 64, 0.2
    rng = random.Random(1234)
    plan = [(_random_request(rng), rng.random() < abort_share, rng.uniform(0.0, 0.15)) for _ in range(2 * per_half)]
    statuses: list[int] = []
    checked = {"completed": 0, "cancelled": 0}
    before = metrics(server.base_url)
    started = time.monotonic()

    async def run_half(items):
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60, limits=limits) as http:
            gate = asyncio.Semaphore(concurrency)

            async def request(path: str, body: dict):
                if body["stream"]:
                    async with http.stream("POST", path, json=body) as r:
                        statuses.append(r.status_code)
                        if r.status_code != 200:
                            return r.status_code, await r.aread()
                        return r.status_code, sse_payloads([line async for line in r.aiter_lines()])
                r = await http.post(path, json=body)
                statuses.append(r.status_code)
                return r.status_code, r.json()

            async def one(item):
                (path, body), cancel, delay = item
                async with gate:
                    task = asyncio.create_task(request(path, body))
                    if cancel:
                        done, _ = await asyncio.wait({task}, timeout=delay)
                        if not done:
                            task.cancel()
                            try:
                                await task
                            except asyncio.CancelledError:
                                checked["cancelled"] += 1
                                return
                    status, payload = await task
                _check_response(path, body, status, payload)
                checked["completed"] += 1

            await asyncio.wait_for(asyncio.gather(*(one(item) for item in items)), max(40.0, 0.08 * len(items)))

    with _ErrorLog() as errors:
        asyncio.run(run_half(plan[:per_half]))
        wait_idle(server.base_url)
        rss_first = _rss()
        asyncio.run(run_half(plan[per_half:]))
        m = wait_idle(server.base_url)
        rss_second = _rss()
    elapsed = time.monotonic() - started
    print(f"soak: {checked}, aborts {delta(m, before, ABORT):.0f}, rss {rss_first >> 20} -> {rss_second >> 20} MiB, "
          f"{elapsed:.1f} s")

    assert not errors.records, errors.records[:3]
    assert not [s for s in statuses if s >= 500], sorted(set(statuses))
    assert set(statuses) <= {200}, sorted(set(statuses))
    assert checked["completed"] + checked["cancelled"] == 2 * per_half
    assert checked["cancelled"] > 0 and checked["completed"] > per_half
    assert delta(m, before, ABORT) >= 1  # some cancels reached a running request
    assert rss_second - rss_first < 64 * 2**20, (rss_first, rss_second)
    assert elapsed < 45 * max(1.0, per_half / 500), elapsed


# -- 4. non-streaming clients that leave ----------------------------------------------------------


def test_non_streaming_disconnect_aborts(server):
    """8 non-streaming requests (n=16, 240 tokens: 128 sequences, several seconds on CPU) whose
    clients leave after 0.5 s are aborted, not run to the end."""
    clients, n, max_tokens = 8, 16, 240
    before = metrics(server.base_url)

    async def scenario():
        limits = httpx.Limits(max_connections=clients)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60, limits=limits) as http:
            body = {"prompt": "the cache of", "max_tokens": max_tokens, "n": n, "temperature": 1.0,
                    "ignore_eos": True}
            tasks = [asyncio.create_task(http.post("/v1/completions", json={**body, "seed": i}))
                     for i in range(clients)]
            done, pending = await asyncio.wait(tasks, timeout=0.5)
            assert not done, "the requests finished before their clients left: make them longer"
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    asyncio.run(scenario())
    m = wait_idle(server.base_url)
    assert delta(m, before, ABORT) == clients, {k: v for k, v in m.items() if "success" in k}
    generated = delta(m, before, "hf_paged_generation_tokens_total")
    assert generated < clients * n * max_tokens // 2, generated
