"""A tiny random-weight Llama and its word-level tokenizer saved to a directory (for the integrations)."""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_models import make_config, make_tokenizer
from transformers import AutoModelForCausalLM


def save_tiny_model(path: Path, seed: int = 0) -> Path:
    """Write ``config.json``, weights and tokenizer of a 2-layer GQA Llama (vocab 96) to ``path``."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config("llama-gqa"))
    # Random weights give near-flat logits; scaling the head separates greedy choices clearly.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def words(ids) -> str:
    """Text of token ids in the tiny tokenizer's vocabulary ("w4 w17 ...")."""
    return " ".join(f"w{i}" for i in ids)
