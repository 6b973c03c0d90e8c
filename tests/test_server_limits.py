"""API key, the waiting-queue limit (429), missing chat templates, and engine-client shutdown.

The engine's ``step`` is gated by an event here, so "a request is waiting" is a fact, not a race.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402
from server_harness import ServerThread, metrics, tiny_demo, wait_pool_whole  # noqa: E402

from hf_paged import AsyncEngine, Engine, SamplingParams  # noqa: E402
from hf_paged.engine import EngineDeadError  # noqa: E402
from hf_paged.server import ServerConfig, build_app  # noqa: E402

KEY = "sekret"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}


def _gate(engine: Engine) -> threading.Event:
    """Make ``engine.step`` wait for the returned event (set: steps run freely)."""
    gate = threading.Event()
    gate.set()
    step = engine.step

    def gated_step():
        assert gate.wait(30), "test gate never opened"
        return step()

    engine.step = gated_step
    return gate


@pytest.fixture(scope="module")
def limited():
    """A server with an API key, ``max_waiting=1``, one running sequence and no chat template."""
    model, tok = tiny_demo(seed=1)
    tok.chat_template = None
    engine = Engine(model, num_blocks=64, max_num_seqs=1, tokenizer=tok)
    gate = _gate(engine)
    srv = ServerThread(build_app(engine, tok, ServerConfig(model_name="tiny", api_key=KEY, max_waiting=1))).start()
    yield srv, gate
    gate.set()
    srv.stop()


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_api_key(limited):
    srv, _ = limited
    url = f"{srv.base_url}/v1/completions"
    body = {"prompt": "hello", "max_tokens": 2}
    assert _error(httpx.post(url, json=body), 401)["code"] == "invalid_api_key"
    _error(httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"}), 401)
    _error(httpx.post(url, content=b"{broken", headers={"Authorization": "Basic x"}), 401)
    _error(httpx.get(f"{srv.base_url}/v1/models"), 401)
    assert httpx.post(url, json=body, headers=AUTH, timeout=30).status_code == 200
    assert httpx.get(f"{srv.base_url}/v1/models", headers=AUTH).status_code == 200
    # Health and metrics stay open for probes and scrapers.
    assert httpx.get(f"{srv.base_url}/health").status_code == 200
    assert httpx.get(f"{srv.base_url}/metrics").status_code == 200


def test_official_client_with_api_key(limited):
    openai = pytest.importorskip("openai")
    srv, _ = limited
    with openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key=KEY, max_retries=0, timeout=30) as client:
        assert client.completions.create(model="tiny", prompt="hello", max_tokens=2).usage.completion_tokens == 2
    with openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="nope", max_retries=0, timeout=30) as client:
        with pytest.raises(openai.AuthenticationError):
            client.completions.create(model="tiny", prompt="hello", max_tokens=2)


def test_no_chat_template_is_a_400(limited):
    srv, _ = limited
    err = _error(httpx.post(f"{srv.base_url}/v1/chat/completions", json=CHAT, headers=AUTH, timeout=30), 400)
    assert err["code"] == "no_chat_template" and "--chat-template" in err["message"]


def test_waiting_queue_limit_is_a_429(limited):
    srv, gate = limited
    url = f"{srv.base_url}/v1/completions"
    # Two prompts need two waiting slots at once: refused outright.
    _error(httpx.post(url, json={"prompt": ["a", "b"], "max_tokens": 2}, headers=AUTH), 429)

    gate.clear()  # the engine stalls in its next step: the next request waits
    results: dict = {}

    def first():
        results["first"] = httpx.post(url, json={"prompt": "hello world", "max_tokens": 3}, headers=AUTH, timeout=60)

    t = threading.Thread(target=first)
    t.start()
    try:
        deadline = time.monotonic() + 20
        while metrics(srv.base_url)["hf_paged_num_requests_waiting"] < 1:
            assert time.monotonic() < deadline, "the first request never counted as waiting"
            time.sleep(0.02)
        refused = httpx.post(url, json={"prompt": "hello", "max_tokens": 2}, headers=AUTH)
        err = _error(refused, 429)
        assert err["type"] == "rate_limit_error" and refused.headers["retry-after"] == "1"
    finally:
        gate.set()
        t.join(60)
    assert results["first"].status_code == 200
    assert results["first"].json()["usage"]["completion_tokens"] == 3
    wait_pool_whole(srv.base_url)
    # Room again once the queue drained.
    assert httpx.post(url, json={"prompt": "hello", "max_tokens": 2}, headers=AUTH, timeout=30).status_code == 200


def test_chat_template_option():
    model, tok = tiny_demo(seed=2)
    tok.chat_template = None
    template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    engine = Engine(model, num_blocks=32, tokenizer=tok)
    app = build_app(engine, tok, ServerConfig(model_name="tiny", chat_template=template))
    with TestClient(app) as http:
        r = http.post("/v1/chat/completions", json={**CHAT, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == 1  # "hello " through the custom template
        r = http.post("/v1/chat/completions", json={**CHAT, "stream": True})
        assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
    assert engine.kv_pool.blocks.num_free == engine.kv_pool.num_blocks


def test_engine_client_shutdown_aborts_in_flight_requests():
    model, tok = tiny_demo(seed=3)
    engine = Engine(model, num_blocks=32, tokenizer=tok)
    gate = _gate(engine)
    client = AsyncEngine(engine)
    updates: list = []
    done = threading.Event()

    def sink(update):
        updates.append(update)
        if update.finished:
            done.set()

    gate.clear()
    params = SamplingParams(max_new_tokens=200, temperature=0, ignore_eos=True)
    client.submit([5, 6, 7], params, sink, stream_text=True)
    stopper = threading.Thread(target=client.shutdown, kwargs={"drain_timeout": 0.0})
    stopper.start()
    time.sleep(0.05)
    gate.set()
    stopper.join(30)
    assert not stopper.is_alive() and not client.alive
    assert done.is_set()
    (final,) = [u for u in updates if u.finished]
    assert final.output.finish_reason == "abort"
    assert len(final.output.token_ids) < 200
    assert not engine.has_unfinished()
    assert engine.kv_pool.blocks.num_free == engine.kv_pool.num_blocks
    with pytest.raises(EngineDeadError):
        client.submit([5], params, sink)


def test_request_body_over_the_limit_is_a_413():
    model, tok = tiny_demo(seed=4)
    app = build_app(Engine(model, num_blocks=32, tokenizer=tok), tok,
                    ServerConfig(model_name="tiny", max_request_bytes=1000))
    with TestClient(app) as http:
        big = {"prompt": "hello " * 400, "max_tokens": 2}
        r = http.post("/v1/completions", json=big)
        assert r.status_code == 413 and "larger than 1000 bytes" in r.json()["error"]["message"]

        def chunks():  # no Content-Length: counted as it arrives
            yield b'{"prompt": "'
            for _ in range(50):
                yield b"hello " * 10
            yield b'", "max_tokens": 2}'

        r = http.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        assert http.post("/v1/completions", json={"prompt": "hello", "max_tokens": 2}).status_code == 200
