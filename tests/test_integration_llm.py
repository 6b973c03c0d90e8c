"""The ``llm`` CLI plugin: models from ``hf-paged-models.json`` / ``HF_PAGED_LLM_MODELS``, streamed from the engine.

Skipped when llm is not installed (``pip install -e ".[llm]"``). ``LLM_USER_PATH`` points into a
temporary directory, so the user's own llm configuration is never read or written.
"""

from __future__ import annotations

import json
from importlib import metadata

import pytest

llm = pytest.importorskip("llm")

from click.testing import CliRunner  # noqa: E402
from llm.cli import cli  # noqa: E402
from tiny_model_dir import save_tiny_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from hf_paged import SamplingParams, generate_batch  # noqa: E402

PROMPT = "w5 w6 w7"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def expected(model_dir) -> str:
    """Greedy 8-token continuation of PROMPT, straight from the engine."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="paged")
    tok = AutoTokenizer.from_pretrained(model_dir)
    (out,) = generate_batch(model, [PROMPT], SamplingParams(max_new_tokens=8, temperature=0.0), tokenizer=tok,
                            progress=False)
    return out.text


@pytest.fixture()
def user_dir(tmp_path, monkeypatch, model_dir):
    monkeypatch.setenv("LLM_USER_PATH", str(tmp_path))
    monkeypatch.delenv("HF_PAGED_LLM_MODELS", raising=False)
    (tmp_path / "hf-paged-models.json").write_text(
        json.dumps({"tiny": {"path": str(model_dir), "aliases": ["tiny-alias"], "block_size": 8}})
    )
    return tmp_path


def test_entry_point_is_found_by_llm(user_dir):
    assert "hf-paged" in {ep.name for ep in metadata.entry_points(group="llm")}
    from llm.plugins import load_plugins, pm

    load_plugins()  # llm's own loader: pluggy's load_setuptools_entrypoints("llm")
    assert "hf-paged" in {name for name, _ in pm.list_name_plugin()}
    model = llm.get_model("hf-paged/tiny")
    assert model.model_id == "hf-paged/tiny" and model.can_stream
    assert llm.get_model("tiny-alias").model_id == "hf-paged/tiny"


def test_cli_prompt_streams_engine_output(user_dir, expected):
    result = CliRunner().invoke(cli, ["-m", "hf-paged/tiny", PROMPT, "-o", "max_tokens", "8", "-o", "temperature", "0"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == expected.strip()
    listed = CliRunner().invoke(cli, ["models", "list"])
    assert "hf-paged/tiny" in listed.output


def test_python_api_and_env_var(user_dir, model_dir, monkeypatch, expected):
    (user_dir / "hf-paged-models.json").unlink()
    monkeypatch.setenv("HF_PAGED_LLM_MODELS", f"env-tiny={model_dir}")
    response = llm.get_model("hf-paged/env-tiny").prompt(PROMPT, max_tokens=8, temperature=0)
    assert response.text() == expected
    assert response.output_tokens == 8


def test_streamed_chunks_join_to_the_final_text(user_dir, model_dir):
    from tiny_models import continuation_text

    tok = AutoTokenizer.from_pretrained(model_dir)
    response = llm.get_model("hf-paged/tiny").prompt(PROMPT, max_tokens=8, temperature=0)
    chunks = list(response)
    assert len(chunks) > 1 and all(chunks)  # streamed token by token, no empty chunk
    (out,) = generate_batch(AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="paged"), [PROMPT],
                            SamplingParams(max_new_tokens=8, temperature=0.0), tokenizer=tok, progress=False)
    assert "".join(chunks) == out.text == continuation_text(tok, out.prompt_token_ids, out.token_ids)
    assert out.text.startswith(" ")  # decode(prompt + output) minus decode(prompt) keeps the space


def test_bad_config_is_reported(user_dir):
    (user_dir / "hf-paged-models.json").write_text(json.dumps({"x": {"dir": "/nowhere"}}))
    from hf_paged.integrations.llm import configured_models

    with pytest.raises(ValueError, match="needs a 'path'"):
        configured_models()
