"""A warp-specialised causal prefill for Hopper in Gluon (Triton's lower-level dialect), checked against the
reference and timed beside hf_paged's Triton kernel: where the way past the `tl` kernel starts (issue 16).

One producer warp streams K/V tiles by TMA into a ring of shared buffers (mbarriers: ready / empty); the default
partition (two warpgroups, 128 query rows of one head) runs Q K^T and P V on wgmma with an online softmax, the
causal edge masked in the same loop. The "overlap" variants issue tile i's Q K^T while tile i-1's P V runs
(FlashAttention-3's overlap within a warpgroup). Fresh prompts only (each sequence's keys are its own queries'),
bf16, head_dim 64/128.
Not used by the engine: on an H200 it reached 0.86x of the Triton kernel at d128 b1 2k (bench/RESULTS.md, session 21).

    python bench/gluon_prefill.py [--out bench/results]   # needs an SM90 GPU and triton >= 3.6
"""

import argparse
import datetime
import importlib.metadata
import json
import os

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from bench.kernel_bench import _round_robin, ceilings, paged_inputs
from hf_paged.kernels import reference, triton_attention


@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, q_bar, ready, empty, q_row, q_col, kv_row, kv_col,
              n_tiles, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row, q_col], q_bar, q_smem)
    for i in range(n_tiles):
        s = i % STAGES
        mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)  # a fresh barrier passes parity 1
        mbarrier.expect(ready.index(s), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [kv_row + i * BLOCK_N, kv_col], ready.index(s), k_bufs.index(s))
        tma.async_copy_global_to_shared(v_desc, [kv_row + i * BLOCK_N, kv_col], ready.index(s), v_bufs.index(s))


@gluon.constexpr_function
def _mma_layout(n, num_warps):
    """The wgmma accumulator layout of ``num_warps`` warps over [rows, n]."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, n, 16])


@gluon.jit
def _softmax_tile(qk, i, n_full, q_pos, m_i, l_i, qk_scale, BLOCK_N: gl.constexpr, s_layout: gl.constexpr):
    """Key tile ``i``'s probabilities (the causal mask past the ``n_full`` unmasked tiles), the rescale of what came
    before, and the new running max and sum."""
    if i >= n_full:
        j = i * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        qk = gl.where(j[None, :] <= q_pos[:, None], qk, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(qk, 1) * qk_scale)
    p = gl.exp2(qk * qk_scale - m_new[:, None])
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, alpha, m_new, l_i


@gluon.jit
def _store_rows(acc, l_i, o_ptr, stride_ot, o_row, o_col, rows_left, BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr,
                o_layout: gl.constexpr):
    """The normalised rows that belong to the sequence (``rows_left`` of them) into ``o`` [T, H * D]."""
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    out = acc / gl.convert_layout(l_i, row_o)[:, None]
    r = gl.arange(0, BLOCK_M, layout=row_o)
    d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    ptrs = o_ptr + (o_row + r).to(gl.int64)[:, None] * stride_ot + o_col + d[None, :]
    gl.store(ptrs, out.to(gl.bfloat16), mask=(r < rows_left)[:, None])


@gluon.jit
def _consumer(q_smem, k_bufs, v_bufs, q_bar, ready, empty, o_ptr, stride_ot, o_row, o_col, rows_left, t0,
              n_tiles, n_full, qk_scale, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
              STAGES: gl.constexpr, NUM_WARPS: gl.constexpr, OVERLAP: gl.constexpr):
    """Online softmax over the key tiles the producer fills. ``OVERLAP``: tile i's Q K^T runs while tile i-1's P V
    runs, before tile i's softmax (FlashAttention-3's overlap within a warpgroup)."""
    s_layout: gl.constexpr = _mma_layout(BLOCK_N, NUM_WARPS)
    o_layout: gl.constexpr = _mma_layout(HEAD_DIM, NUM_WARPS)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=row_s)
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=row_s)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)
    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    q_pos = t0 + gl.arange(0, BLOCK_M, layout=row_s)
    mbarrier.wait(q_bar, 0)
    if OVERLAP:
        mbarrier.wait(ready.index(0), 0)
        qk = warpgroup_mma(q_smem, k_bufs.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk,))
        p, alpha, m_i, l_i = _softmax_tile(qk, 0, n_full, q_pos, m_i, l_i, qk_scale, BLOCK_N, s_layout)
        p_op = gl.convert_layout(p.to(gl.bfloat16), p_layout)
        for i in range(1, n_tiles):
            s = i % STAGES
            prev = (i - 1) % STAGES
            mbarrier.wait(ready.index(s), (i // STAGES) & 1)
            qk = warpgroup_mma(q_smem, k_bufs.index(s).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            acc = warpgroup_mma(p_op, v_bufs.index(prev), acc, is_async=True)
            qk = warpgroup_mma_wait(num_outstanding=1, deps=(qk,))
            p, alpha, m_i, l_i = _softmax_tile(qk, i, n_full, q_pos, m_i, l_i, qk_scale, BLOCK_N, s_layout)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            mbarrier.arrive(empty.index(prev), count=1)
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
            p_op = gl.convert_layout(p.to(gl.bfloat16), p_layout)
        last = (n_tiles - 1) % STAGES
        acc = warpgroup_mma(p_op, v_bufs.index(last), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(empty.index(last), count=1)
    else:
        for i in range(n_tiles):
            s = i % STAGES
            mbarrier.wait(ready.index(s), (i // STAGES) & 1)
            qk = warpgroup_mma(q_smem, k_bufs.index(s).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk,))
            p, alpha, m_i, l_i = _softmax_tile(qk, i, n_full, q_pos, m_i, l_i, qk_scale, BLOCK_N, s_layout)
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
            p_op = gl.convert_layout(p.to(gl.bfloat16), p_layout)
            acc = warpgroup_mma(p_op, v_bufs.index(s), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            mbarrier.arrive(empty.index(s), count=1)
    _store_rows(acc, l_i, o_ptr, stride_ot, o_row, o_col, rows_left, BLOCK_M, HEAD_DIM, o_layout)


@gluon.jit
def _prefill_kernel(q_desc, k_desc, v_desc, o_ptr, cu_ptr, stride_ot, qk_scale, tiles_per_seq,
                    G: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                    STAGES: gl.constexpr, NUM_WARPS: gl.constexpr, OVERLAP: gl.constexpr):
    pid = gl.program_id(0)
    head = gl.program_id(1)
    seq = pid // tiles_per_seq
    tile = tiles_per_seq - 1 - pid % tiles_per_seq  # longest first
    q_begin = gl.load(cu_ptr + seq)
    q_len = gl.load(cu_ptr + seq + 1) - q_begin
    t0 = tile * BLOCK_M
    if t0 < q_len:
        last = gl.minimum(t0 + BLOCK_M, q_len)
        n_tiles = gl.cdiv(last, BLOCK_N)
        n_full = (t0 + 1) // BLOCK_N
        q_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_M, HEAD_DIM], q_desc.layout)
        k_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
        v_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for st in gl.static_range(STAGES):
            mbarrier.init(ready.index(st), count=1)
            mbarrier.init(empty.index(st), count=1)
        gl.warp_specialize([
            (_consumer, (q_smem, k_bufs, v_bufs, q_bar, ready, empty, o_ptr, stride_ot, q_begin + t0,
                         head * HEAD_DIM, q_len - t0, t0, n_tiles, n_full, qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM,
                         STAGES, NUM_WARPS, OVERLAP)),
            (_producer, (q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, q_bar, ready, empty, q_begin + t0,
                         head * HEAD_DIM, q_begin, (head // G) * HEAD_DIM, n_tiles, BLOCK_N, STAGES)),
        ], [1], [24])


def prefill(q, k, v, cu_seqlens, max_q_len, scale, block_m=128, block_n=128, stages=2, num_warps=8, overlap=False):
    """q [T, H, D], k/v [T, Hkv, D] (bf16, contiguous), sequences packed by ``cu_seqlens``; causal, each
    sequence's keys are its own queries' (a fresh prompt). Returns [T, H, D]."""
    total, heads, d = q.shape
    kv_heads = k.shape[1]
    out = torch.empty_like(q)
    q_layout = gl.NVMMASharedLayout.get_default_for([block_m, d], gl.bfloat16)
    kv_layout = gl.NVMMASharedLayout.get_default_for([block_n, d], gl.bfloat16)
    q_desc = TensorDescriptor.from_tensor(q.view(total, heads * d), [block_m, d], q_layout)
    k_desc = TensorDescriptor.from_tensor(k.view(total, kv_heads * d), [block_n, d], kv_layout)
    v_desc = TensorDescriptor.from_tensor(v.view(total, kv_heads * d), [block_n, d], kv_layout)
    tiles = triton.cdiv(max_q_len, block_m)
    grid = (len(cu_seqlens) - 1) * tiles, heads
    _prefill_kernel[grid](q_desc, k_desc, v_desc, out, cu_seqlens, heads * d, scale * triton_attention.LOG2E, tiles,
                          heads // kv_heads, d, block_m, block_n, stages, num_warps, overlap, num_warps=num_warps)
    return out


CONFIGS = {"128x128 s2": dict(block_m=128, block_n=128, stages=2), "128x64 s3": dict(block_m=128, block_n=64, stages=3)}
SHAPES = ((128, 1, 2048), (128, 1, 8192), (64, 8, 2048), (64, 1, 2048))  # (D, B, L)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    variants = {f"{name}{' overlap' if overlap else ''}": dict(kw, overlap=overlap)
                for name, kw in CONFIGS.items() for overlap in (False, True)}
    errors = {}
    for d in (128, 64):  # correctness first: every variant against the fp32 reference
        q, k, v, meta = paged_inputs(2, 700, 700, 32, 8, d)
        want = reference.paged_attention(q.float(), k.float(), v.float(), **meta)
        for name, kw in variants.items():
            got = prefill(q, meta["key"], meta["value"], meta["cu_seqlens_q"], 700, meta["scale"], **kw)
            errors[f"d{d} {name}"] = err = ((got.float() - want).norm() / want.norm()).item()
            assert err < 1e-2, f"{name} at head_dim {d}: relative error {err:.2e}"
    print("relative errors:", errors, flush=True)
    rows = []
    for d, batch, length in SHAPES:
        flops = 4 * batch * 32 * d * length * (length + 1) / 2
        q, k, v, meta = paged_inputs(batch, length, length, 32, 8, d)
        fns = {"triton": lambda: triton_attention.paged_attention(q, k, v, **meta)}
        fns.update({name: (lambda kw=kw: prefill(q, meta["key"], meta["value"], meta["cu_seqlens_q"], length,
                                                  meta["scale"], **kw)) for name, kw in variants.items()})
        row = dict(head_dim=d, batch=batch, length=length)
        row.update({f"{n} TFLOPs": flops / ms / 1e9 if isinstance(ms, float) else ms
                    for n, ms in _round_robin(fns).items()})
        rows.append(row)
        print(row, flush=True)
    gpu = torch.cuda.get_device_name()
    result = dict(date=datetime.date.today().isoformat(), gpu=gpu, ceilings=ceilings(), errors=errors, rows=rows,
                  versions={n: importlib.metadata.version(n) for n in ("torch", "triton")})
    path = os.path.join(args.out, f"gluon-prefill-{gpu.replace(' ', '_')}-{result['date']}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
