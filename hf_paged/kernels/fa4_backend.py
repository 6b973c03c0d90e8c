"""The FlashAttention-4 backend (``pip install 'hf_paged[fa4]'``): offered on SM90+ GPUs for fp16/bf16.

FA4 (``flash-attn-4``, CuTe DSL kernels compiled at first use) reads our paged layout as it is: its
``page_table`` is our block table and its pages ``[num_pages, page_size, Hkv, D]`` are our blocks,
so no copy and no second layout. Eager steps that carry prompt tokens (prefill, chunked prefill, mixed)
go to FA4; pure decode steps, what FA4 does not take (fp32, left padding via ``kv_start``, head dims
other than 64/128) and steps replayed from CUDA graphs (``static_grid``: there the Triton kernels launch a
step's decodes apart from its prompt tiles, where FA4 would run each decode in a prompt tile; one launch
against two measured 504 / 311 us on an H100, bench/NOTES.md) go to the Triton kernels, which measured
faster at decode.
``HF_PAGED_BACKEND=triton`` turns FA4 off; ``HF_PAGED_BACKEND=fa4`` fails clearly where it is absent.
"""

from __future__ import annotations

import functools
import sys

import torch

from ..plugins import hookimpl
from . import triton_attention
from .triton_store import store_kv

__all__ = ["name", "store_kv", "paged_attention", "flash_attention", "why_unavailable"]

name = "fa4"
supports_static_grid = True  # graph-replayed steps go to the Triton kernels
stores_step_kv = True  # stored here before FA4 runs, or passed on to the Triton kernel where it serves
_DTYPES = (torch.float16, torch.bfloat16)
_HEAD_DIMS = (64, 128)


@functools.cache
def _varlen_func():
    """FA4's ``flash_attn_varlen_func``, or the ImportError that says why it is absent."""
    try:
        from flash_attn.cute.interface import flash_attn_varlen_func
    except ImportError as exc:
        return exc
    return flash_attn_varlen_func


def why_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    """``None`` where FA4 can serve ``dtype`` on ``device``, else the reason it cannot.

    Example:
        >>> why_unavailable(torch.device("cpu"), torch.bfloat16)
        'fa4 needs a CUDA GPU of compute capability 9.0 or newer (SM90+), got cpu'
    """
    device = torch.device(device)
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9:
        return f"fa4 needs a CUDA GPU of compute capability 9.0 or newer (SM90+), got {device}"
    if dtype not in _DTYPES:
        return f"fa4 takes fp16/bf16, got {dtype}"
    found = _varlen_func()
    if isinstance(found, ImportError):
        return f"fa4 needs flash-attn-4 (pip install 'hf_paged[fa4]'): {found}"
    return None


@hookimpl
def hf_paged_kernel_backend(device: torch.device, dtype: torch.dtype):
    """Offer FA4 where it runs; pass (``None``) otherwise."""
    return sys.modules[__name__] if why_unavailable(device, dtype) is None else None


def _fa4_takes(query: torch.Tensor, kv_start, max_seqlen_q: int | None, static_grid: bool) -> bool:
    """Whether this call goes to FA4: eager steps with prompt tokens, in FA4's dtypes and head dims."""
    if query.dtype not in _DTYPES or query.shape[-1] not in _HEAD_DIMS or kv_start is not None or static_grid:
        return False
    return max_seqlen_q is None or max_seqlen_q > 1


def paged_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, **metadata) -> torch.Tensor:
    """`hf_paged.kernels.reference.paged_attention` (same arguments and semantics), on FA4 or on the Triton
    kernel (see the module doc)."""
    if not _fa4_takes(query, metadata.get("kv_start"), metadata.get("max_seqlen_q"),
                      metadata.get("static_grid", False)):
        return triton_attention.paged_attention(query, k_cache, v_cache, **metadata)
    metadata.pop("kv_start", None)  # None here
    metadata.pop("max_context_len", None)  # FA4 reads the lengths from the device
    key, value, slot_mapping = metadata.pop("key", None), metadata.pop("value", None), metadata.pop("slot_mapping", None)
    if slot_mapping is not None:  # FA4 reads every key from the pages
        store_kv(key, value, k_cache, v_cache, slot_mapping)
    return flash_attention(query, k_cache, v_cache, **metadata)


def flash_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    max_seqlen_q: int | None = None,
    num_splits: int = 1,
) -> torch.Tensor:
    """FA4's paged varlen kernel on our layout, for every step type (`paged_attention` picks; benchmarks call this).

    ``num_splits`` is FA4's (``1``: no KV split, ``0``: its heuristic). Needs FA4 (see `why_unavailable`).
    """
    total_q = query.shape[0]
    if total_q == 0 or context_lens.shape[0] == 0:
        return torch.empty_like(query)
    max_q = total_q if max_seqlen_q is None else min(int(max_seqlen_q), total_q)
    result = _varlen_func()(
        query, k_cache, v_cache, cu_seqlens_q=cu_seqlens_q.to(torch.int32), max_seqlen_q=max_q,
        seqused_k=context_lens.to(torch.int32), page_table=block_tables.to(torch.int32),
        softmax_scale=scale, causal=True, softcap=float(softcap or 0.0),
        window_size=(int(sliding_window) - 1, 0) if sliding_window else (None, None), num_splits=num_splits,
    )
    return result[0] if isinstance(result, tuple) else result
