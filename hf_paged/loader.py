"""Loading a model for hf_paged: a local directory or hub id, on ``attn_implementation="paged"``.

`load_model` is what the CLI, the server and the integrations call; `load_causal_lm` is its
model half for callers that place the model themselves (tensor parallelism).
"""

from __future__ import annotations

import os

import torch

from .registration import ATTN_IMPLEMENTATION, register

__all__ = ["load_causal_lm", "load_model", "load_tokenizer", "resolve_device", "resolve_dtype"]


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as a `torch.device`, checked to exist here; ``None``: CUDA when available, else the CPU.

    Raises ``ValueError`` naming the available devices when ``device`` is not there (no CUDA, a
    GPU index past the last one, no MPS...).

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown device {device!r}: {e}") from e
    count = _device_count(dev.type)
    if count == 0 or (dev.index is not None and 0 < count <= dev.index):
        what = f"{dev.type.upper()} is not available" if count == 0 else f"only {count} {dev.type} device(s)"
        raise ValueError(
            f"device {str(dev)!r} is not available here ({what}); available: {', '.join(_available_devices())}"
        )
    return dev


def resolve_dtype(dtype: str | torch.dtype | None = "auto") -> torch.dtype | str:
    """A torch dtype from a dtype or its name; ``"auto"`` (or ``None``) stays ``"auto"``: the checkpoint's.

    Example:
        >>> resolve_dtype("bfloat16")
        torch.bfloat16
        >>> resolve_dtype("auto")
        'auto'
    """
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r} (use 'auto' for the checkpoint's, or e.g. 'float32', 'bfloat16')")
    return value


def load_causal_lm(model: str, *, dtype: str | torch.dtype | None = "auto", trust_remote_code: bool = False,
                   **from_pretrained_kwargs):
    """``AutoModelForCausalLM.from_pretrained`` on ``"paged"`` attention, in eval mode, where Transformers put it.

    ``from_pretrained_kwargs`` go to ``from_pretrained`` (e.g. ``distributed_config``, ``device_map``).

    Example:
        >>> lm = load_causal_lm("path/to/model", dtype="bfloat16")  # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM

    register()
    from_pretrained_kwargs.setdefault("attn_implementation", ATTN_IMPLEMENTATION)
    dtype = resolve_dtype(dtype)
    try:
        lm = AutoModelForCausalLM.from_pretrained(
            model, dtype=dtype, trust_remote_code=trust_remote_code, **from_pretrained_kwargs
        )
    except OSError as e:
        if os.path.isdir(model):
            raise
        raise OSError(f"cannot load {model!r}: no such local directory, and as a hub id: {e}") from e
    return lm.eval()


def load_tokenizer(tokenizer: bool | str | None, model: str, *, trust_remote_code: bool = False):
    """``True``: ``model``'s tokenizer; a path or hub id: that one; ``None``/``False``: ``None``.

    Example:
        >>> tok = load_tokenizer(True, "path/to/model")  # doctest: +SKIP
    """
    if not tokenizer:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model if tokenizer is True else tokenizer, trust_remote_code=trust_remote_code)


def load_model(model: str, *, dtype: str | torch.dtype | None = "auto", device: str | torch.device | None = None,
               trust_remote_code: bool = False, tokenizer: bool | str | None = True, **from_pretrained_kwargs):
    """``(model, tokenizer)`` from a local directory or hub id, the model on ``"paged"`` attention.

    Args:
        model: a ``save_pretrained`` directory or a hub id.
        dtype: ``"auto"`` (the checkpoint's dtype), a torch dtype, or its name (``"bfloat16"``).
        device: where the model goes (`resolve_device`; default: CUDA when available, else CPU).
        trust_remote_code: passed to Transformers.
        tokenizer: as in `load_tokenizer` (``None`` comes back when ``False``).
        **from_pretrained_kwargs: more ``from_pretrained`` arguments.

    Example:
        >>> model, tokenizer = load_model("path/to/model", dtype="float32", device="cpu")  # doctest: +SKIP
    """
    dev = resolve_device(device)
    lm = load_causal_lm(model, dtype=dtype, trust_remote_code=trust_remote_code, **from_pretrained_kwargs)
    return lm.to(dev), load_tokenizer(tokenizer, model, trust_remote_code=trust_remote_code)


def _device_count(kind: str) -> int:
    """Devices of ``kind`` here; -1 (unbounded) where torch has no way to tell (cpu, meta...)."""
    if kind == "cuda":
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    if kind == "mps":
        return 1 if torch.backends.mps.is_available() else 0
    module = getattr(torch, kind, None)
    if module is None or not hasattr(module, "is_available"):
        return -1
    return module.device_count() if module.is_available() else 0


def _available_devices() -> list[str]:
    found = [f"cuda:{i}" for i in range(_device_count("cuda"))]
    return found + ["mps"] * _device_count("mps") + ["cpu"]
