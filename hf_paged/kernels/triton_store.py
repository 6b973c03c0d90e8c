"""Triton kernel that writes new tokens' K/V into their cache slots (one launch per call)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._intmath import next_power_of_2
from .triton_launch import launch

__all__ = ["store_kv"]


# The slot mapping's alignment is not specialised on (see `_paged_attention_kernel`).
@triton.jit(do_not_specialize=["slot_ptr"])
def _store_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
    stride_kcb, stride_kcs, stride_kch, stride_kcd,
    stride_vcb, stride_vcs, stride_vch, stride_vcd,
    block_size,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, H_PAD: tl.constexpr, D_PAD: tl.constexpr,
):
    """One program per token: copy its [Hkv, D] key and value rows into slot ``slot_mapping[t]``."""
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:  # padding token: owns no slot
        return
    blk = slot // block_size
    off = slot % block_size
    h = tl.arange(0, H_PAD)[:, None]
    d = tl.arange(0, D_PAD)[None, :]
    mask = (h < NUM_KV_HEADS) & (d < HEAD_DIM)
    t64 = t.to(tl.int64)
    k = tl.load(key_ptr + t64 * stride_kt + h * stride_kh + d * stride_kd, mask=mask)
    v = tl.load(value_ptr + t64 * stride_vt + h * stride_vh + d * stride_vd, mask=mask)
    k_dst = k_cache_ptr + blk * stride_kcb + off * stride_kcs + h * stride_kch + d * stride_kcd
    v_dst = v_cache_ptr + blk * stride_vcb + off * stride_vcs + h * stride_vch + d * stride_vcd
    tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write ``key``/``value`` ``[T, Hkv, D]`` into ``[num_blocks, block_size, Hkv, D]`` caches.

    Negative slots are skipped. Any strides are accepted, so callers need not make copies.
    """
    if key.dim() != 3 or key.shape != value.shape:
        raise ValueError(f"key/value must both be [T, Hkv, D], got {tuple(key.shape)} and {tuple(value.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or tuple(k_cache.shape[2:]) != tuple(key.shape[1:]):
        raise ValueError(f"caches {tuple(k_cache.shape)} do not match key {tuple(key.shape)}")
    if slot_mapping.shape != (key.shape[0],):
        raise ValueError(f"slot_mapping must be [{key.shape[0]}], got {tuple(slot_mapping.shape)}")
    num_tokens, hkv, d = key.shape
    if num_tokens == 0:
        return
    launch(
        _store_kv_kernel, (num_tokens,), key, value, k_cache, v_cache, slot_mapping,
        *key.stride(), *value.stride(), *k_cache.stride(), *v_cache.stride(),
        k_cache.shape[1],
        NUM_KV_HEADS=hkv, HEAD_DIM=d, H_PAD=next_power_of_2(hkv), D_PAD=next_power_of_2(d),
        num_warps=1 if hkv * d <= 512 else 4,
    )
