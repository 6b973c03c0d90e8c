"""Unified Triton paged-attention kernel: prefill, chunked prefill and decode in one launch.

Design (semantics are those of `hf_paged.kernels.reference`):

* One program owns a *query tile* of one sequence and one KV head: ``BLOCK_Q`` consecutive query
  tokens times the ``G = H // Hkv`` query heads that share the KV head, flattened into ``BLOCK_M =
  BLOCK_Q * G`` rows (padded to a power of two). Each K/V tile is therefore loaded once for all
  heads of a group (GQA/MQA), and a decode step (``BLOCK_Q = 1``) still gives ``tl.dot`` 16+ rows.
* Keys are read straight from the paged cache: for every key position ``j`` of a tile the kernel
  looks up ``block_tables[seq, j // block_size]``; nothing is gathered into a contiguous copy.
  Per-key lookups make any block size work (the dense fallback path uses one block per sequence).
* The key range of a tile is split into tiles that need no mask (every row sees every key) and
  edge tiles that need the causal / window / range mask, so the bulk of a long prefill runs
  unmasked.
* Split-KV ("flash decoding"): when (sequences x query tiles x KV heads) cannot fill the GPU, the
  key range is cut into ``num_splits`` chunks, each program writes a partial (normalised output,
  log-sum-exp) to scratch, and the last split of each row group to finish merges them (an arrival
  counter per row group; under CUDA-graph capture a second launch, `_reduce_kernel`, merges instead).
  ``num_splits`` and the grid depend only on host ints (shapes and the ``max_seqlen_q``/``max_context_len``
  hints), never on tensor values, so a launch can be captured in a CUDA graph.
* A mixed step replayed from a graph (``static_grid``: decodes beside prompt chunks, any query lengths) runs
  in two launches: the decodes with decode tiles (``DECODES_ONLY``: a program per sequence and KV head), the
  others through a tile map built on the device in which decodes own no tile.
* Softmax runs in fp32 in the exp2 domain; rows that see no key output 0 (like the reference's
  ``nan_to_num``).
* On Hopper, prompt steps at head_dim 128 go to the warp-specialised Gluon kernel instead (`gluon_prefill`,
  chosen by `_gluon_takes`); in a static grid the decodes still launch here.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime import driver
from triton.tools.tensor_descriptor import TensorDescriptor

from .._intmath import cdiv, next_power_of_2
from .triton_launch import PreparedLaunch, launch
from .triton_store import store_kv
from .triton_tile_map import tile_map_kernel, tile_owner

__all__ = ["Config", "paged_attention", "choose_config", "choose_num_splits", "refine_decode_tiles"]

LOG2E = 1.4426950408889634
MAX_SPLITS = 64
# The attention launch merges up to this many splits itself, one split at a time (measured on the H100 at 16:
# no slower on the device than the merge kernel); beyond it `_reduce_kernel` loads them all at once.
MAX_MERGED_SPLITS = 16
# Causal prefill launches its longest query tiles first. In a grid of at most this many waves (programs per SM
# taken as 8 // num_warps) it orders them across KV heads (every head's last tile, then every head's second-last,
# ...), beyond that one head's tiles after another's, whose concurrent programs read one head's keys (L2 reuse).
# H100, 32/8 heads, TFLOP/s per head order / across heads (.dev A/B in bench/RESULTS.md, session 17): d128 b1 2k
# 344 / 369 and from the pages 221 / 282; d64 b1 2k 255 / 329; d128 b1 4k 465 / 445, 8k 521 / 501.
# A launch of one tile per sequence (decode) always goes across heads: a sequence's KV heads start together and
# read their slices of the same key rows at once. H200, 32/8 heads, 2k keys, us one head after another / across
# heads: b256 d64 260.4 / 256.0, d128 524.9 / 517.7; b128 132.6 / 130.8, 267.5 / 264.3; b32 within 1% (session 19).
ACROSS_HEADS_WAVES = 4
# Prompt steps at head_dim 128 on Hopper go to the warp-specialised Gluon kernel (`gluon_prefill`) up to this
# longest prompt; beyond it this kernel's 128 x 128 tiles were faster (H200, `kernel_bench.py --prompt-kernels`,
# bench/RESULTS.md session 22: TFLOP/s Gluon / Triton at b1 2k 409 / 378, 4k 476 / 465, 8k 496 / 520).
GLUON_MAX_SEQLEN_Q = 4096
# Gluon's API changes between Triton releases: the kernel is written for and tested on these.
GLUON_TRITON_VERSIONS = ("3.6.",)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _attend_tiles(
    acc, l_i, m_i, q, q_pos, key_lo, key_hi, kv_hi,
    bt_row_ptr, k_base, v_base, block_size,
    stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd,
    window, qk_scale, cap_in, cap_out, new_k, new_v, new_row0, new_col,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
    MASKED: tl.constexpr, USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr,
    FRESH: tl.constexpr,
):
    """Online-softmax over key tiles starting at ``key_lo, key_lo + BLOCK_N, ... < key_hi``.

    ``MASKED`` tiles apply causality, the window and the range end ``kv_hi``; unmasked tiles are
    known (from the caller's bounds) to be fully visible to every row. ``FRESH`` tiles are keys of
    this step, read from the step's own K/V (TMA descriptors ``new_k``/``new_v``, key ``j`` at row
    ``new_row0 + j``) instead of being gathered from the pages.
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    for start in range(key_lo, key_hi, BLOCK_N):
        j = start + offs_n
        if FRESH:
            # Rows past this sequence's keys belong to the next sequence (or lie outside and read as
            # zeros): causality or ``kv_hi`` masks them below.
            in_range = j < kv_hi
            k = new_k.load([new_row0 + start, new_col])
            v = new_v.load([new_row0 + start, new_col])
        elif PAGE > 0:  # power-of-two block size known at compile time: shifts instead of divisions
            page_idx = j // PAGE
            page_off = j % PAGE
        else:
            page_idx = j // block_size
            page_off = j % block_size
        if not FRESH:
            if MASKED:
                in_range = j < kv_hi
                blk = tl.load(bt_row_ptr + page_idx, mask=in_range, other=0).to(tl.int64)
            else:
                blk = tl.load(bt_row_ptr + page_idx).to(tl.int64)
            k_off = blk * stride_kb + page_off * stride_ks
            v_off = blk * stride_vb + page_off * stride_vs
            k_ptrs = k_base + k_off[:, None] + offs_d[None, :] * stride_kd
            v_ptrs = v_base + v_off[:, None] + offs_d[None, :] * stride_vd
            if MASKED:
                kv_mask = in_range[:, None] & (offs_d[None, :] < HEAD_DIM)
                k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
                v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
            elif HEAD_DIM != D_PAD:
                k = tl.load(k_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
                v = tl.load(v_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
            else:
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        if FRESH and not MASKED and not USE_SOFTCAP:
            # Every row sees every key here, so the running max is finite: the scale folds into one FMA
            # and P @ V accumulates in place (measured faster with TMA-fed tiles).
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            p = tl.exp2(s * qk_scale - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
            m_i = m_new
        else:
            if USE_SOFTCAP:  # softcap * tanh(s * scale / softcap), tanh via exp2 (then into log2 units)
                s = (1.0 - 2.0 / (tl.exp2(s * cap_in) + 1.0)) * cap_out
            else:
                s = s * qk_scale
            if MASKED:
                visible = (j[None, :] <= q_pos[:, None]) & in_range[None, :]
                if USE_WINDOW:
                    visible = visible & ((q_pos[:, None] - j[None, :]) < window)
                s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet stay at 0
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
            m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attend_range(
    acc, l_i, m_i, q, q_pos, lo, hi, full_lo, full_hi,
    bt_row_ptr, k_base, v_base, block_size,
    stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd,
    window, qk_scale, cap_in, cap_out, new_k, new_v, new_row0, new_col,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
    USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr, FRESH: tl.constexpr,
):
    """Keys ``[lo, hi)`` in tiles from ``lo``: the leading edge (window / kv_start not yet covering
    every row), the tiles inside ``[full_lo, full_hi)`` (visible to every row: no mask) and the
    trailing (causal) edge."""
    n_tiles = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_N)
    # Operands are clamped to >= 0 before dividing: integer division rounds differently on negatives
    # in the compiled kernel and the interpreter.
    k_a = tl.minimum(tl.cdiv(tl.maximum(full_lo - lo, 0), BLOCK_N), n_tiles)
    k_b = tl.maximum(tl.minimum(tl.maximum(tl.minimum(full_hi, hi) - lo, 0) // BLOCK_N, n_tiles), k_a)
    acc, l_i, m_i = _attend_tiles(
        acc, l_i, m_i, q, q_pos, lo, lo + k_a * BLOCK_N, hi, bt_row_ptr, k_base, v_base, block_size,
        stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd, window, qk_scale, cap_in, cap_out,
        new_k, new_v, new_row0, new_col, HEAD_DIM, D_PAD, BLOCK_N, PAGE, True, USE_WINDOW, USE_SOFTCAP, DOT_PREC,
        FRESH,
    )
    acc, l_i, m_i = _attend_tiles(
        acc, l_i, m_i, q, q_pos, lo + k_a * BLOCK_N, lo + k_b * BLOCK_N, hi, bt_row_ptr, k_base, v_base,
        block_size, stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd, window, qk_scale,
        cap_in, cap_out, new_k, new_v, new_row0, new_col, HEAD_DIM, D_PAD, BLOCK_N, PAGE, False, USE_WINDOW,
        USE_SOFTCAP, DOT_PREC, FRESH,
    )
    return _attend_tiles(
        acc, l_i, m_i, q, q_pos, lo + k_b * BLOCK_N, lo + n_tiles * BLOCK_N, hi, bt_row_ptr, k_base, v_base,
        block_size, stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd, window, qk_scale,
        cap_in, cap_out, new_k, new_v, new_row0, new_col, HEAD_DIM, D_PAD, BLOCK_N, PAGE, True, USE_WINDOW,
        USE_SOFTCAP, DOT_PREC, FRESH,
    )


# Arguments that change from step to step are not specialised on: integers (divisibility by 16, == 1) and the
# metadata's pointers (16-byte alignment: the engine uploads the step's int32 metadata as one buffer, so each
# tensor's offset follows the sequence count). Each combination would compile a kernel of its own while serving
# (the 8B shape's first 16-prompt step on an H100 compiled for 2.6-3.7 s). The metadata is read a scalar or a
# gathered row at a time, which alignment does not speed up.
@triton.jit(do_not_specialize=["count_ptr", "cu_ptr", "ctx_ptr", "bt_ptr", "kv_start_ptr", "tiles_ptr", "slot_ptr",
                               "stride_bt", "tiles_per_seq", "num_splits", "num_seqs", "across_heads"])
def _paged_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, part_o_ptr, part_lse_ptr, count_ptr,
    cu_ptr, ctx_ptr, bt_ptr, kv_start_ptr, tiles_ptr, new_k, new_v, slot_ptr,
    stride_qt, stride_qh, stride_qd, stride_ot, stride_oh, stride_od,
    stride_kb, stride_ks, stride_kh, stride_kd, stride_vb, stride_vs, stride_vh, stride_vd,
    stride_nt, stride_nh,
    stride_bt, block_size, window, qk_scale, cap_in, cap_out, tiles_per_seq, num_splits, num_seqs, across_heads,
    NUM_HEADS: tl.constexpr, G: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
    HAS_KV_START: tl.constexpr, USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr,
    SPLIT: tl.constexpr, DOT_PREC: tl.constexpr, TILE_MAP: tl.constexpr, LONGEST_FIRST: tl.constexpr,
    HAS_NEW_KV: tl.constexpr, DECODES_ONLY: tl.constexpr, MERGE: tl.constexpr, STORE: tl.constexpr,
):
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    if TILE_MAP:
        # tiles_ptr[s] is the first query tile of sequence s (tiles_ptr[num_seqs]: their count).
        if pid >= tl.load(tiles_ptr + num_seqs):
            return
        seq = tile_owner(tiles_ptr, num_seqs, pid)
        tile = pid - tl.load(tiles_ptr + seq)
    else:
        seq = pid // tiles_per_seq
        tile = pid % tiles_per_seq
        if LONGEST_FIRST:
            # Causal: later query tiles see more keys; blocks start in launch order (axis 0 fastest). Per pair:
            # one (sequence, KV head) pair's tiles after another's, each pair's last tile first. Across heads
            # (a runtime flag, so that either order runs the same compiled kernel): the launch index walks
            # every pair's last tile, then every pair's second-last...: the longest programs of all heads
            # start in the first wave and none runs alone at the end.
            if across_heads != 0:
                pairs = num_seqs * tl.num_programs(1)
                order = kvh * tl.num_programs(0) + pid
                tile = tiles_per_seq - 1 - order // pairs
                seq = (order % pairs) // tl.num_programs(1)
                kvh = order % tl.num_programs(1)
                pid = seq * tiles_per_seq + tile
            else:
                tile = tiles_per_seq - 1 - tile
    q_begin = tl.load(cu_ptr + seq)
    q_len = tl.load(cu_ptr + seq + 1) - q_begin
    if tile * BLOCK_Q >= q_len:  # the grid is sized by max_seqlen_q; shorter sequences stop here
        return
    if DECODES_ONLY:  # the first launch of a mixed step in two (see `paged_attention`)
        if q_len != 1:
            return
    ctx = tl.load(ctx_ptr + seq)

    # Rows: token (tile * BLOCK_Q + r // G) of the sequence, query head (kvh * G + r % G).
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    t_loc = tile * BLOCK_Q + offs_m // G
    head = kvh * G + offs_m % G
    row_ok = (offs_m < BLOCK_Q * G) & (t_loc < q_len)
    q_pos = ctx - q_len + t_loc
    tok = (q_begin + t_loc).to(tl.int64)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(
        q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & d_ok[None, :], other=0.0,
    )

    # Keys this tile can see: [lo, hi); keys in [full_lo, full_hi) are visible to every row.
    first_pos = ctx - q_len + tile * BLOCK_Q
    last_pos = ctx - q_len + tl.minimum((tile + 1) * BLOCK_Q, q_len) - 1
    lo = 0
    if HAS_KV_START:
        lo = tl.load(kv_start_ptr + seq)
    full_lo = lo
    if USE_WINDOW:
        full_lo = tl.maximum(lo, last_pos - window + 1)
        lo = tl.maximum(lo, first_pos - window + 1)
    hi = last_pos + 1
    full_hi = first_pos + 1
    owns_last_key = True
    if SPLIT:  # this program's share of the key range, in whole key tiles
        chunk = tl.cdiv(tl.cdiv(tl.maximum(hi - lo, 0), num_splits), BLOCK_N) * BLOCK_N
        if STORE:  # the split whose keys end with the last one (split 0 when the range is empty)
            owns_last_key = split == tl.maximum(hi - 1 - lo, 0) // tl.maximum(chunk, 1)
        lo = lo + split * chunk
        hi = tl.minimum(hi, lo + chunk)
    if STORE:
        # A step of one query per sequence whose key and value (``new_k``/``new_v`` [T, Hkv, D], row stride
        # ``stride_nt``) are not in the cache yet: the program whose keys end with it writes them to their slot
        # (what `store_kv` does, without a launch of its own); the barrier makes the write visible to the loads below.
        if owns_last_key:
            slot = tl.load(slot_ptr + q_begin).to(tl.int64)
            if slot >= 0:
                src = q_begin.to(tl.int64) * stride_nt + kvh * stride_nh + offs_d
                k_new = tl.load(new_k + src, mask=d_ok)
                v_new = tl.load(new_v + src, mask=d_ok)
                blk = slot // block_size
                off = slot % block_size
                tl.store(k_ptr + blk * stride_kb + off * stride_ks + kvh * stride_kh + offs_d * stride_kd,
                         k_new.to(k_ptr.dtype.element_ty), mask=d_ok)
                tl.store(v_ptr + blk * stride_vb + off * stride_vs + kvh * stride_vh + offs_d * stride_vd,
                         v_new.to(v_ptr.dtype.element_ty), mask=d_ok)
        tl.debug_barrier()
    bt_row_ptr = bt_ptr + seq.to(tl.int64) * stride_bt
    k_base = k_ptr + kvh * stride_kh
    v_base = v_ptr + kvh * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    # With the step's own K/V at hand, the keys of this step (from ctx - q_len) are read from them and
    # only the earlier ones from the pages.
    paged_hi = hi
    if HAS_NEW_KV:
        paged_hi = tl.minimum(hi, ctx - q_len)
    acc, l_i, m_i = _attend_range(
        acc, l_i, m_i, q, q_pos, lo, paged_hi, full_lo, full_hi, bt_row_ptr, k_base, v_base, block_size,
        stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd, window, qk_scale, cap_in, cap_out,
        new_k, new_v, 0, 0, HEAD_DIM, D_PAD, BLOCK_N, PAGE, USE_WINDOW, USE_SOFTCAP, DOT_PREC, False,
    )
    if HAS_NEW_KV:
        acc, l_i, m_i = _attend_range(
            acc, l_i, m_i, q, q_pos, tl.maximum(lo, ctx - q_len), hi, full_lo, full_hi, bt_row_ptr, k_base,
            v_base, block_size, stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd, window,
            qk_scale, cap_in, cap_out, new_k, new_v, q_begin - (ctx - q_len), kvh * HEAD_DIM,
            HEAD_DIM, D_PAD, BLOCK_N, PAGE, USE_WINDOW, USE_SOFTCAP, DOT_PREC, True,
        )

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    mask = row_ok[:, None] & d_ok[None, :]
    if SPLIT:
        part = (tok * NUM_HEADS + head) * num_splits + split
        tl.store(part_o_ptr + part[:, None] * D_PAD + offs_d[None, :], out, mask=mask)
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
        tl.store(part_lse_ptr + part, lse, mask=row_ok)
        if MERGE:  # the last of the row group's splits to finish merges them: no second launch
            tl.debug_barrier()  # every thread's partials are written before the release below
            slot = pid * tl.num_programs(1) + kvh
            if tl.atomic_add(count_ptr + slot, 1, sem="acq_rel", scope="gpu") == num_splits - 1:
                _merge_splits(o_ptr, part_o_ptr, part_lse_ptr, tok, head, row_ok, mask, stride_ot, stride_oh,
                              stride_od, num_splits, NUM_HEADS, D_PAD)
                tl.atomic_xchg(count_ptr + slot, 0)  # zero again for the next launch
    else:
        o_ptrs = o_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :] * stride_od
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _merge_splits(o_ptr, part_o_ptr, part_lse_ptr, tok, head, row_ok, mask, stride_ot, stride_oh, stride_od,
                  num_splits, NUM_HEADS: tl.constexpr, D_PAD: tl.constexpr):
    """Merge the split partials of rows (``tok``, ``head``) one split at a time, an online softmax over the
    splits (the weights of `_reduce_kernel`, which loads every split at once). Loads bypass L1 (``.cg``):
    other programs wrote the partials."""
    offs_d = tl.arange(0, D_PAD)
    base = (tok * NUM_HEADS + head) * num_splits
    m = tl.full(row_ok.shape, float("-inf"), tl.float32)
    den = tl.zeros(row_ok.shape, tl.float32)
    acc = tl.zeros(mask.shape, tl.float32)
    for s in range(num_splits):
        lse = tl.load(part_lse_ptr + base + s, mask=row_ok, other=float("-inf"), cache_modifier=".cg")
        part = tl.load(part_o_ptr + (base + s)[:, None] * D_PAD + offs_d[None, :], mask=mask, other=0.0,
                       cache_modifier=".cg")
        m_new = tl.maximum(m, lse)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        beta = tl.exp2(lse - m_safe)
        acc = acc * alpha[:, None] + part * beta[:, None]
        den = den * alpha + beta
        m = m_new
    out = acc / tl.where(den == 0.0, 1.0, den)[:, None]
    o_ptrs = o_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["num_splits"])
def _reduce_kernel(
    o_ptr, part_o_ptr, part_lse_ptr, stride_ot, stride_oh, stride_od, num_splits,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, S_PAD: tl.constexpr,
):
    """Merge the split partials of one (token, head): weights exp2(lse_s - max lse)."""
    tok = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, S_PAD)
    offs_d = tl.arange(0, D_PAD)
    s_ok = offs_s < num_splits
    base = (tok * NUM_HEADS + head) * num_splits
    lse = tl.load(part_lse_ptr + base + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m_safe)
    den = tl.sum(w, 0)
    parts = tl.load(part_o_ptr + (base + offs_s)[:, None] * D_PAD + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    out = tl.sum(parts * w[:, None], 0) / tl.where(den == 0.0, 1.0, den)
    tl.store(o_ptr + tok * stride_ot + head * stride_oh + offs_d * stride_od,
             out.to(o_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


@dataclass(frozen=True)
class Config:
    """Launch shape of the attention kernel. ``split_target`` is programs per SM that splitting aims for;
    ``longest_first`` launches the last query tiles (the most keys) first, ordered across KV heads when
    ``across_heads`` (None: by the grid's size, see `ACROSS_HEADS_WAVES`)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    split_target: float = 2.0
    longest_first: bool = True
    across_heads: bool | None = None


def choose_config(head_dim_pad: int, groups: int, max_seqlen_q: int, step_kv: bool = False) -> Config:
    """Decode-like steps (all rows of a sequence fit one <= 64-row tile) get small tiles and may split;
    prefill gets flash-attention tiles (``step_kv``: tuned for the step's keys read through TMA)."""
    # Defaults from the sweeps in bench/NOTES.md: decode wants long key tiles (more bytes in flight
    # per program); prefill from the pages at head_dim 128 prefers 4 warps, at 64 eight; through TMA
    # at head_dim 128 (H100) 64-row tiles up to 4k tokens, 128 x 128 tiles on 8 warps beyond.
    rows = groups * max_seqlen_q
    if rows <= 64:
        block_m = max(16, next_power_of_2(rows))
        return Config(block_m, 128 if head_dim_pad <= 128 else 64, 4, 3 if head_dim_pad <= 128 else 2)
    block_m = max(128 if head_dim_pad <= 128 else 64, next_power_of_2(groups))
    if head_dim_pad <= 64:
        return Config(block_m, 64, 8, 3)
    if head_dim_pad <= 128 and step_kv:
        if max_seqlen_q >= 4096:
            return Config(block_m, 128, 8, 3)
        return Config(max(64, next_power_of_2(groups)), 64, 4, 3)
    if head_dim_pad <= 128:
        return Config(block_m, 64, 4, 3)
    return Config(block_m, 32, 8, 2)


def refine_decode_tiles(cfg: Config, head_dim_pad: int, max_context_len: int, num_splits: int, programs: int,
                        num_sms: int, element_size: int = 2) -> Config:
    """Decode tiles by grid. The page-table load is a pipeline stage of its own, so ``num_stages`` 3 keeps one
    K/V tile in flight per program and 5 two (the sm90 TTGIR: ``(num_stages - 1) // 2`` buffers).

    * head_dim <= 64, one wave of at most two programs per SM: two 128-key tiles in flight. H200, us (before /
      after): batch 32 2k 43.3 / 37.8 (72 -> 84% of copy bandwidth), 32 x 8k 131.8 (256-key tiles) / 126.2; with
      more programs per SM one tile was faster (batch 64 2k 69.1 / 82.7 with two).
    * head_dim <= 64 otherwise, long key ranges (>= 4k per program) on a grid under four waves: 256-key tiles
      (H200, batch 32 8k/32k: 71/75% -> 88/96% before the rule above took batch 32).
    * head_dim 128: two 64-key tiles in flight (H200: batch 32 2k 70.7 -> 69.1, 128 x 2k 263.9 -> 258.0,
      256 x 2k 518.0 -> 514.5). `bench/kernel_bench.py --tune`, bench/RESULTS.md session 24.

    Measured on 16-bit K/V (``element_size``); wider K/V keep the default tiles: two 128-key fp32 tiles at head_dim
    64 would take 128 KB of shared memory, more than the 99 KB of an SM 8.6/8.9 GPU."""
    if cfg.block_m > 64 or cfg.block_n != 128 or element_size > 2:  # prefill tiles, a tile chosen elsewhere, fp32
        return cfg
    if head_dim_pad <= 64 and programs * num_splits <= 2 * num_sms:
        return dataclasses.replace(cfg, num_stages=5)
    if head_dim_pad <= 64 and max_context_len // num_splits >= 4096 and programs * num_splits < 4 * num_sms:
        return dataclasses.replace(cfg, block_n=256)
    if head_dim_pad == 128:
        return dataclasses.replace(cfg, block_n=64, num_stages=5)
    return cfg


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: a pretend GPU, so that tests exercise splitting
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def _has_tma(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


@functools.cache
def _gluon_prefill(device: torch.device):
    """The `gluon_prefill` module where it runs: a Hopper GPU (its wgmma is SM90's alone) and a Triton release
    of `GLUON_TRITON_VERSIONS`; else None."""
    if (_interpreting() or device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9
            or not triton.__version__.startswith(GLUON_TRITON_VERSIONS)):
        return None
    from . import gluon_prefill

    return gluon_prefill


def choose_num_splits(programs: int, max_context_len: int, block_n: int, num_sms: int, target: float) -> int:
    """Split the key range only when the grid cannot fill the GPU, into at most ``target`` programs per SM (one
    wave: H200, batch 8 x 8 KV heads, 8k keys at head_dim 128: 5 splits 95.4 us, 4 splits 73.2), keeping >= 2
    key tiles per split.

    A grid with a program for every SM is not split (H100, batch 32 x 8 KV heads, 2k keys: 53 us
    unsplit vs 62 us in two, at head_dim 128 96 vs 104 us; bench/NOTES.md)."""
    if programs >= num_sms:
        return 1
    want = int(target * num_sms) // max(programs, 1)
    useful = max(1, max_context_len // (2 * block_n))
    return max(1, min(want, useful, MAX_SPLITS))


def _split_pad(num_splits: int) -> int:
    """Partials the reduce kernel loads at once: three sizes, so that it compiles three times at most."""
    return next(p for p in (4, 16, MAX_SPLITS) if num_splits <= p)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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
    config: Config | None = None,
    num_splits: int | None = None,
    static_grid: bool = False,
    key: torch.Tensor | None = None,
    value: torch.Tensor | None = None,
    slot_mapping: torch.Tensor | None = None,
) -> torch.Tensor:
    """Paged attention with the reference's semantics; ``config``/``num_splits`` override the heuristics.

    ``max_seqlen_q``/``max_context_len`` only size the launch (upper bounds taken from shapes when
    absent); no tensor value is read on the host. With ``static_grid`` the launch depends on the
    shapes alone (so a CUDA graph can replay it for any query lengths): one program per query tile
    of the packed batch, mapped to its sequence on the device, and no key splitting.

    ``key``/``value`` (``[T, Hkv, D]``, optional) are this step's new keys/values, which the cache
    also holds at each sequence's last ``q_len`` positions: prompt steps on SM90+ then read them
    through TMA descriptors instead of gathering them from the pages (see `_step_kv_descriptors`).
    With ``slot_mapping`` they are not in the cache yet and this call stores them first (`store_kv`'s
    semantics): for steps of one query per sequence inside the attention launch, else by a launch of
    `store_kv` before it.
    """
    if slot_mapping is not None and (key is None or value is None):
        raise ValueError("slot_mapping names where to store this step's key and value: pass both")
    max_seqlen_q = None if max_seqlen_q is None else int(max_seqlen_q)
    max_context_len = None if max_context_len is None else int(max_context_len)
    num_seqs = context_lens.shape[0]
    # Everything the launches depend on besides tensor contents and addresses (but whether the caches are 16-byte
    # aligned, which the Gluon kernel's TMA needs and cannot copy its way around): the layers of a step share it.
    signature = (
        query.shape, query.stride(), query.dtype, query.device, k_cache.shape, k_cache.stride(), k_cache.dtype,
        v_cache.shape, v_cache.stride(), v_cache.dtype, block_tables.shape, block_tables.stride(0),
        block_tables.dtype, num_seqs, max_seqlen_q, max_context_len, scale, kv_start is not None, sliding_window,
        softcap, config, num_splits, static_grid, slot_mapping is not None and slot_mapping.shape,
        key is not None and (key.shape, key.stride(), key.dtype, value.shape, value.stride(), value.dtype),
        (k_cache.data_ptr() | v_cache.data_ptr()) % 16 == 0,
    )
    plan = _plans.get(signature)
    if plan is None:
        plan = _plan(query, k_cache, v_cache, block_tables, num_seqs, max_seqlen_q, max_context_len, scale,
                     kv_start is not None, sliding_window, softcap, config, num_splits, static_grid, key, value,
                     slot_mapping)
        if len(_plans) >= _MAX_PLANS:
            _plans.clear()
        _plans[signature] = plan
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if plan.store_first:
        store_kv(key, value, k_cache, v_cache, slot_mapping)
    if not plan.launches and not plan.gluon:
        return out
    tile_map = context_lens  # unread
    if plan.tile_map is not None:
        tile_map = torch.empty(num_seqs + 1, dtype=torch.int32, device=query.device)
        block_q, skip_decodes, block = plan.tile_map
        launch(tile_map_kernel, (1,), cu_seqlens_q, tile_map, num_seqs, block_q, SKIP_DECODES=skip_decodes,
               BLOCK=block)
    counts = None
    if plan.split_rows is not None:
        stream = _stream_key(query.device)
        part_o, part_lse = _split_partials(stream, query.device, plan.split_rows, plan.d_pad)
        if plan.merge_counts and stream is not None:
            counts = _arrival_counts(stream, plan.merge_counts)
    else:
        part_o = part_lse = out  # unread
    if plan.step_kv_block_n:
        new_k, new_v = _step_kv_descriptors(key, value, query.dtype, plan.step_kv_block_n)
    else:
        new_k, new_v = key, value
    starts = kv_start if kv_start is not None else context_lens
    for run in plan.launches:
        store = run.consts["STORE"]  # the step's keys: stored by this launch, read through TMA, or not given
        step_keys = (new_k, new_v) if store or run.consts["HAS_NEW_KV"] else (None, None)
        if plan.merge_counts and counts is None:  # captured in a graph: `_reduce_kernel` merges
            run = PreparedLaunch(run.kernel, run.grid, run.scalars, {**run.consts, "MERGE": False})
        run(query, k_cache, v_cache, out, part_o, part_lse, counts if counts is not None else context_lens,
            cu_seqlens_q, context_lens, block_tables, starts, tile_map, *step_keys,
            slot_mapping if store else context_lens)
    if plan.split_rows is not None and counts is None:
        plan.reduce(out, part_o, part_lse)
    if plan.gluon:
        _gluon_prefill(query.device).prefill(
            _tma_addressable(query), k_cache, v_cache, _tma_addressable(key.to(query.dtype)),
            _tma_addressable(value.to(query.dtype)), cu_seqlens_q, context_lens, block_tables, scale,
            min(max_seqlen_q or query.shape[0], query.shape[0]), out, None if plan.tile_map is None else tile_map)
    return out


@dataclass(frozen=True)
class _Plan:
    """What a call's shapes, dtypes and host ints decide, computed once for the layers of a step: whether
    `store_kv` runs first, the tile-map launch (``(block_q, skip_decodes, BLOCK)``, static grids), the
    attention launches, the split scratch (``split_rows``, ``d_pad``), how many arrival counters a merging
    launch needs (0: none merges), the `_reduce_kernel` launch (its tensors: out and the partials),
    ``step_kv_block_n``: the step's keys are read through TMA descriptors of tiles of that many keys, and
    ``gluon``: `gluon_prefill` attends instead of the launches."""

    store_first: bool
    launches: tuple[PreparedLaunch, ...] = ()  # of the attention kernel, its tensors given per call
    tile_map: tuple | None = None
    split_rows: tuple | None = None
    d_pad: int = 0
    merge_counts: int = 0
    reduce: PreparedLaunch | None = None
    step_kv_block_n: int = 0
    gluon: bool = False


_plans: dict[tuple, _Plan] = {}
_MAX_PLANS = 1024  # signatures hold per-step ints (context lengths): bounded, cleared when full


def _plan(query, k_cache, v_cache, block_tables, num_seqs: int, max_seqlen_q: int | None,
          max_context_len: int | None, scale: float, has_kv_start: bool, sliding_window: int | None,
          softcap: float | None, config: Config | None, num_splits: int | None, static_grid: bool, key, value,
          slot_mapping) -> _Plan:
    """Check the inputs and choose the launches (tiles, splits, where the step's keys are stored) for
    `paged_attention`; tensors are looked at for their shapes, strides and dtypes only."""
    _check(query, k_cache, v_cache, block_tables)
    total_q, num_heads, head_dim = query.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    groups = num_heads // num_kv_heads
    if total_q == 0 or num_seqs == 0:
        return _Plan(store_first=slot_mapping is not None)
    if max_seqlen_q is None:
        max_seqlen_q = total_q
    if max_context_len is None:
        max_context_len = block_tables.shape[1] * block_size
    max_seqlen_q = total_q if static_grid else max(1, min(max_seqlen_q, total_q))
    d_pad = max(16, next_power_of_2(head_dim))
    step_kv = _reads_step_kv(key, value, query, groups * max_seqlen_q)
    fuse_store = slot_mapping is not None and not step_kv and _fuses_store(
        key, value, slot_mapping, query, num_kv_heads, num_seqs, max_seqlen_q, static_grid)
    gluon = (step_kv and config is None and num_splits is None and not (has_kv_start or sliding_window or softcap)
             and _gluon_takes(query, k_cache, v_cache, block_tables, key, value, num_seqs, max_seqlen_q, static_grid))
    if gluon and not static_grid:
        return _Plan(store_first=slot_mapping is not None, gluon=True)
    cfg = config or choose_config(d_pad, groups, max_seqlen_q, step_kv)
    if cfg.block_m < groups:
        raise ValueError(f"block_m={cfg.block_m} cannot hold the {groups} query heads of one KV head")
    block_q = cfg.block_m // groups
    tiles_per_seq = cdiv(max_seqlen_q, block_q)
    programs = num_seqs * tiles_per_seq * num_kv_heads
    tile_map = None
    # A graph of a mixed step: its decodes (one query each) get a launch of their own with decode tiles; inside
    # prompt tiles each would fill G of 64-128 rows (on an H100 the attention of 511 decodes beside a 520-token
    # prompt took 504 us in one launch, 311 us in two: bench/NOTES.md).
    split_decodes = static_grid and config is None and block_q > 1
    if static_grid:
        # Each sequence ends at most one partial tile: cdiv(total_q, block_q) + num_seqs bounds the tiles. Split,
        # the decodes get no tile here (the programs past the last tile return at once).
        tile_map = (block_q, split_decodes, next_power_of_2(num_seqs + 1))
        programs, num_splits = cdiv(total_q, block_q) + num_seqs, 1
    if num_splits is None:
        num_splits = choose_num_splits(programs, max_context_len, cfg.block_n, _num_sms(query.device),
                                       cfg.split_target)
    if config is None:
        cfg = refine_decode_tiles(cfg, d_pad, max_context_len, num_splits, programs, _num_sms(query.device),
                                  k_cache.element_size())
    split = num_splits > 1
    merge_counts = num_seqs * tiles_per_seq * num_kv_heads if split and num_splits <= MAX_MERGED_SPLITS else 0
    use_softcap, use_window = bool(softcap), bool(sliding_window)
    out_strides = (num_heads * head_dim, head_dim, 1)  # a fresh contiguous [T, H, D]
    common = dict(
        NUM_HEADS=num_heads, G=groups, HEAD_DIM=head_dim, D_PAD=d_pad,
        PAGE=block_size if block_size & (block_size - 1) == 0 and block_size <= 4096 else 0,
        HAS_KV_START=has_kv_start, USE_WINDOW=use_window, USE_SOFTCAP=use_softcap, SPLIT=split,
        DOT_PREC="ieee" if query.dtype == torch.float32 else "tf32", MERGE=merge_counts > 0,
    )

    def attention_launch(cfg: Config, grid: tuple, tiles_per_seq: int, tile_map: bool, new_kv: bool,
                         decodes_only: bool, store: bool) -> PreparedLaunch:
        scalars = (
            *query.stride(), *out_strides, *k_cache.stride(), *v_cache.stride(),
            *(key.stride()[:2] if store else (0, 0)), block_tables.stride(0), block_size,
            int(sliding_window) if use_window else 0, scale * LOG2E,
            2.0 * LOG2E * scale / softcap if use_softcap else 0.0, softcap * LOG2E if use_softcap else 0.0,
            tiles_per_seq, num_splits, num_seqs,
            int(cfg.across_heads if cfg.across_heads is not None else tiles_per_seq == 1 or
                grid[0] * grid[1] <= ACROSS_HEADS_WAVES * _num_sms(query.device) * max(1, 8 // cfg.num_warps)),
        )
        consts = dict(
            common, BLOCK_M=cfg.block_m, BLOCK_Q=cfg.block_m // groups, BLOCK_N=cfg.block_n, TILE_MAP=tile_map,
            LONGEST_FIRST=cfg.longest_first, HAS_NEW_KV=new_kv and not store,
            DECODES_ONLY=decodes_only, STORE=store, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        return PreparedLaunch(_paged_attention_kernel, grid, scalars, consts)

    launches = []
    if split_decodes:
        decode_cfg = refine_decode_tiles(choose_config(d_pad, groups, 1), d_pad, max_context_len, 1,
                                         num_seqs * num_kv_heads, _num_sms(query.device), k_cache.element_size())
        launches.append(attention_launch(decode_cfg, (num_seqs, num_kv_heads, 1), 1, False, False, True, False))
    if gluon and split_decodes:  # a static grid: the decodes above, the others' tiles in the Gluon kernel's map
        return _Plan(store_first=slot_mapping is not None, launches=tuple(launches), gluon=True,
                     tile_map=(_gluon_prefill(query.device).BLOCK_M, True, next_power_of_2(num_seqs + 1)))
    launches.append(attention_launch(
        cfg, (programs if static_grid else num_seqs * tiles_per_seq, num_kv_heads, num_splits), tiles_per_seq,
        static_grid, step_kv or fuse_store, False, fuse_store))
    reduce = None
    if split:
        reduce = PreparedLaunch(_reduce_kernel, (total_q, num_heads), (*out_strides, num_splits),
                                dict(NUM_HEADS=num_heads, HEAD_DIM=head_dim, D_PAD=d_pad, S_PAD=_split_pad(num_splits),
                                     num_warps=4 if d_pad >= 128 else 2))
    return _Plan(
        store_first=slot_mapping is not None and not fuse_store, launches=tuple(launches), tile_map=tile_map,
        split_rows=(total_q, num_heads, num_splits) if split else None, d_pad=d_pad, merge_counts=merge_counts,
        reduce=reduce, step_kv_block_n=cfg.block_n if step_kv else 0,
    )


_counts: dict[tuple, torch.Tensor] = {}  # (device, stream) -> int32 arrival counts, zero between launches
_partials: dict[tuple, tuple] = {}  # (device, stream) -> (fp32 scratch, the last call's shapes, its two views)
_MAX_KEPT_PARTIALS = 1 << 24  # floats (64 MB); a larger need is allocated for its call alone


def _stream_key(device: torch.device) -> tuple | None:
    """``(device, stream)`` naming the buffers that launches on one stream share (they run one after another:
    a launch's split partials and arrival counters are done with before the next starts). One set per stream,
    since launches on two streams may run at once. ``None`` while a CUDA graph is captured: the graph would hold
    on to a buffer that a later, larger need replaces."""
    if device.type != "cuda":  # the interpreter
        return (device, 0)
    if torch.cuda.is_current_stream_capturing():
        return None
    return (device, driver.active.get_current_stream(device.index))


def _arrival_counts(stream: tuple, needed: int) -> torch.Tensor:
    """Counters with which the last split of each row group merges the partials inside the attention launch
    (one launch fewer: on the H100 machine's host a split call cost ~50 us more than an unsplit one)."""
    counts = _counts.get(stream)
    if counts is None or counts.numel() < needed:
        counts = _counts[stream] = torch.zeros(max(needed, 4096), dtype=torch.int32, device=stream[0])
    return counts


def _split_partials(stream: tuple | None, device: torch.device, rows: tuple, d_pad: int) -> tuple:
    """Scratch for the split partials ``[*rows, d_pad]`` and their log-sum-exps ``[*rows]``, fp32: kept per stream
    (every decode layer of ``generate`` splits; an allocation cost ~3 us of host time on the H100 machine),
    allocated per call while a graph is captured or for needs over 64 MB. The views of the last shapes are kept
    too: the layers of a step ask for the same ones."""
    kept = _partials.get(stream) if stream is not None else None
    if kept is not None and kept[1] == (rows, d_pad):
        return kept[2]
    n = math.prod(rows)
    need = n * (d_pad + 1)
    keep = stream is not None and need <= _MAX_KEPT_PARTIALS
    if keep and kept is not None and kept[0].numel() >= need:
        buf = kept[0]
    else:
        buf = torch.empty(max(need, 1 << 20) if keep else need, dtype=torch.float32, device=device)
    views = buf[: n * d_pad].view(*rows, d_pad), buf[n * d_pad : need].view(rows)
    if keep:
        _partials[stream] = (buf, (rows, d_pad), views)
    return views


def _fuses_store(key, value, slot_mapping, query, num_kv_heads: int, num_seqs: int, max_seqlen_q: int,
                 static_grid: bool) -> bool:
    """Whether the attention launch stores the step's keys itself: one query per sequence (a decode step; the
    program that attends a sequence's last key writes it first), K/V ``[T, Hkv, D]`` laid out alike with a
    unit stride along D. Anything else (and malformed input, which `store_kv` then names) takes `store_kv`."""
    total_q, _, head_dim = query.shape
    if static_grid or max_seqlen_q != 1 or total_q != num_seqs or key is None or value is None:
        return False
    return (key.shape == value.shape == (total_q, num_kv_heads, head_dim) and slot_mapping.shape == (total_q,)
            and key.stride() == value.stride() and key.stride(2) == 1)


def _reads_step_kv(key, value, query, rows: int) -> bool:
    """Whether the kernel reads the step's own keys/values (through TMA) instead of their pages: prompt
    steps on SM90+ at power-of-two head dims. Decode-like steps (a key or two per sequence) read no
    faster through TMA; GPUs before SM90 have none."""
    if key is None or value is None or rows <= 64 or value.shape != key.shape or key.shape[0] != query.shape[0]:
        return False
    head_dim = key.shape[2]
    if head_dim & (head_dim - 1) or head_dim < 16:
        return False
    return _interpreting() or _has_tma(query.device)


def _gluon_takes(query, k_cache, v_cache, block_tables, key, value, num_seqs: int, max_seqlen_q: int,
                 static_grid: bool) -> bool:
    """Whether a prompt step goes to `gluon_prefill` (the caller rules out given tiles or splits, ``kv_start``,
    windows and softcap): fp16/bf16 at head_dim 128, prompts of at most `GLUON_MAX_SEQLEN_Q` (a static grid's
    step: its tokens) that average >= 128 queries a sequence unless the grid is static (there decodes launch
    apart; else each would take a 128-row tile per query head), caches ``[blocks, page, Hkv, D]`` packed and
    16-byte aligned with a power-of-two page of >= 8 keys (a page's box then starts on a swizzle period of the
    tile); on a GPU and Triton release where it runs (`_gluon_prefill`) and not turned off (``HF_PAGED_GLUON=0``).
    Query and step K/V in a layout TMA cannot address are copied at the call (`_tma_addressable`)."""
    head_dim = query.shape[2]
    page, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    row = num_kv_heads * head_dim
    return (query.dtype in (torch.bfloat16, torch.float16) and head_dim == 128 and page >= 8
            and page & (page - 1) == 0 and max_seqlen_q <= GLUON_MAX_SEQLEN_Q
            and (static_grid or query.shape[0] >= 128 * num_seqs) and block_tables.stride(1) == 1
            and k_cache.stride() == v_cache.stride() == (page * row, row, head_dim, 1)
            and (k_cache.data_ptr() | v_cache.data_ptr()) % 16 == 0
            and os.environ.get("HF_PAGED_GLUON", "1") != "0" and _gluon_prefill(query.device) is not None)


def _tma_addressable(t: torch.Tensor) -> torch.Tensor:
    """``t`` (``[T, H, D]``) as TMA can address it viewed as ``[T, H * D]``: inner dims packed, base and row stride
    16-byte aligned; else a packed copy (one pass over this step's rows, small beside its attention)."""
    if t.stride(2) != 1 or t.stride(1) != t.shape[2] or t.data_ptr() % 16 or t.stride(0) * t.element_size() % 16:
        return t.clone(memory_format=torch.contiguous_format)
    return t


def _step_kv_descriptors(key, value, dtype: torch.dtype, block_n: int) -> tuple:
    """TMA descriptors of the step's keys/values viewed as ``[T, Hkv * D]``, in tiles of ``block_n`` keys
    of one head (copied first where TMA cannot address them, `_tma_addressable`)."""
    total_q, num_kv_heads, head_dim = key.shape
    descriptors = []
    for t in (key, value):
        t = _tma_addressable(t.to(dtype))
        descriptors.append(TensorDescriptor(t, [total_q, num_kv_heads * head_dim], [t.stride(0), 1],
                                            [block_n, head_dim]))
    return tuple(descriptors)


def _check(query, k_cache, v_cache, block_tables) -> None:
    """Raise for inputs the kernel does not handle instead of computing something wrong."""
    if query.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"expected query [T, H, D] and caches [blocks, block_size, Hkv, D], got {tuple(query.shape)}, "
            f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
        )
    if query.dtype not in SUPPORTED_DTYPES:
        raise NotImplementedError(f"triton paged attention supports fp16/bf16/fp32, got {query.dtype}")
    if k_cache.dtype != query.dtype or v_cache.dtype != query.dtype:
        raise ValueError(f"query ({query.dtype}) and caches ({k_cache.dtype}, {v_cache.dtype}) must share a dtype")
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"query head_dim {head_dim} != cache head_dim {k_cache.shape[3]}")
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    if not 1 <= head_dim <= 256:
        raise NotImplementedError(f"head_dim {head_dim} not supported (at most 256)")
    if num_heads // num_kv_heads > 128:
        raise NotImplementedError(f"more than 128 query heads per KV head ({num_heads}/{num_kv_heads})")
    if block_tables.dim() != 2 or block_tables.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_tables must be a 2D int32/int64 tensor, got {block_tables.dtype} {tuple(block_tables.shape)}")
    if query.device.type != "cuda" and not _interpreting():
        raise NotImplementedError(f"triton kernels need a CUDA device (or TRITON_INTERPRET=1), got {query.device}")
