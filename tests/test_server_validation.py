"""Request validation: unknown fields and unimplemented OpenAI options are a clear 400, hints are ignored."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402
from server_harness import start_server, tiny_demo  # noqa: E402

from hf_paged import Engine  # noqa: E402
from hf_paged.server import ServerConfig, build_app  # noqa: E402

CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2, "temperature": 0}
COMPLETION = {"prompt": "hello", "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def client():
    model, tok = tiny_demo()
    app = build_app(Engine(model, num_blocks=64, max_num_seqs=4, tokenizer=tok), tok, ServerConfig(model_name="tiny"))
    with TestClient(app) as c:
        yield c


def _error(client, path, body):
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    return r.json()["error"]


@pytest.mark.parametrize("path,base", [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)])
def test_unknown_field_is_named(client, path, base):
    err = _error(client, path, {**base, "temprature": 0.5})
    assert "unknown field 'temprature'" in err["message"] and err["param"] == "temprature"


@pytest.mark.parametrize("path,base", [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)])
def test_best_of(client, path, base):
    err = _error(client, path, {**base, "best_of": 3})
    assert "best_of is not supported" in err["message"] and err["param"] == "best_of"
    for ok in ({"best_of": None}, {"best_of": 1}, {"best_of": 2, "n": 2}):
        r = client.post(path, json={**base, **ok})
        assert r.status_code == 200, (ok, r.text)


@pytest.mark.parametrize("field,value", [
    ("logit_bias", {"5": 10}),
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("tool_choice", "required"),
    ("response_format", {"type": "json_object"}),
])
def test_unimplemented_chat_options(client, field, value):
    err = _error(client, "/v1/chat/completions", {**CHAT, field: value})
    assert err["message"].endswith(f"{field}: {field} is not supported") and err["param"] == field


def test_no_op_values_and_hints_are_accepted(client):
    body = {**CHAT, "user": "someone", "seed": 3, "logit_bias": None, "tools": None, "response_format": {"type": "text"},
            "stream_options": None, "metadata": {"k": "v"}, "store": False, "parallel_tool_calls": None}
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    body = {**COMPLETION, "user": "someone", "suffix": None, "logit_bias": {}, "echo": False}
    assert client.post("/v1/completions", json=body).status_code == 200


def test_openai_client():
    openai = pytest.importorskip("openai")
    model, tok = tiny_demo()
    server = start_server(model, tok, model_name="tiny")
    try:
        c = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0)
        msgs = [{"role": "user", "content": "hello"}]
        out = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=2, user="u", seed=1,
                                        stream=True, stream_options={"include_usage": True})
        assert list(out)[-1].usage.completion_tokens == 2
        c.completions.create(model="tiny", prompt="hello", max_tokens=2, user="u", best_of=1)
        with pytest.raises(openai.BadRequestError, match="tools is not supported"):
            c.chat.completions.create(model="tiny", messages=msgs, max_tokens=2,
                                      tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
        with pytest.raises(openai.BadRequestError, match="best_of is not supported"):
            c.completions.create(model="tiny", prompt="hello", max_tokens=2, best_of=2)
    finally:
        server.stop()
