"""Loading a local model directory for the integrations (model + tokenizer, paged attention)."""

from __future__ import annotations

import torch

__all__ = ["default_device", "load_model", "resolve_dtype"]


def default_device(device: str | None = None) -> torch.device:
    """``device`` if given, else the first CUDA device when there is one, else the CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``"auto"``/``None``: bfloat16 on CUDA, float32 on CPU (our kernels' reference precision)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r} (use e.g. 'float32', 'bfloat16', 'auto')")
    return value


def load_model(path: str, *, dtype=None, device: str | None = None, trust_remote_code: bool = False):
    """``(model, tokenizer)`` from a local directory or hub id, the model on ``"paged"`` attention."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_paged  # noqa: F401  registers attn_implementation="paged"

    dev = default_device(device)
    model = AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="paged", dtype=resolve_dtype(dtype, dev), trust_remote_code=trust_remote_code
    )
    model.to(dev).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return model, tokenizer
