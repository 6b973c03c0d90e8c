"""The OpenAI-compatible server against `generate_batch`, through the official client and raw HTTP.

One server (tiny demo model, CPU) runs in a thread for the whole module; each test leaves it idle.
"""

from __future__ import annotations

import asyncio
import copy
import json

import httpx
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from server_harness import metrics, start_server, tiny_demo, wait_pool_whole  # noqa: E402

from hf_paged import SamplingParams, generate_batch  # noqa: E402

PROMPTS = ["hello world", "the cache of attention", "one two three four five six seven"]


@pytest.fixture(scope="module")
def demo():
    return tiny_demo()


@pytest.fixture(scope="module")
def server(demo):
    model, tok = demo
    srv = start_server(model, tok, model_name="tiny")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def reference(demo):
    """Greedy `generate_batch` outputs on a private copy of the model (the server's is in use)."""
    model, tok = demo
    model = copy.deepcopy(model)
    cache: dict = {}

    def run(prompt, max_tokens: int):
        key = (str(prompt), max_tokens)
        if key not in cache:
            params = SamplingParams(max_new_tokens=max_tokens, temperature=0.0)
            (cache[key],) = generate_batch(model, [prompt], params, tokenizer=tok, progress=False, num_blocks=64)
        return cache[key]

    return run


def chat_ids(tok, messages) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def sse_events(lines) -> list:
    """Parsed ``data:`` payloads of an SSE body; the last one must be ``[DONE]``."""
    events = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]


# -- parity ---------------------------------------------------------------------------------------


def test_greedy_completions_match_generate_batch(client, reference, demo):
    _, tok = demo
    resp = client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=12, temperature=0)
    assert resp.object == "text_completion" and resp.model == "tiny" and resp.id.startswith("cmpl-")
    assert [c.index for c in resp.choices] == [0, 1, 2]
    want_prompt = want_completion = 0
    for prompt, choice in zip(PROMPTS, resp.choices):
        ref = reference(prompt, 12)
        assert choice.text == ref.text
        assert choice.finish_reason == ref.finish_reason
        want_prompt += len(tok(prompt)["input_ids"])
        want_completion += len(ref.token_ids)
    assert resp.usage.prompt_tokens == want_prompt
    assert resp.usage.completion_tokens == want_completion
    assert resp.usage.total_tokens == want_prompt + want_completion


def test_token_id_prompts(client, reference):
    ids = [[5, 207, 47, 30], [40, 41]]
    resp = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    assert [c.text for c in resp.choices] == [reference(p, 6).text for p in ids]
    single = client.completions.create(model="tiny", prompt=ids[0], max_tokens=6, temperature=0)
    assert single.choices[0].text == resp.choices[0].text


def test_greedy_chat_matches_generate_batch(client, reference, demo):
    _, tok = demo
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    resp = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=10, temperature=0)
    ids = chat_ids(tok, messages)
    ref = reference(ids, 10)
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")
    (choice,) = resp.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == ref.text
    assert choice.finish_reason == ref.finish_reason
    assert resp.usage.prompt_tokens == len(ids)
    assert resp.usage.completion_tokens == len(ref.token_ids)


# -- streaming ------------------------------------------------------------------------------------


def test_streaming_completion_equals_non_streaming(client):
    kwargs = dict(model="tiny", prompt=PROMPTS, max_tokens=12, temperature=0)
    whole = client.completions.create(**kwargs)
    texts = {i: "" for i in range(len(PROMPTS))}
    finish = {}
    usage = None
    for chunk in client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason is not None:
                finish[c.index] = c.finish_reason
    assert [texts[i] for i in range(len(PROMPTS))] == [c.text for c in whole.choices]
    assert [finish[i] for i in range(len(PROMPTS))] == [c.finish_reason for c in whole.choices]
    assert usage is not None and usage.model_dump() == whole.usage.model_dump()


def test_streaming_chat_equals_non_streaming(client):
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": "tell me about the block cache"}],
                  max_tokens=10, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_raw_sse_format(server):
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(list(r.iter_lines()))
    assert all(e["object"] == "text_completion" for e in events)
    assert events[-1]["choices"][0]["finish_reason"] == "length"


# -- sampling options -----------------------------------------------------------------------------


def test_n_samples(client, reference):
    greedy = client.completions.create(model="tiny", prompt="hello world", max_tokens=8, temperature=0, n=2)
    assert [c.index for c in greedy.choices] == [0, 1]
    assert greedy.choices[0].text == greedy.choices[1].text == reference("hello world", 8).text
    assert greedy.usage.completion_tokens == 2 * len(reference("hello world", 8).token_ids)

    kwargs = dict(model="tiny", prompt=["hello", "world"], max_tokens=8, temperature=1.0, n=2, seed=7)
    sampled = client.completions.create(**kwargs)
    assert [c.index for c in sampled.choices] == [0, 1, 2, 3]
    again = client.completions.create(**kwargs)
    assert [c.text for c in again.choices] == [c.text for c in sampled.choices]  # seeded

    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                          n=2, temperature=1.0, seed=3)
    assert sorted(c.index for c in chat.choices) == [0, 1]

    texts, finish = ["", "", "", ""], [None] * 4
    for chunk in client.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.text
            finish[c.index] = c.finish_reason or finish[c.index]
    assert texts == [c.text for c in sampled.choices]
    assert finish == [c.finish_reason for c in sampled.choices]


def test_stop_strings(client, reference):
    ref = reference("the cache of attention", 12)
    words = ref.text.split()
    stop = words[len(words) // 2]
    expected = ref.text[: ref.text.find(stop)]
    for stops in (stop, [stop, "zzz"]):
        kwargs = dict(model="tiny", prompt="the cache of attention", max_tokens=12, temperature=0, stop=stops)
        resp = client.completions.create(**kwargs)
        assert resp.choices[0].text == expected
        assert resp.choices[0].finish_reason == "stop"
        streamed = "".join(c.choices[0].text for c in client.completions.create(**kwargs, stream=True) if c.choices)
        assert streamed == expected


def test_logprobs(client):
    resp = client.completions.create(model="tiny", prompt="hello world", max_tokens=5, temperature=0, logprobs=2)
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == resp.usage.completion_tokens
    assert all(v <= 0 for v in lp.token_logprobs)
    # Greedy: the chosen token is the most likely one.
    assert all(max(top.values()) == pytest.approx(v, abs=1e-4) for top, v in zip(lp.top_logprobs, lp.token_logprobs))

    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)

    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                            temperature=0, logprobs=True, stream=True)
    streamed = [t for c in stream if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]


def test_extra_sampling_fields(client):
    resp = client.completions.create(
        model="tiny", prompt="hello", max_tokens=6, temperature=0.8, top_p=0.9, seed=1, presence_penalty=0.5,
        frequency_penalty=0.5, user="someone",
        extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.2, "ignore_eos": True},
    )
    assert resp.usage.completion_tokens == 6 and resp.choices[0].finish_reason == "length"


# -- other endpoints ------------------------------------------------------------------------------


def test_models_health_metrics(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    m = wait_pool_whole(server.base_url)
    for name in ("hf_paged_kv_cache_usage_perc", "hf_paged_prefix_cache_hit_rate", "hf_paged_num_preemptions_total",
                 "hf_paged_prompt_tokens_total", "hf_paged_generation_tokens_total",
                 "hf_paged_time_to_first_token_seconds_count", "hf_paged_inter_token_latency_seconds_count",
                 "hf_paged_e2e_request_latency_seconds_count"):
        assert name in m
    assert m["hf_paged_generation_tokens_total"] > 0 and m["hf_paged_e2e_request_latency_seconds_count"] > 0
    assert m["hf_paged_kv_blocks_total"] == 256


# -- errors ---------------------------------------------------------------------------------------

_LONG = " ".join(["word"] * 250)
BAD_REQUESTS = [
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "temperature": -0.5}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "8"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": [[]]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 99999]}, 400, "prompt"),
    ("/v1/completions", {}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 300}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": _LONG, "max_tokens": 10}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": _LONG + " " + _LONG}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 50}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "stop": ""}, 400, "stop"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}, 400,
     "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400,
     "top_logprobs"),
    ("/v1/completions", {"model": "gpt-9", "prompt": "hi"}, 404, "model"),
    ("/v1/chat/completions", {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
]


def _assert_error_shape(body: dict, status: int) -> dict:
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == {400: "invalid_request_error", 404: "invalid_request_error", 401: "authentication_error",
                           429: "rate_limit_error"}[status]
    return err


def test_bad_requests_do_not_disturb_a_running_one(server):
    async def scenario():
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as http:
            good_body = {"prompt": "hello world", "max_tokens": 200, "temperature": 0, "ignore_eos": True,
                         "stream": True, "stream_options": {"include_usage": True}}
            first_chunk = asyncio.Event()

            async def good():
                lines = []
                async with http.stream("POST", "/v1/completions", json=good_body) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        lines.append(line)
                        if line.startswith("data: {"):
                            first_chunk.set()
                return sse_events(lines)

            task = asyncio.create_task(good())
            await asyncio.wait_for(first_chunk.wait(), 30)
            for path, body, status, param in BAD_REQUESTS:
                r = await http.post(path, json=body)
                assert r.status_code == status, (body, r.text)
                err = _assert_error_shape(r.json(), status)
                assert err["param"] == param, (body, err)
            for raw in (b'{"prompt": "hi",', b"not json", b"[1, 2]", b""):
                r = await http.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
                assert r.status_code == 400, (raw, r.text)
                _assert_error_shape(r.json(), 400)
            r = await http.get("/v1/nowhere")
            assert r.status_code == 404
            _assert_error_shape(r.json(), 404)
            events = await asyncio.wait_for(task, 60)
            assert events[-2]["choices"][0]["finish_reason"] == "length"
            return events[-1]["usage"]

    usage = asyncio.run(scenario())
    assert usage["completion_tokens"] == 200
    wait_pool_whole(server.base_url)


def test_client_disconnect_aborts_and_frees_blocks(server):
    before = metrics(server.base_url)
    body = {"prompt": "hello world", "max_tokens": 200, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body, timeout=30) as r:
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data: {"):
                seen += 1
                if seen == 3:
                    break
    m = wait_pool_whole(server.base_url)
    aborted = "hf_paged_request_success_total{finished_reason=abort}"
    assert m[aborted] == before.get(aborted, 0) + 1
    # Aborted early: far fewer than 200 tokens were generated.
    assert m["hf_paged_generation_tokens_total"] - before["hf_paged_generation_tokens_total"] < 150


def test_many_concurrent_streaming_clients(server):
    total, concurrency = 200, 32

    async def scenario():
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60, limits=limits) as http:
            gate = asyncio.Semaphore(concurrency)

            async def one(i: int):
                body = {"prompt": f"hello {PROMPTS[i % 3]}", "max_tokens": 1 + i % 4, "temperature": 0,
                        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
                async with gate:
                    async with http.stream("POST", "/v1/completions", json=body) as r:
                        assert r.status_code == 200
                        events = sse_events([line async for line in r.aiter_lines()])
                finish = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
                assert finish == ["length"]
                assert events[-1]["usage"]["completion_tokens"] == 1 + i % 4
                return "".join(c["text"] for e in events for c in e["choices"])

            return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(total))), 80)

    texts = asyncio.run(scenario())
    assert len(texts) == total
    # Greedy and deterministic: equal prompts and lengths gave equal texts.
    for i in range(12, total):
        assert texts[i] == texts[i % 12]
    m = wait_pool_whole(server.base_url)
    assert m["hf_paged_num_requests_running"] == 0


def test_text_is_the_prompt_continuation_streamed_and_not(client, demo):
    """Text = decode(prompt + output) minus decode(prompt): the leading space is kept, as OpenAI returns it."""
    from tiny_models import continuation_text

    _, tok = demo
    prompt_ids = tok(PROMPTS[0])["input_ids"]
    resp = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=6, temperature=0,
                                     logprobs=0)
    ids = [tok.convert_tokens_to_ids(t) for t in resp.choices[0].logprobs.tokens]
    text = continuation_text(tok, prompt_ids, ids)
    assert resp.choices[0].text == text and text.startswith(" ")
    stream = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=6, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == text


def test_n_above_the_server_bound_is_a_400(server):
    r = httpx.post(f"{server.base_url}/v1/completions", json={"prompt": "hello", "max_tokens": 4, "n": 100000},
                   timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "n" and "at most 64" in r.json()["error"]["message"]
