"""The real SmolLM2-135M-Instruct (float32, CPU) through every front end: paged must match sdpa exactly.

One sdpa/paged pair is loaded for the module; every test compares against sdpa's greedy answers to the
same chat-template prompts (left-padded batch `generate`). Skipped when the model cannot be had.
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import continuation_text

from hf_paged import Engine, SamplingParams, generate_batch
from hf_paged.engine.generate import release_engine

QUESTIONS = [
    "What is the capital of France?",
    "Name the three primary colors.",
    "How many days are in a week?",
    "Write a haiku about the sea.",
]
NEW_TOKENS = 20


@pytest.fixture(scope="module")
def smol(smol_dir):
    """(paged model, sdpa model, left-padding tokenizer), float32, from separate from_pretrained calls."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smol_dir
    load = lambda impl: AutoModelForCausalLM.from_pretrained(path, attn_implementation=impl,
                                                             dtype=torch.float32).eval()
    paged, sdpa = load("paged"), load("sdpa")
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    yield paged, sdpa, tok
    release_engine(paged)


def _chat(tok, question: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)


def _greedy(model, tok, chats):
    inputs = tok(chats, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[:, inputs["input_ids"].shape[1]:]


def _trim(row: torch.Tensor, eos: int) -> list[int]:
    """A generated row up to and including its first EOS (the batch pads finished rows with EOS)."""
    ids = row.tolist()
    return ids[: ids.index(eos) + 1] if eos in ids else ids


@pytest.fixture(scope="module")
def reference(smol):
    """sdpa's and paged's greedy outputs for QUESTIONS as one left-padded chat batch, and sdpa's answers."""
    paged, sdpa, tok = smol
    chats = [_chat(tok, q) for q in QUESTIONS]
    ref, got = _greedy(sdpa, tok, chats), _greedy(paged, tok, chats)
    rows = [_trim(r, tok.eos_token_id) for r in ref]
    answers = [tok.decode(r, skip_special_tokens=True) for r in rows]
    return {"chats": chats, "sdpa": ref, "paged": got, "rows": rows, "answers": answers}


def test_left_padded_chat_batch_generate_matches_sdpa(reference, smol):
    tok = smol[2]
    assert len({len(tok(c, add_special_tokens=False)["input_ids"]) for c in reference["chats"]}) > 1  # real padding
    assert torch.equal(reference["paged"], reference["sdpa"])


def test_answers_are_real(reference):
    # What random weights cannot give: correct answers in English.
    answers = reference["answers"]
    assert "Paris" in answers[0]
    assert all(c in answers[1].lower() for c in ("red", "blue", "yellow")), answers[1]
    assert "7" in answers[2] or "seven" in answers[2].lower()


def test_pipeline_matches_sdpa(smol):
    from transformers import pipeline

    paged, sdpa, tok = smol
    prompts = [_chat(tok, q) for q in QUESTIONS[:2]]
    kwargs = {"do_sample": False, "max_new_tokens": 12, "return_full_text": False}
    texts = {}
    for name, model in (("paged", paged), ("sdpa", sdpa)):
        pipe = pipeline("text-generation", model=model, tokenizer=tok)
        texts[name] = [out[0]["generated_text"] for out in pipe(prompts, **kwargs)]
    assert texts["paged"] == texts["sdpa"]
    assert "Paris" in texts["paged"][0]


def test_generate_batch_matches_sdpa(reference, smol):
    paged, _, tok = smol
    params = SamplingParams(temperature=0, max_new_tokens=NEW_TOKENS)
    outs = generate_batch(paged, reference["chats"], params, tokenizer=tok, progress=False)
    for out, row, answer in zip(outs, reference["rows"], reference["answers"]):
        assert out.token_ids == row
        assert out.finish_reason == ("stop" if row[-1] == tok.eos_token_id else "length")
        assert out.text == continuation_text(tok, out.prompt_token_ids, out.token_ids)
        assert out.text == answer


def _stop_case(reference):
    """(chat, stop string, expected text): the 4th word of the longest real answer, and the text before it."""
    i = max(range(len(QUESTIONS)), key=lambda k: len(reference["answers"][k]))
    answer = reference["answers"][i]
    stop = answer.split()[3]
    assert answer.index(stop) > 0
    return i, stop, answer[: answer.index(stop)]


def test_generate_batch_stop_string_on_real_text(reference, smol):
    paged, _, tok = smol
    i, stop, expected = _stop_case(reference)
    params = SamplingParams(temperature=0, max_new_tokens=NEW_TOKENS, stop=[stop])
    (out,) = generate_batch(paged, [reference["chats"][i]], params, tokenizer=tok, progress=False)
    assert out.text == expected
    assert out.finish_reason == "stop"


# -- the OpenAI-compatible server ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def http(smol):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from hf_paged.server import ServerConfig, build_app

    paged, _, tok = smol
    release_engine(paged)  # the server's engine is the only one on the model from here on
    engine = Engine(paged, tokenizer=tok, num_blocks=64)
    with TestClient(build_app(engine, tok, ServerConfig(model_name="smol"))) as client:
        yield client


def _chat_body(question: str, **extra) -> dict:
    return {"model": "smol", "messages": [{"role": "user", "content": question}], "max_tokens": NEW_TOKENS,
            "temperature": 0, **extra}


def _streamed(http, body: dict) -> tuple[str, str | None]:
    text, finish = "", None
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[len("data: "):])["choices"]:
                text += choice["delta"].get("content") or ""
                finish = choice.get("finish_reason") or finish
    return text, finish


@pytest.mark.parametrize("i", [0, 3])
def test_server_chat_matches_sdpa(http, reference, i):
    body = _chat_body(QUESTIONS[i])
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == reference["answers"][i]
    assert _streamed(http, body) == (choice["message"]["content"], choice["finish_reason"])


def test_server_stop_string_on_real_text(http, reference):
    i, stop, expected = _stop_case(reference)
    body = _chat_body(QUESTIONS[i], stop=[stop])
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert (choice["message"]["content"], choice["finish_reason"]) == (expected, "stop")
    assert _streamed(http, body) == (expected, "stop")
