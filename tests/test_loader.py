"""`hf_paged.loader`: dtype and device resolution, loading a saved directory, clear errors."""

from __future__ import annotations

import huggingface_hub.constants
import pytest
import torch
from tiny_model_dir import save_tiny_model
from transformers import AutoModelForCausalLM

from hf_paged.loader import load_model, resolve_device, resolve_dtype


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    path = save_tiny_model(tmp_path_factory.mktemp("tiny"))
    AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).save_pretrained(path)  # a bf16 checkpoint
    return path


def test_auto_dtype_keeps_the_checkpoints(bf16_dir):
    model, tokenizer = load_model(str(bf16_dir), device="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.config._attn_implementation == "paged" and not model.training
    assert tokenizer is not None
    model, _ = load_model(str(bf16_dir), dtype="float32", device="cpu", tokenizer=False)
    assert next(model.parameters()).dtype == torch.float32


def test_resolve_dtype():
    assert resolve_dtype("auto") == resolve_dtype(None) == "auto"
    assert resolve_dtype(torch.float16) is torch.float16
    assert resolve_dtype("bfloat16") is torch.bfloat16
    for bad in ("float33", "Tensor"):
        with pytest.raises(ValueError, match=f"unknown dtype '{bad}'"):
            resolve_dtype(bad)


def test_bad_dtype_name_fails_before_loading(bf16_dir):
    with pytest.raises(ValueError, match="unknown dtype 'fp99'"):
        load_model(str(bf16_dir), dtype="fp99", device="cpu")


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    missing = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(ValueError, match=f"device '{missing}' is not available here.*available: .*cpu"):
        resolve_device(missing)
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_cpu_machine_says_so():
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")


def test_unknown_model_name_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast, no network
    with pytest.raises(OSError, match="cannot load 'no-such-org/no-such-model': no such local directory"):
        load_model("no-such-org/no-such-model", device="cpu")
