"""Pure-torch paged attention: the CPU path and the oracle for every other backend.

Layout shared by all backends:

* ``k_cache`` / ``v_cache``: ``[num_blocks, block_size, num_kv_heads, head_dim]`` for one layer.
  Slot ``s`` is row ``s % block_size`` of block ``s // block_size``.
* Queries are packed ("varlen"): ``query`` is ``[total_q, num_heads, head_dim]``; sequence ``i``
  owns rows ``cu_seqlens_q[i]:cu_seqlens_q[i + 1]``.
* ``context_lens[i]`` counts the sequence's keys *including* this step's new tokens, so query row
  ``t`` of sequence ``i`` (0-based within the step) sits at absolute position
  ``context_lens[i] - q_len_i + t`` and sees keys ``kv_start[i] <= j <= pos`` (and
  ``pos - j < sliding_window`` when a window is set). ``kv_start`` skips left padding.
"""

from __future__ import annotations

import sys

import torch

from .hookspecs import hookimpl

__all__ = ["name", "store_kv", "paged_attention"]

name = "reference"


@hookimpl(trylast=True)
def hf_paged_kernel_backend(device: torch.device, dtype: torch.dtype):
    """The reference serves every device and dtype, after any other backend."""
    return sys.modules[__name__]


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write ``key``/``value`` ``[T, Hkv, D]`` into the slots named by ``slot_mapping`` ``[T]``.

    Negative slots are skipped (padding tokens that own no slot).
    """
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    flat_k = k_cache.view(-1, *k_cache.shape[2:])
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    flat_k.index_copy_(0, slots, key[keep].to(k_cache.dtype))
    flat_v.index_copy_(0, slots, value[keep].to(v_cache.dtype))


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

    ``max_seqlen_q``/``max_context_len`` are launch-size hints other backends need; the reference
    ignores them. Softmax is computed in float32 and the result cast back to ``query.dtype``.
    """
    num_heads, head_dim = query.shape[1], query.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    groups = num_heads // num_kv_heads
    out = torch.empty_like(query)
    cu = cu_seqlens_q.tolist()
    ctx = context_lens.tolist()
    starts = kv_start.tolist() if kv_start is not None else [0] * len(ctx)
    for i, kv_len in enumerate(ctx):
        q = query[cu[i] : cu[i + 1]]
        q_len = q.shape[0]
        if q_len == 0:
            continue
        n_blocks = -(-kv_len // block_size)
        blocks = block_tables[i, :n_blocks].long()
        k = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:kv_len]
        v = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:kv_len]
        k = k.repeat_interleave(groups, dim=1).float()
        v = v.repeat_interleave(groups, dim=1).float()
        scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        q_pos = torch.arange(kv_len - q_len, kv_len, device=query.device)[:, None]
        k_pos = torch.arange(kv_len, device=query.device)[None, :]
        visible = (k_pos <= q_pos) & (k_pos >= starts[i])
        if sliding_window:
            visible &= q_pos - k_pos < sliding_window
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        out[cu[i] : cu[i + 1]] = torch.einsum("hqk,khd->qhd", probs, v).to(query.dtype)
    return out
