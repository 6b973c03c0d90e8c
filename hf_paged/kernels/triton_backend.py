"""The Triton kernel backend: offered for CUDA tensors in fp16, bf16 and fp32.

Importing this module touches no GPU (it must import on CPU-only machines that have Triton); the
kernels compile at their first call. Semantics are those of `hf_paged.kernels.reference`.
"""

from __future__ import annotations

import sys

import torch

from . import triton_attention, triton_store
from .hookspecs import hookimpl

__all__ = ["name", "store_kv", "paged_attention"]

name = "triton"


@hookimpl
def hf_paged_kernel_backend(device: torch.device, dtype: torch.dtype):
    """Offer this backend for CUDA devices and the dtypes the kernels handle; pass otherwise."""
    if torch.device(device).type == "cuda" and dtype in triton_attention.SUPPORTED_DTYPES:
        return sys.modules[__name__]
    return None


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write ``key``/``value`` ``[T, Hkv, D]`` into the slots of ``slot_mapping`` (negative: skip), one launch."""
    triton_store.store_kv(key, value, k_cache, v_cache, slot_mapping)


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    kv_start: torch.Tensor | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    max_seqlen_q: int | None = None,
    max_context_len: int | None = None,
) -> torch.Tensor:
    """Causal attention of packed queries over their paged keys/values; returns ``[T, H, D]``.

    ``max_seqlen_q`` chooses decode tiles (small, split-KV) or prefill tiles; it and
    ``max_context_len`` size the grid and must be upper bounds (shape-derived bounds when ``None``).
    """
    return triton_attention.paged_attention(
        query, k_cache, v_cache, cu_seqlens_q=cu_seqlens_q, context_lens=context_lens, block_tables=block_tables,
        scale=scale, kv_start=kv_start, sliding_window=sliding_window, softcap=softcap,
        max_seqlen_q=max_seqlen_q, max_context_len=max_context_len,
    )
