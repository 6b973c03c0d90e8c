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

from ..plugins import hookimpl

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
    static_grid: bool = False,
    key: torch.Tensor | None = None,
    value: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of packed queries over their paged keys/values; returns ``[T, H, D]``.

    ``max_seqlen_q``/``max_context_len``/``static_grid`` are launch-size hints other backends need, and
    ``key``/``value`` (``[T, Hkv, D]``) this step's new keys/values, which the caches hold as well (a
    backend may read them from there faster); the reference ignores them all. Rows after the last
    sequence (padding of graphed mixed steps, which no one reads) are zeros here; other backends may
    leave them unwritten. Softmax is computed in float32 and the result cast back to ``query.dtype``.
    """
    total_q, num_heads, head_dim = query.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    num_seqs, device = context_lens.shape[0], query.device
    owned = int(cu_seqlens_q[-1]) if num_seqs else 0
    if owned < total_q:  # padding tokens after the last sequence (graphs of mixed steps): zeros
        out = query.new_zeros(query.shape)
        if owned:
            out[:owned] = paged_attention(
                query[:owned], k_cache, v_cache, cu_seqlens_q=cu_seqlens_q, context_lens=context_lens,
                block_tables=block_tables, scale=scale, kv_start=kv_start, sliding_window=sliding_window,
                softcap=softcap, max_context_len=max_context_len)
        return out
    q_lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
    max_q = max_seqlen_q if max_seqlen_q is not None and not static_grid else int(q_lens.max())
    max_kv = max_context_len if max_context_len is not None else int(context_lens.max())

    # Pad queries to [S, max_q] and gather each sequence's blocks into [S, max_kv] keys/values.
    seq = torch.repeat_interleave(torch.arange(num_seqs, device=device), q_lens, output_size=total_q)
    local = torch.arange(total_q, device=device) - cu_seqlens_q[seq].long()
    q = query.new_zeros(num_seqs, max_q, num_heads, head_dim).float()
    q[seq, local] = query.float()
    blocks = block_tables[:, : -(-max_kv // block_size)].long()
    k = k_cache[blocks].flatten(1, 2)[:, :max_kv].float()
    v = v_cache[blocks].flatten(1, 2)[:, :max_kv].float()
    q = q.view(num_seqs, max_q, num_kv_heads, num_heads // num_kv_heads, head_dim)

    scores = torch.einsum("sqhgd,skhd->shgqk", q, k) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    ctx = context_lens.long()[:, None, None]
    q_pos = ctx - q_lens[:, None, None] + torch.arange(max_q, device=device)[None, :, None]
    k_pos = torch.arange(max_kv, device=device)[None, None, :]
    start = kv_start.long()[:, None, None] if kv_start is not None else 0
    visible = (k_pos <= q_pos) & (k_pos >= start) & (k_pos < ctx)
    if sliding_window:
        visible &= q_pos - k_pos < sliding_window
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = torch.einsum("shgqk,skhd->sqhgd", probs, v).reshape(num_seqs, max_q, num_heads, head_dim)
    return out[seq, local].to(query.dtype)
