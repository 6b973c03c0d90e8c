"""Causal prompt attention for Hopper (SM90) in Gluon, Triton's lower-level dialect: warp-specialised and
ping-ponged, FlashAttention-3's design.

Each program takes 128 query rows of one head. One producer warp streams key/value tiles by TMA into a ring of
shared buffers (mbarriers ``ready``/``empty``): a sequence's earlier keys from its pages (a box of up to a page per
copy), this step's own keys from the step's K/V. Two consumer warpgroups of 64 rows take turns on the tensor cores
(``turn`` mbarriers): one's softmax runs under the other's Q K^T and P V; each also issues its next Q K^T before
waiting on its P V. Programs are launched longest first across heads (every head's last query tile, then every
head's second-last...), a GQA group's heads next to each other.

`triton_attention.paged_attention` launches it for prompt steps that qualify (`triton_attention._gluon_takes`); the same math
as the Triton kernel (tests compare both with the reference on the GPU). Measured on an H200 against the Triton
kernel and FlashAttention-4 in bench/RESULTS.md (session 22).
"""

import functools
import math

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .triton_tile_map import tile_owner

__all__ = ["BLOCK_M", "prefill"]

_ROWS = 64  # query rows per consumer warpgroup
BLOCK_M = 2 * _ROWS  # query rows (of one head) per program
_BLOCK_N = 128
_STAGES = 2


@gluon.jit
def _producer(q_desc, k_desc, v_desc, kc_desc, vc_desc, q_smem, k_bufs, v_bufs, q_bar, ready, empty, q_row, q_col,
              kv_row, kv_col, bt_row_ptr, prefix, ctx, n_pref, n_tiles, PAGE: gl.constexpr, BOX: gl.constexpr,
              BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """Q once, then key tile i into stage i % STAGES once both warpgroups released it: the first ``n_pref`` tiles
    from the pages (``BLOCK_N // BOX`` copies each), the rest from the step's keys."""
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row, q_col], q_bar, q_smem)
    for i in range(n_pref):
        s = i % STAGES
        mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)  # a fresh barrier passes parity 1
        mbarrier.expect(ready.index(s), 2 * kc_desc.block_type.nbytes * (BLOCK_N // BOX))
        for b in gl.static_range(BLOCK_N // BOX):
            # A box past the sequence's last key (the prefix's last tile) reads its last page: masked anyway.
            pos = gl.minimum(i * BLOCK_N + b * BOX, ctx - 1)
            row = gl.load(bt_row_ptr + pos // PAGE).to(gl.int32) * PAGE + (pos % PAGE) // BOX * BOX
            tma.async_copy_global_to_shared(kc_desc, [row, kv_col], ready.index(s),
                                            k_bufs.index(s).slice(b * BOX, BOX))
            tma.async_copy_global_to_shared(vc_desc, [row, kv_col], ready.index(s),
                                            v_bufs.index(s).slice(b * BOX, BOX))
    for i in range(n_pref, n_tiles):
        s = i % STAGES
        mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)
        mbarrier.expect(ready.index(s), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        row = kv_row + (i - n_pref) * BLOCK_N
        tma.async_copy_global_to_shared(k_desc, [row, kv_col], ready.index(s), k_bufs.index(s))
        tma.async_copy_global_to_shared(v_desc, [row, kv_col], ready.index(s), v_bufs.index(s))


@gluon.jit
def _softmax_tile(qk, i, n_pref, n_edge, prefix, q_loc, m_i, l_i, qk_scale, BLOCK_N: gl.constexpr,
                  s_layout: gl.constexpr):
    """Key tile ``i``'s probabilities, the rescale of what came before, the new running max and sum. Masked where a
    key may be invisible: the prefix's last tile (its keys past ``prefix``) and the step's tiles from ``n_edge`` on
    (causal: a step key at local position j is seen by rows at local positions >= j)."""
    if (i == n_pref - 1) | (i >= n_edge):
        j = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        limit = gl.where(i < n_pref, prefix - i * BLOCK_N, q_loc + 1 - (i - n_pref) * BLOCK_N)
        qk = gl.where(j[None, :] < limit[:, None], qk, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(qk, 1) * qk_scale)
    p = gl.exp2(qk * qk_scale - m_new[:, None])
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, alpha, m_new, l_i


@gluon.jit
def _consumer(q_smem, k_bufs, v_bufs, q_bar, ready, empty, turn, o_ptr, stride_ot, o_row, o_col, rows_left, t0,
              prefix, n_pref, n_edge, n_tiles, qk_scale, WG: gl.constexpr, ROWS: gl.constexpr,
              BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr):
    """Warpgroup ``WG``'s 64 rows. Section i issues tile i's Q K^T and tile i-1's P V on its turn, hands the turn
    over, then runs tile i's softmax while the other warpgroup's section runs on the tensor cores."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    dtype: gl.constexpr = q_smem.dtype
    q_rows = q_smem.slice(WG * ROWS, ROWS)
    m_i = gl.full([ROWS], float("-inf"), gl.float32, layout=row_s)
    l_i = gl.zeros([ROWS], gl.float32, layout=row_s)
    acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=o_layout)
    zero_s = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)
    q_loc = t0 + WG * ROWS + gl.arange(0, ROWS, layout=row_s)  # positions within the step
    mbarrier.wait(q_bar, 0)
    # Section 0: tile 0's Q K^T. Warpgroup 0 goes first (its first wait passes on the fresh barrier).
    mbarrier.wait(ready.index(0), 0)
    mbarrier.wait(turn.index(WG), 1 - WG)
    qk = warpgroup_mma(q_rows, k_bufs.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    mbarrier.arrive(turn.index(1 - WG), count=1)
    qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk,))
    p, alpha, m_i, l_i = _softmax_tile(qk, 0, n_pref, n_edge, prefix, q_loc, m_i, l_i, qk_scale, BLOCK_N, s_layout)
    p_op = gl.convert_layout(p.to(dtype), p_layout)
    for i in range(1, n_tiles):
        s = i % STAGES
        prev = (i - 1) % STAGES
        mbarrier.wait(ready.index(s), (i // STAGES) & 1)
        mbarrier.wait(turn.index(WG), (i & 1) ^ (1 - WG))
        qk = warpgroup_mma(q_rows, k_bufs.index(s).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        acc = warpgroup_mma(p_op, v_bufs.index(prev), acc, is_async=True)
        mbarrier.arrive(turn.index(1 - WG), count=1)
        qk = warpgroup_mma_wait(num_outstanding=1, deps=(qk,))
        p, alpha, m_i, l_i = _softmax_tile(qk, i, n_pref, n_edge, prefix, q_loc, m_i, l_i, qk_scale, BLOCK_N,
                                           s_layout)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(empty.index(prev), count=1)
        acc = acc * gl.convert_layout(alpha, row_o)[:, None]
        p_op = gl.convert_layout(p.to(dtype), p_layout)
    last = (n_tiles - 1) % STAGES  # the last section: the last tile's P V
    mbarrier.wait(turn.index(WG), (n_tiles & 1) ^ (1 - WG))
    acc = warpgroup_mma(p_op, v_bufs.index(last), acc, is_async=True)
    mbarrier.arrive(turn.index(1 - WG), count=1)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    mbarrier.arrive(empty.index(last), count=1)
    out = acc / gl.convert_layout(l_i, row_o)[:, None]
    r = gl.arange(0, ROWS, layout=row_o)
    d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    ptrs = o_ptr + (o_row + WG * ROWS + r).to(gl.int64)[:, None] * stride_ot + o_col + d[None, :]
    gl.store(ptrs, out.to(dtype), mask=(r < rows_left - WG * ROWS)[:, None])


# What changes from step to step is not specialised on, as in `triton_attention._paged_attention_kernel`: each
# variant compiled for seconds inside served steps (an H200 engine run: 45 s more warm-up, a first step of 2.5 s).
@gluon.jit(do_not_specialize=["cu_ptr", "ctx_ptr", "bt_ptr", "tiles_ptr", "stride_bt", "tiles_per_seq", "num_seqs"])
def _prefill_kernel(q_desc, k_desc, v_desc, kc_desc, vc_desc, o_ptr, cu_ptr, ctx_ptr, bt_ptr, tiles_ptr, stride_bt,
                    stride_ot, qk_scale, tiles_per_seq, num_seqs, num_heads, G: gl.constexpr, HEAD_DIM: gl.constexpr,
                    PAGE: gl.constexpr, BOX: gl.constexpr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr,
                    STAGES: gl.constexpr, TILE_MAP: gl.constexpr):
    BLOCK_M: gl.constexpr = 2 * ROWS
    order = gl.program_id(0)
    head = order % num_heads
    if TILE_MAP:
        # A grid sized from shapes (CUDA graphs): ``tiles_ptr[s]`` is sequence s's first tile (``tiles_ptr[num_seqs]``
        # their count).
        slot = order // num_heads
        seq = tile_owner(tiles_ptr, num_seqs, slot)
        tile = gl.load(tiles_ptr + seq + 1) - 1 - slot  # a sequence's last tile first
        run = slot < gl.load(tiles_ptr + num_seqs)
    else:
        pairs = num_seqs * num_heads
        tile = tiles_per_seq - 1 - order // pairs
        seq = (order % pairs) // num_heads
        run = True
    q_begin = gl.load(cu_ptr + seq)
    q_len = gl.load(cu_ptr + seq + 1) - q_begin
    t0 = tile * BLOCK_M
    if run & (t0 < q_len):  # the grid is sized by the longest sequence, or by the tokens
        ctx = gl.load(ctx_ptr + seq)
        prefix = ctx - q_len  # keys in the pages before this step's
        n_pref = gl.cdiv(prefix, BLOCK_N)
        n_edge = n_pref + (t0 + 1) // BLOCK_N  # the first step tile that some row must mask
        n_tiles = n_pref + gl.cdiv(gl.minimum(t0 + BLOCK_M, q_len), BLOCK_N)
        dtype: gl.constexpr = q_desc.dtype
        q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_desc.layout)
        k_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
        v_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for st in gl.static_range(STAGES):
            mbarrier.init(ready.index(st), count=1)
            mbarrier.init(empty.index(st), count=2)  # both warpgroups release each stage
        mbarrier.init(turn.index(0), count=1)
        mbarrier.init(turn.index(1), count=1)
        bt_row_ptr = bt_ptr + seq.to(gl.int64) * stride_bt
        o_row = q_begin + t0
        o_col = head * HEAD_DIM
        kv_col = (head // G) * HEAD_DIM
        gl.warp_specialize([
            (_consumer, (q_smem, k_bufs, v_bufs, q_bar, ready, empty, turn, o_ptr, stride_ot, o_row, o_col,
                         q_len - t0, t0, prefix, n_pref, n_edge, n_tiles, qk_scale, 0, ROWS, BLOCK_N, HEAD_DIM,
                         STAGES)),
            (_consumer, (q_smem, k_bufs, v_bufs, q_bar, ready, empty, turn, o_ptr, stride_ot, o_row, o_col,
                         q_len - t0, t0, prefix, n_pref, n_edge, n_tiles, qk_scale, 1, ROWS, BLOCK_N, HEAD_DIM,
                         STAGES)),
            (_producer, (q_desc, k_desc, v_desc, kc_desc, vc_desc, q_smem, k_bufs, v_bufs, q_bar, ready, empty,
                         o_row, o_col, q_begin, kv_col, bt_row_ptr, prefix, ctx, n_pref, n_tiles, PAGE, BOX,
                         BLOCK_N, STAGES)),
        ], [4, 1], [240, 24])


@functools.cache
def _tile_layout(dtype: torch.dtype, head_dim: int):
    """The shared-memory layout of Q and K/V tiles (128 rows of ``head_dim``; the swizzle depends on the row's
    bytes alone), made once instead of at every layer's call."""
    return gl.NVMMASharedLayout.get_default_for([BLOCK_M, head_dim], gl.bfloat16 if dtype == torch.bfloat16
                                                else gl.float16)


def prefill(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, key: torch.Tensor,
            value: torch.Tensor, cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
            block_tables: torch.Tensor, scale: float, max_seqlen_q: int, out: torch.Tensor,
            tile_map: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of a prompt step into ``out`` ([T, H, D], fresh): each sequence's queries see the keys in
    its pages before this step (``context_lens - q_len`` of them) and this step's own ``key``/``value`` (also in
    the cache, not read from there). Inputs as `triton_attention._gluon_takes` accepts them, the query and step K/V
    as TMA addresses them (`triton_attention._tma_addressable`).

    ``tile_map`` (``[num_seqs + 1]``: each sequence's first tile of `BLOCK_M` queries, then their count; sequences
    given no tile are skipped, e.g. decodes launched apart) sizes the grid from shapes alone, for CUDA graphs."""
    total, heads, d = query.shape
    num_blocks, page, kv_heads, _ = k_cache.shape
    layout = _tile_layout(query.dtype, d)
    box = min(page, _BLOCK_N)
    q_desc = TensorDescriptor(query, [total, heads * d], [query.stride(0), 1], [BLOCK_M, d], layout)
    step = [TensorDescriptor(t, [total, kv_heads * d], [t.stride(0), 1], [_BLOCK_N, d], layout)
            for t in (key, value)]
    # The pages' box: rows of one page (at most a tile) into a tile's row slice, in the tile's swizzle.
    pages = [TensorDescriptor(t, [num_blocks * page, kv_heads * d], [kv_heads * d, 1], [box, d], layout)
             for t in (k_cache, v_cache)]
    seqs = context_lens.shape[0]
    tiles = triton.cdiv(max_seqlen_q, BLOCK_M)
    slots = seqs * tiles if tile_map is None else triton.cdiv(total, BLOCK_M) + seqs  # a partial tile per sequence
    _prefill_kernel[(slots * heads,)](
        q_desc, *step, *pages, out, cu_seqlens_q, context_lens, block_tables,
        context_lens if tile_map is None else tile_map, block_tables.stride(0), heads * d, scale * math.log2(math.e),
        tiles, seqs, heads, heads // kv_heads, d, page, box, _ROWS, _BLOCK_N, _STAGES, tile_map is not None,
        num_warps=4)
    return out
