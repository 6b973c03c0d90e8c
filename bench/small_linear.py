"""Batch-1 linear layers at the 8B shape's sizes (one GPU and a TP=2 rank): how close cuBLAS comes to the memory's
speed, and whether a Triton GEMV or an L2 prefetch of the weight would bring it closer.

Why: TP=2's batch-1 token spends 0.57x of one GPU's time in matmuls, not 0.5x (bench/RESULTS.md, session 19):
the shards a rank holds are 17-117 MB, and a launch of them runs further from the copy bandwidth than the whole
matrices do. Two candidate fixes are timed here against ``F.linear`` (cuBLAS), each launch in CUDA graphs over 32
(or more) distinct weights so that none is read from L2 unless the case says so:

* ``gemv``: a Triton kernel for up to 8 rows (each program streams ``BLOCK_N`` weight rows once in pipelined
  ``BLOCK_K`` tiles, ``x`` padded to one 16-row ``tl.dot``): a sweep of 54 tile configs at M = 1, the best six
  and a simple rule at M = 8, each checked against an fp32 matmul first.
* ``--prefetch``: a kernel standing for a latency-bound step before the matmul (one program busy-waiting
  ``wait`` us, as a batch-1 all-reduce or attention does) whose other programs issue
  ``cp.async.bulk.prefetch.L2`` for the first fraction of the next weight, then ``F.linear``. Without a prefetch
  the wait adds to the matmul; a prefetch that paid would hide part of the weight's read in it.

    PYTHONPATH=. python bench/small_linear.py [--prefetch] [--out DIR]

Writes ``small-linear-<gpu>-<date>.json`` (or ``small-linear-prefetch-...``). Needs an SM90 GPU for
``--prefetch`` (the bulk prefetch is a Hopper instruction).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# (N, K) of each linear of the 8B shape (fused q/k/v and gate/up), whole and as one of two TP ranks holds it.
SHAPES = {
    "tp1.qkv": (6144, 4096), "tp1.o": (4096, 4096), "tp1.gate_up": (28672, 4096), "tp1.down": (4096, 14336),
    "tp1.lm_head": (128256, 4096),
    "tp2.qkv": (3072, 4096), "tp2.o": (4096, 2048), "tp2.gate_up": (14336, 4096), "tp2.down": (4096, 7168),
    "tp2.lm_head": (64128, 4096),
}
ROTATE_BYTES = 400e6  # distinct weights per graph: past the 50 MB L2


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr):
    offs_m = tl.arange(0, 16)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    acc = tl.zeros([16, BLOCK_N], tl.float32)
    for k in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
        k_ok = offs_k[None, :] < K - k
        x = tl.load(x_ptrs + k, mask=m_ok[:, None] & k_ok, other=0.0)
        w = tl.load(w_ptrs + k, mask=n_ok[:, None] & k_ok, other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def gemv(x: torch.Tensor, w: torch.Tensor, config: tuple) -> torch.Tensor:
    """``x @ w.T`` for ``x`` [M <= 8, K]; ``config`` = (BLOCK_N, BLOCK_K, num_warps, num_stages)."""
    block_n, block_k, warps, stages = config
    (m, k), n = x.shape, w.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, block_n),)](x, w, y, m, n, k, x.stride(0), w.stride(0), y.stride(0),
                                            BLOCK_N=block_n, BLOCK_K=block_k, NUM_STAGES=stages, num_warps=warps)
    return y


def rule(n: int, num_sms: int) -> tuple:
    """The widest BLOCK_N that still gives every SM two programs; 256-key tiles, 4 warps, 4 stages."""
    block_n = 64
    while block_n > 16 and triton.cdiv(n, block_n) < 2 * num_sms:
        block_n //= 2
    return (block_n, 256, 4, 4)


@triton.jit
def _now():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _wait_and_prefetch(w_ptr, sink_ptr, wait_ns, prefetch_bytes, PREFETCH: tl.constexpr, CHUNK: tl.constexpr):
    """Program 0 busy-waits ``wait_ns``; the others issue L2 prefetches of the weight's first ``prefetch_bytes``,
    ``CHUNK`` bytes per instruction, 32 per warp at a time."""
    pid = tl.program_id(0)
    if pid == 0:
        t0 = _now()
        t = t0
        while t - t0 < wait_ns:
            t = _now()
        tl.store(sink_ptr, (t - t0).to(tl.int32))
    elif PREFETCH:
        base = w_ptr.to(tl.pointer_type(tl.int8))
        total = prefetch_bytes // CHUNK
        for start in range((pid - 1) * 32, total, (tl.num_programs(0) - 1) * 32):
            p = base + tl.minimum(start + tl.arange(0, 32), total - 1).to(tl.int64) * CHUNK
            if CHUNK == 16384:
                tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], 16384; mov.u32 $0, 0;",
                                          "=r,l", [p], dtype=tl.int32, is_pure=False, pack=1)
            else:
                tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], 65536; mov.u32 $0, 0;",
                                          "=r,l", [p], dtype=tl.int32, is_pure=False, pack=1)


def per_call_us(fn, weights: list, x: torch.Tensor) -> float:
    """Microseconds per call of ``fn(x, w)`` over ``weights`` in one CUDA graph (median of 5 x 10 replays)."""
    fn(x, weights[0])
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            fn(x, w)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / 10 / len(weights))
    return statistics.median(times)


def copy_bandwidth(device) -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        b.copy_(a)
    end.record()
    end.synchronize()
    return 2 * 10 * a.numel() / (start.elapsed_time(end) / 1e3)


def sweep_gemv(device, num_sms: int) -> dict:
    configs = list(itertools.product((16, 32, 64), (128, 256, 512), (4, 8), (3, 4, 6)))
    out = {}
    for name, (n, k) in SHAPES.items():
        nbytes = n * k * 2
        weights = [torch.randn(n, k, device=device, dtype=torch.bfloat16) / 64
                   for _ in range(max(2, math.ceil(ROTATE_BYTES / nbytes)))]
        entry = out[name] = {"n": n, "k": k, "mb": nbytes / 1e6}
        top = []
        for m in (1, 8):
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            exact = F.linear(x.float(), weights[0].float())
            cublas = per_call_us(lambda x, w: F.linear(x, w), weights, x)
            simple = rule(n, num_sms)
            times = {}
            for c in configs if m == 1 else list(dict.fromkeys([simple, *top])):
                try:
                    y = gemv(x, weights[0], c)
                except triton.runtime.errors.OutOfResources:
                    continue
                if ((y.float() - exact).abs().max() / exact.abs().max()).item() > 2e-2:
                    raise SystemExit(f"gemv {c} wrong at {name} M={m}")
                times[c] = per_call_us(lambda x, w, c=c: gemv(x, w, c), weights, x)
            best = min(times, key=times.get)
            entry[f"m{m}"] = {"cublas_us": cublas, "cublas_tb_s": nbytes / cublas / 1e6, "rule": list(simple),
                              "rule_us": times[simple], "best": list(best), "best_us": times[best],
                              "best_tb_s": nbytes / times[best] / 1e6}
            if m == 1:
                top = sorted(times, key=times.get)[:6]
                entry["m1_all_us"] = {str(list(c)): t for c, t in times.items()}
            print(f"{name:12s} M={m} {nbytes / 1e6:7.1f} MB  cuBLAS {cublas:7.2f} us ({nbytes / cublas / 1e6:.2f} TB/s)"
                  f"  gemv rule {times[simple]:7.2f}  best {times[best]:7.2f} {list(best)}", flush=True)
        del weights
        torch.cuda.empty_cache()
    return out


def prefetch_study(device) -> list:
    sink = torch.zeros(1, dtype=torch.int32, device=device)
    rows = []
    cases = ((0.1, 8, 16384), (0.25, 8, 16384), (0.25, 8, 65536), (0.5, 32, 65536), (1.0, 32, 65536))
    for name in ("tp2.gate_up", "tp2.qkv", "tp2.o", "tp2.down", "tp1.o"):
        n, k = SHAPES[name]
        weights = [torch.randn(n, k, device=device, dtype=torch.bfloat16) for _ in range(32)]
        x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
        for wait_us in (0, 5, 10):
            row = {"shape": name, "wait_us": wait_us}
            for frac, programs, chunk in ((0.0, 0, 16384), *cases):
                nbytes = int(n * k * 2 * frac) // chunk * chunk

                def step(x, w, nbytes=nbytes, programs=programs, chunk=chunk):
                    _wait_and_prefetch[(1 + programs,)](w, sink, wait_us * 1000, nbytes, PREFETCH=nbytes > 0,
                                                        CHUNK=chunk, num_warps=1)
                    return F.linear(x, w)

                key = "none_us" if frac == 0 else f"f{frac}_p{programs}_c{chunk}"
                row[key] = per_call_us(step, weights, x)
            rows.append(row)
            print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
        del weights
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prefetch", action="store_true", help="the L2-prefetch study instead of the GEMV sweep")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    record = {"date": datetime.date.today().isoformat(), "gpu": props.name, "sms": props.multi_processor_count,
              "copy_tb_s": copy_bandwidth(device) / 1e12,
              "versions": {"torch": torch.__version__, "triton": triton.__version__}}
    print(f"{props.name}: copy {record['copy_tb_s']:.2f} TB/s", flush=True)
    if args.prefetch:
        record["prefetch"] = prefetch_study(device)
    else:
        record["shapes"] = sweep_gemv(device, props.multi_processor_count)
    kind = "small-linear-prefetch" if args.prefetch else "small-linear"
    out = Path(args.out) / f"{kind}-{props.name.replace(' ', '_')}-{record['date']}.json"
    out.write_text(json.dumps(record, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
