"""Benchmark of the Triton paged-attention kernels against their rooflines and against SDPA.

* Ceilings, measured in this process: device-to-device copy bandwidth (bytes read + written) and a
  bf16 8192^3 matmul rate, both on random data.
* Decode (one query token per sequence, block size 16, bf16, 32 q / 8 kv heads, head_dim 128 and 64):
  achieved bandwidth = (K/V bytes read + q/out bytes) / time, as a fraction of the copy bandwidth;
  SDPA on contiguous K/V ([B, Hkv, L, D], enable_gqa) for comparison.
* Prefill (all prompt tokens new, causal): TFLOP/s against SDPA's flash backend on contiguous K/V.
  Ours is given the step's K/V beside the pages, as in the engine (read through TMA on SM90+).
* A small sweep of launch configs on a few shapes (what NOTES.md reasons about).
* ``--mixed-step``: a mixed step's attention (decodes beside a prompt, padded as a graph runs it) against
  launches sized for its parts. Writes ``kernels-mixed-step-<gpu>-<date>.json``.
* ``--prefill-order``: causal prefill with the longest query tiles launched first per KV head or across
  heads (and the kernel's choice; the six timed in three rotating rounds, medians), beside FA4 when installed
  and SDPA. Writes ``kernels-prefill-order-...``.
* ``--prompt-kernels``: the Gluon prompt kernel (Hopper, head_dim 128) against the `tl` kernel, fresh prompts
  and chunks after keys in the pages, each checked against the reference. Writes ``kernels-prompt-kernels-...``.
* ``--fa4``: FlashAttention-4 (flash-attn-4, paged) beside ours and SDPA at the shapes of issue 16,
  FA4 on our 16-token blocks and on 128-token pages (its TMA path on SM90), and a prefill config
  sweep of ours. Prefill rows time ours as the plan chooses (``ours_kernel``: the Gluon kernel on Hopper at
  head_dim 128, else tl) and the tl kernel alone (``ours_tl``), round robin with FA4. Writes ``kernels-fa4-<gpu>-<date>.json``.

Times are medians of CUDA-graph replays (device time), plus the eager (Python launch) time of ours.

    PYTHONPATH=. python bench/kernel_bench.py [--out DIR] [--quick] [--fa4] [--mixed-step] [--prefill-order]
        [--prompt-kernels]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import statistics

import torch
import triton
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa

from hf_paged.kernels import fa4_backend, reference, triton_attention
from hf_paged.kernels.triton_attention import Config

MAX_TOKENS = 4 << 20  # skip batch x context above this (16 GiB of paged K/V at head_dim 128)


def bench(fn, rep=100) -> float:
    """Median milliseconds of eager launches (includes host launch overhead when the GPU waits on it)."""
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def bench_graph(fn, rep=50) -> float:
    """Median milliseconds of one call replayed from a CUDA graph: device time without launch gaps.

    Repeated replays keep data that fits in L2 (60 MB) resident, so small shapes are flagged."""
    fn()  # compile outside the capture
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")


L2_BYTES = 60e6


def ceilings() -> dict:
    n = 1 << 30  # 2 GiB of bf16
    x = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    copy_bw = 2 * x.numel() * 2 / ms / 1e9  # TB/s: read + write
    del x, y
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = bench(lambda: a @ b)
    mm = 2 * 8192**3 / ms / 1e9  # TFLOP/s
    return dict(copy_TBps=copy_bw, matmul_bf16_TFLOPs=mm)


def paged_inputs(batch, ctx, q_len, heads, kv_heads, d, block_size=16):
    nb = batch * triton.cdiv(ctx, block_size)
    k = torch.randn(nb, block_size, kv_heads, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    tables = torch.randperm(nb, device="cuda", dtype=torch.int32).view(batch, -1)  # shuffled blocks
    q = torch.randn(batch * q_len, heads, d, device="cuda", dtype=torch.bfloat16)
    meta = dict(cu_seqlens_q=torch.arange(0, batch + 1, device="cuda", dtype=torch.int32) * q_len,
                context_lens=torch.full((batch,), ctx, device="cuda", dtype=torch.int32),
                block_tables=tables, max_seqlen_q=q_len, max_context_len=ctx, scale=d**-0.5)
    if q_len > 1:  # the step's own K/V, passed beside the caches as the engine does (its last q_len keys)
        pos = ctx - q_len + torch.arange(q_len, device="cuda")
        slots = (tables.long()[:, pos // block_size] * block_size + pos % block_size).flatten()
        meta.update(key=k.flatten(0, 1)[slots], value=v.flatten(0, 1)[slots])
    return q, k, v, meta


def run_decode(caps, head_dims, batches, contexts, heads=32, kv_heads=8) -> list[dict]:
    rows = []
    for d in head_dims:
        for batch in batches:
            for ctx in contexts:
                if batch * ctx > MAX_TOKENS:
                    continue
                q, k, v, meta = paged_inputs(batch, ctx, 1, heads, kv_heads, d)
                fn = lambda: triton_attention.paged_attention(q, k, v, **meta)  # noqa: E731
                ms = bench_graph(fn)
                ms_eager = bench(fn)
                kv_bytes = 2 * batch * ctx * kv_heads * d * 2
                nbytes = kv_bytes + 2 * q.numel() * 2
                splits = triton_attention.choose_num_splits(
                    batch * kv_heads, ctx, triton_attention.choose_config(d, heads // kv_heads, 1).block_n,
                    torch.cuda.get_device_properties(0).multi_processor_count, 2.0)
                del k, v
                kc = torch.randn(batch, kv_heads, ctx, d, device="cuda", dtype=torch.bfloat16)
                vc = torch.randn_like(kc)
                qc = q.view(batch, heads, 1, d)
                ms_sdpa = bench_graph(lambda: sdpa(qc, kc, vc, enable_gqa=True))
                del kc, vc
                floor = nbytes / (caps["copy_TBps"] * 1e9)
                row = dict(head_dim=d, batch=batch, context=ctx, splits=splits, ms=ms, ms_eager=ms_eager,
                           ms_sdpa=ms_sdpa, l2_resident=kv_bytes < L2_BYTES,
                           TBps=nbytes / ms / 1e9, frac_copy_bw=floor / ms, floor_ms=floor,
                           sdpa_frac_copy_bw=floor / ms_sdpa, speedup_vs_sdpa=ms_sdpa / ms)
                rows.append(row)
                print(f"decode d={d} b={batch} ctx={ctx}: {ms * 1e3:.1f} us {row['TBps']:.2f} TB/s "
                      f"({100 * row['frac_copy_bw']:.0f}% copy bw, splits {splits}, eager {ms_eager * 1e3:.1f} us); "
                      f"sdpa {ms_sdpa * 1e3:.1f} us",
                      flush=True)
    return rows


def sdpa_prefill(q, k, v):
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return sdpa(q, k, v, is_causal=True, enable_gqa=True)


def run_prefill(caps, head_dims, batches, lengths, heads=32, kv_heads=8) -> list[dict]:
    rows = []
    for d in head_dims:
        for batch in batches:
            for length in lengths:
                q, k, v, meta = paged_inputs(batch, length, length, heads, kv_heads, d)
                fn = lambda: triton_attention.paged_attention(q, k, v, **meta)  # noqa: E731
                ms = bench_graph(fn)
                ms_eager = bench(fn)
                flops = 4 * batch * heads * d * length * (length + 1) / 2
                qc = torch.randn(batch, heads, length, d, device="cuda", dtype=torch.bfloat16)
                kc = torch.randn(batch, kv_heads, length, d, device="cuda", dtype=torch.bfloat16)
                vc = torch.randn_like(kc)
                try:
                    ms_sdpa = bench_graph(lambda: sdpa_prefill(qc, kc, vc))
                    how = "flash+gqa"
                except RuntimeError:  # flash without GQA support: give it expanded K/V
                    ke, ve = kc.repeat_interleave(heads // kv_heads, 1), vc.repeat_interleave(heads // kv_heads, 1)
                    ms_sdpa = bench_graph(lambda: sdpa_prefill(qc, ke, ve))
                    how = "flash (K/V expanded)"
                floor = flops / (caps["matmul_bf16_TFLOPs"] * 1e12) * 1e3
                row = dict(head_dim=d, batch=batch, length=length, ms=ms, ms_eager=ms_eager, ms_sdpa=ms_sdpa, sdpa=how,
                           TFLOPs=flops / ms / 1e9, TFLOPs_sdpa=flops / ms_sdpa / 1e9, floor_ms=floor,
                           frac_matmul=floor / ms, ratio_vs_sdpa=ms_sdpa / ms)
                rows.append(row)
                print(f"prefill d={d} b={batch} L={length}: {ms:.3f} ms {row['TFLOPs']:.0f} TFLOP/s; "
                      f"sdpa({how}) {row['TFLOPs_sdpa']:.0f} TFLOP/s; ratio {row['ratio_vs_sdpa']:.2f}", flush=True)
                del q, k, v, qc, kc, vc
    return rows


def run_sweep(quick: bool) -> list[dict]:
    """Time alternative launch configs on a few shapes, to pick the heuristics' defaults."""
    rows = []
    decode_cfgs = [Config(16, 64, 4, 3), Config(16, 128, 4, 3), Config(16, 128, 2, 3), Config(16, 128, 4, 4),
                   Config(16, 128, 4, 3, split_target=1.0), Config(16, 128, 4, 3, split_target=4.0)]
    prefill_cfgs = [Config(128, 64, 8, 3), Config(128, 64, 4, 3), Config(128, 128, 8, 3), Config(128, 32, 4, 3)]
    if quick:
        decode_cfgs, prefill_cfgs = decode_cfgs[:2], prefill_cfgs[:2]
    for kind, cfgs, shapes in [("decode", decode_cfgs, [(1, 32768, 1, 128), (8, 8192, 1, 64), (32, 8192, 1, 128),
                                                        (256, 2048, 1, 64)]),
                               ("prefill", prefill_cfgs, [(1, 8192, 8192, 128), (8, 2048, 2048, 64)])]:
        for batch, ctx, q_len, d in shapes:
            q, k, v, meta = paged_inputs(batch, ctx, q_len, 32, 8, d)
            for cfg in cfgs:
                try:
                    ms = bench_graph(lambda: triton_attention.paged_attention(q, k, v, **meta, config=cfg))
                except Exception as exc:  # e.g. out of shared memory for a big tile
                    ms = float("nan")
                    print(f"  {cfg}: {type(exc).__name__}", flush=True)
                rows.append(dict(kind=kind, batch=batch, context=ctx, head_dim=d, config=repr(cfg), ms=ms))
                print(f"sweep {kind} b={batch} ctx={ctx} d={d} {cfg}: {ms * 1e3:.1f} us", flush=True)
            del q, k, v
    return rows


TUNE_SHAPES = "1x32768x64,8x8192x64,32x2048x64,32x8192x64,32x32768x64,1x32768x128"


def run_tune(shapes: str, caps: dict, save=lambda rows: None, configs: str | None = None) -> list[dict]:
    """Decode tile configs (key tile, warps, stages, splits) at ``shapes`` ("BxCTXxD,..."), each config
    first checked against the reference at each head_dim; prints the best per shape beside the heuristic's
    choice and calls ``save`` with the rows so far after each shape (a run cut short keeps its finished shapes).
    ``configs`` ("BLOCK_NxWARPSxSTAGES,...") replaces the default set. Splits are tried only where the
    heuristic may split (fewer programs than SMs)."""
    import itertools

    from hf_paged.kernels import reference

    if configs:
        cfgs = [Config(16, *(int(x) for x in c.split("x"))) for c in configs.split(",")]
    else:
        # The page-table load is a pipeline stage of its own, so the key tiles in flight are (num_stages - 1) // 2:
        # stages 3, 5, 7 hold 1, 2, 3 K/V tiles (2 and 4 compile as 3 and 5 do; seen in the sm90 TTGIR). 8 warps
        # were never the best in the sweeps of sessions 16-19.
        cfgs = [Config(16, n, w, st) for n, w, st in itertools.product((64, 128, 256), (2, 4), (3, 5, 7))]
    checked = {}  # head_dim -> the configs that fit in shared memory and match the reference
    rows = []
    for shape in shapes.split(","):
        batch, ctx, d = (int(x) for x in shape.split("x"))
        if d not in checked:
            q, k, v, meta = paged_inputs(3, 3000, 1, 32, 8, d)
            want = reference.paged_attention(q.float(), k.float(), v.float(), **meta)
            checked[d] = []
            for cfg in cfgs:
                try:
                    got = triton_attention.paged_attention(q, k, v, **meta, config=cfg)
                except triton.runtime.errors.OutOfResources:  # e.g. three 256-key tiles of shared memory
                    continue
                err = ((got.float() - want).norm() / want.norm()).item()
                assert err < 1e-2, f"{cfg} at head_dim {d}: rel_err {err:.2e}"
                checked[d].append(cfg)
            print(f"tune d={d}: {len(checked[d])} of {len(cfgs)} configs fit and match the reference", flush=True)
        q, k, v, meta = paged_inputs(batch, ctx, 1, 32, 8, d)
        floor = 2 * batch * ctx * 8 * d * 2 / (caps["copy_TBps"] * 1e9)
        base = bench_graph(lambda: triton_attention.paged_attention(q, k, v, **meta))
        best = None
        may_split = batch * 8 < torch.cuda.get_device_properties(0).multi_processor_count
        for cfg in checked[d]:
            for splits in (1, 2, 4) if may_split else (1,):
                ms = bench_graph(lambda: triton_attention.paged_attention(q, k, v, **meta, config=cfg,
                                                                          num_splits=splits))
                row = dict(kind="decode-tune", batch=batch, context=ctx, head_dim=d, config=repr(cfg),
                           num_splits=splits, ms=ms, frac_copy_bw=floor / ms)
                rows.append(row)
                best = row if best is None or ms < best["ms"] else best
        rows.append(dict(kind="decode-heuristic", batch=batch, context=ctx, head_dim=d, ms=base,
                         frac_copy_bw=floor / base))
        print(f"tune b={batch} ctx={ctx} d={d}: heuristic {base * 1e3:.1f} us ({100 * floor / base:.0f}% copy bw)"
              + (f"; best {best['config']} splits {best['num_splits']} {best['ms'] * 1e3:.1f} us "
                 f"({100 * best['frac_copy_bw']:.0f}%)" if best else "; no config fits"), flush=True)
        del q, k, v
        save(rows)
    return rows


FA4_DECODE = [(128, 32, 2048), (128, 1, 32768), (64, 32, 2048), (128, 256, 2048), (64, 1, 32768)]  # (D, B, ctx)
FA4_PREFILL = [(128, 1, 2048), (128, 1, 4096), (128, 1, 8192), (64, 8, 2048), (64, 1, 2048), (64, 1, 8192),
               (128, 8, 512)]  # (D, B, L)


def _timed(fn) -> float | str:
    """Graph-replay median ms, or the error's first line (an FA4 path may refuse a layout)."""
    try:
        return bench_graph(fn)
    except Exception as exc:  # noqa: BLE001  reported in the table instead
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"


def _round_robin(fns: dict, rounds: int = 3) -> dict:
    """`_timed` of each of ``fns`` in turn, ``rounds`` times over, each round starting one variant later; the
    median per name (or its error). Timed back to back, one variant after another, a later one ran 2-8% slower
    than the same kernel timed first (clocks under sustained load, bench/RESULTS.md session 18)."""
    names = list(fns)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(_timed(fns[name]))
    return {name: statistics.median(ms) if all(isinstance(t, float) for t in ms) else next(
        t for t in ms if isinstance(t, str)) for name, ms in times.items()}


def _sdpa_prefill_ms(batch: int, length: int, d: int) -> float | str:
    """SDPA's flash backend, causal, on contiguous K/V of 32 q / 8 kv heads (`_timed`)."""
    qc = torch.randn(batch, 32, length, d, device="cuda", dtype=torch.bfloat16)
    kc = torch.randn(batch, 8, length, d, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    return _timed(lambda: sdpa_prefill(qc, kc, vc))


def _fa4_error(q, k, v, meta) -> float:
    want = reference.paged_attention(q.float(), k.float(), v.float(), **meta)
    got = fa4_backend.flash_attention(q, k, v, **{n: meta[n] for n in FA4_META})
    return ((got.float() - want).norm() / want.norm()).item()


FA4_META = ("cu_seqlens_q", "context_lens", "block_tables", "scale", "max_seqlen_q")


def _prompt_kernel(fn) -> str:
    """Which kernel ``fn``'s prompt attention ran on: "gluon" (`gluon_prefill`, Hopper) or "tl"."""
    gluon = triton_attention._gluon_prefill(torch.device("cuda"))
    if gluon is None:
        return "tl"
    calls, run = [], gluon.prefill
    gluon.prefill = lambda *args: calls.append(1) or run(*args)
    try:
        fn()
    finally:
        gluon.prefill = run
    return "gluon" if calls else "tl"


def run_fa4(caps) -> dict:
    """Ours vs FA4 (16-token blocks as ours, and 128-token pages) vs SDPA at issue 16's shapes."""
    torch.manual_seed(0)
    errors = {}  # correctness first, at both page sizes
    for page in (16, 128):
        q, k, v, meta = paged_inputs(3, 1000, 300, 32, 8, 128, block_size=page)
        errors[f"page{page}"] = _fa4_error(q, k, v, meta)
    print(f"fa4 rel. error vs reference (prefill 3x300 over 1000 keys): {errors}", flush=True)
    decode, prefill = [], []
    for d, batch, ctx in FA4_DECODE:
        row = dict(head_dim=d, batch=batch, context=ctx)
        nbytes = 2 * batch * ctx * 8 * d * 2 + 2 * batch * 32 * d * 2
        floor = nbytes / (caps["copy_TBps"] * 1e9)
        for page in (16, 128):
            q, k, v, meta = paged_inputs(batch, ctx, 1, 32, 8, d, block_size=page)
            fa = {n: meta[n] for n in FA4_META}
            if page == 16:
                row["ours"] = _timed(lambda: triton_attention.paged_attention(q, k, v, **meta))
            row[f"fa4_page{page}"] = _timed(lambda: fa4_backend.flash_attention(q, k, v, **fa))
            row[f"fa4_page{page}_split"] = _timed(lambda: fa4_backend.flash_attention(q, k, v, **fa, num_splits=0))
            del q, k, v
        kc = torch.randn(batch, 8, ctx, d, device="cuda", dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        qc = torch.randn(batch, 32, 1, d, device="cuda", dtype=torch.bfloat16)
        row["sdpa"] = _timed(lambda: sdpa(qc, kc, vc, enable_gqa=True))
        del kc, vc
        row["floor_ms"] = floor
        row.update({f"{n}_frac_copy_bw": floor / row[n] for n in list(row) if isinstance(row.get(n), float)
                    and n not in ("floor_ms",)})
        decode.append(row)
        print("fa4 decode", row, flush=True)
    for d, batch, length in FA4_PREFILL:
        row = dict(head_dim=d, batch=batch, length=length)
        flops = 4 * batch * 32 * d * length * (length + 1) / 2
        q, k, v, meta = paged_inputs(batch, length, length, 32, 8, d)
        q2, k2, v2, meta2 = paged_inputs(batch, length, length, 32, 8, d, block_size=128)
        pages = {n: x for n, x in meta.items() if n not in ("key", "value")}
        tl_cfg = triton_attention.choose_config(d, 4, length, step_kv=True)
        row["ours_kernel"] = _prompt_kernel(lambda: triton_attention.paged_attention(q, k, v, **meta))
        row.update(_round_robin({
            "ours": lambda: triton_attention.paged_attention(q, k, v, **meta),
            "ours_tl": lambda: triton_attention.paged_attention(q, k, v, **meta, config=tl_cfg),
            "ours_pages_only": lambda: triton_attention.paged_attention(q, k, v, **pages),
            "fa4_page16": lambda: fa4_backend.flash_attention(q, k, v, **{n: meta[n] for n in FA4_META}),
            "fa4_page128": lambda: fa4_backend.flash_attention(q2, k2, v2, **{n: meta2[n] for n in FA4_META})}))
        del q, k, v, q2, k2, v2
        row["sdpa"] = _sdpa_prefill_ms(batch, length, d)
        row.update({f"{n}_TFLOPs": flops / row[n] / 1e9 for n in list(row) if isinstance(row.get(n), float)})
        for n in ("ours", "ours_tl"):
            if isinstance(row.get(n), float) and isinstance(row.get("fa4_page128"), float):
                row[f"{n}_over_fa4"] = row["fa4_page128"] / row[n]
        prefill.append(row)
        print("fa4 prefill", row, flush=True)
    return dict(errors=errors, decode=decode, prefill=prefill)


def run_prefill_tune(caps, shapes=((128, 1, 2048), (128, 1, 8192), (64, 8, 2048))) -> list[dict]:
    """Our prefill over tile configs (each checked against the reference first) at ``shapes`` (D, B, L), beside
    FA4 on 128-token pages when it is installed (same process)."""
    import itertools

    fa4 = fa4_backend.why_unavailable(torch.device("cuda"), torch.bfloat16) is None
    cfgs = [Config(m, n, w, st) for m, n, w, st in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4))]
    rows, ok = [], []
    for d in sorted({d for d, _, _ in shapes}):
        q, k, v, meta = paged_inputs(2, 700, 700, 32, 8, d)
        want = reference.paged_attention(q.float(), k.float(), v.float(), **meta)
        for cfg in cfgs:
            try:
                got = triton_attention.paged_attention(q, k, v, **meta, config=cfg)
                err = ((got.float() - want).norm() / want.norm()).item()
            except Exception as exc:  # noqa: BLE001  out of shared memory for a big tile
                err = float("nan")
                print(f"  d={d} {cfg}: {type(exc).__name__}", flush=True)
            if err < 1e-2:
                ok.append((d, cfg))
    for d, batch, length in shapes:
        q, k, v, meta = paged_inputs(batch, length, length, 32, 8, d)
        flops = 4 * batch * 32 * d * length * (length + 1) / 2
        base = bench_graph(lambda: triton_attention.paged_attention(q, k, v, **meta))
        best = None
        for dd, cfg in ok:
            if dd != d:
                continue
            ms = _timed(lambda: triton_attention.paged_attention(q, k, v, **meta, config=cfg))
            if isinstance(ms, float):
                rows.append(dict(kind="prefill-tune", head_dim=d, batch=batch, length=length, config=repr(cfg), ms=ms,
                                 TFLOPs=flops / ms / 1e9))
                print(f"  d={d} b={batch} L={length} {cfg}: {flops / ms / 1e9:.0f} TFLOP/s", flush=True)  # a run cut short keeps these
                best = rows[-1] if best is None or ms < best["ms"] else best
        rows.append(dict(kind="prefill-heuristic", head_dim=d, batch=batch, length=length, ms=base,
                         TFLOPs=flops / base / 1e9))
        del q, k, v
        fa4_note = ""
        if fa4:
            q, k, v, meta = paged_inputs(batch, length, length, 32, 8, d, block_size=128)
            ms = _timed(lambda: fa4_backend.flash_attention(q, k, v, **{n: meta[n] for n in FA4_META}))
            del q, k, v
            if isinstance(ms, float):
                rows.append(dict(kind="prefill-fa4-page128", head_dim=d, batch=batch, length=length, ms=ms,
                                 TFLOPs=flops / ms / 1e9))
                fa4_note = f"; FA4 {flops / ms / 1e9:.0f} TFLOP/s (heuristic {ms / base:.2f}x of it)"
        print(f"prefill tune d={d} b={batch} L={length}: heuristic {flops / base / 1e9:.0f} TFLOP/s, best "
              f"{best and best['config']} {best and best['TFLOPs']:.0f} TFLOP/s{fa4_note}", flush=True)
    return rows


def run_graph_decode(caps, plan_context: int = 32768) -> list[dict]:
    """Batch-1 decode as a CUDA graph launches it: planned for the graph's context (``max_context_len``), so
    the split count follows that bound, not the sequence's actual length. Each split count is timed at
    short and long actual contexts, for the 8B shape on one GPU (32 / 8 heads) and per rank under TP=2
    (16 / 4); "auto" is the heuristic's count for the plan."""
    rows = []
    for heads, kv_heads in ((32, 8), (16, 4)):
        for ctx in (256, 2048, plan_context):
            q, k, v, meta = paged_inputs(1, ctx, 1, heads, kv_heads, 128)
            meta["max_context_len"] = plan_context
            floor = 2 * ctx * kv_heads * 128 * 2 / (caps["copy_TBps"] * 1e9)
            for splits in (None, 1, 4, 8, 16, 32, 64):
                ms = bench_graph(lambda: triton_attention.paged_attention(q, k, v, **meta, num_splits=splits))
                rows.append(dict(kind="graph-decode", heads=heads, kv_heads=kv_heads, context=ctx,
                                 plan_context=plan_context, num_splits=splits or "auto", us=ms * 1e3,
                                 frac_copy_bw=floor / ms))
                print(f"graph decode {heads}/{kv_heads} heads ctx {ctx:>6} (plan {plan_context}) splits "
                      f"{splits or 'auto':>4}: {ms * 1e3:7.1f} us ({100 * floor / ms:.0f}% copy bw)", flush=True)
            del q, k, v
    return rows


def run_prefill_order(caps, shapes=FA4_PREFILL + [(128, 1, 4096), (64, 1, 2048)]) -> list[dict]:
    """Causal prefill with its longest query tiles launched first, ordered per KV head or across heads
    (``Config.across_heads``; "auto" is the kernel's rule), the step's K/V beside the pages as in the engine
    and from the pages alone; FA4 on 128-token pages when it is installed, and SDPA's flash backend."""
    import dataclasses

    fa4 = fa4_backend.why_unavailable(torch.device("cuda"), torch.bfloat16) is None
    rows = []
    for d, batch, length in shapes:
        flops = 4 * batch * 32 * d * length * (length + 1) / 2
        q, k, v, meta = paged_inputs(batch, length, length, 32, 8, d)
        pages = {n: x for n, x in meta.items() if n not in ("key", "value")}
        row = dict(kind="prefill-order", head_dim=d, batch=batch, length=length)
        variants = {}
        for source, kwargs, step_kv in (("step_kv", meta, True), ("pages", pages, False)):
            heuristic = triton_attention.choose_config(max(16, triton.next_power_of_2(d)), 4, length, step_kv)
            for order, across in (("auto", None), ("per_head", False), ("across_heads", True)):
                cfg = dataclasses.replace(heuristic, across_heads=across)
                variants[f"{source}_{order}_ms"] = (
                    lambda kwargs=kwargs, cfg=cfg: triton_attention.paged_attention(q, k, v, **kwargs, config=cfg))
        row.update(_round_robin(variants))
        del q, k, v
        if fa4:
            q, k, v, meta = paged_inputs(batch, length, length, 32, 8, d, block_size=128)
            row["fa4_page128_ms"] = _timed(lambda: fa4_backend.flash_attention(q, k, v, **{n: meta[n] for n in FA4_META}))
            del q, k, v
        row["sdpa_ms"] = _sdpa_prefill_ms(batch, length, d)
        row.update({n.replace("_ms", "_TFLOPs"): flops / row[n] / 1e9 for n in list(row)
                    if n.endswith("_ms") and isinstance(row[n], float)})
        if isinstance(row.get("fa4_page128_ms"), float) and isinstance(row["step_kv_auto_ms"], float):
            row["ours_over_fa4"] = row["fa4_page128_ms"] / row["step_kv_auto_ms"]
        rows.append(row)
        print(f"prefill order d={d} b={batch} L={length} (TFLOP/s): " + ", ".join(
            f"{n[:-7]} {x:.0f}" for n, x in row.items() if n.endswith("_TFLOPs")), flush=True)
    return rows


PROMPT_KERNEL_SHAPES = [(1, 512, 512), (1, 1024, 1024), (1, 2048, 2048), (1, 4096, 4096), (1, 8192, 8192),
                        (8, 512, 512), (8, 2048, 2048), (4, 1024, 3072)]  # (B, new tokens, keys), d128


def run_prompt_kernels(caps, shapes=PROMPT_KERNEL_SHAPES) -> list[dict]:
    """The Gluon prompt kernel (Hopper) against the `tl` kernel (its heuristic tiles) at d128, round robin; every
    length is given to Gluon here (what sets `GLUON_MAX_SEQLEN_Q`). Keys past the new tokens' come from the pages."""
    if triton_attention._gluon_prefill(torch.device("cuda")) is None:
        raise SystemExit("the Gluon prompt kernel needs Hopper and Triton " +
                         " / ".join(triton_attention.GLUON_TRITON_VERSIONS))
    limit, triton_attention.GLUON_MAX_SEQLEN_Q = triton_attention.GLUON_MAX_SEQLEN_Q, 1 << 30
    rows = []
    try:
        for batch, length, ctx in shapes:
            flops = 4 * batch * 32 * 128 * length * (ctx - length + (length + 1) / 2)
            q, k, v, meta = paged_inputs(batch, ctx, length, 32, 8, 128)
            tl_cfg = triton_attention.choose_config(128, 4, length, step_kv=True)
            fns = {"gluon": lambda: triton_attention.paged_attention(q, k, v, **meta),
                   "tl": lambda: triton_attention.paged_attention(q, k, v, **meta, config=tl_cfg)}
            assert _prompt_kernel(fns["gluon"]) == "gluon"
            want = reference.paged_attention(q.float(), k.float(), v.float(), **meta)
            row = dict(kind="prompt-kernels", head_dim=128, batch=batch, new_tokens=length, keys=ctx,
                       **{f"{n}_rel_err": ((fn().float() - want).norm() / want.norm()).item() for n, fn in fns.items()})
            row.update({f"{n}_ms": ms for n, ms in _round_robin(fns).items()})
            row.update({n.replace("_ms", "_TFLOPs"): flops / row[n] / 1e9 for n in ("gluon_ms", "tl_ms")
                        if isinstance(row[n], float)})
            rows.append(row)
            print(f"prompt kernels b={batch} new={length} keys={ctx} (TFLOP/s): gluon {row.get('gluon_TFLOPs', 0):.0f}, "
                  f"tl {row.get('tl_TFLOPs', 0):.0f}", flush=True)
            del q, k, v, want
    finally:
        triton_attention.GLUON_MAX_SEQLEN_Q = limit
        triton_attention._plans.clear()  # plans made under the raised limit would outlive it
    return rows


def run_decode_order(caps, shapes=((64, 32, 2048), (64, 128, 2048), (64, 256, 2048), (64, 32, 8192),
                                   (128, 32, 2048), (128, 128, 2048), (128, 256, 2048), (128, 32, 8192))) -> list[dict]:
    """Decode launched one KV head across sequences (``across_heads=False``) or with a sequence's KV heads
    together (``True``, the kernel's rule since session 19), and the heuristic's own launch; one compiled
    kernel (the order is a runtime flag), each checked against the reference at the first shape."""
    import dataclasses

    rows = []
    for i, (d, batch, ctx) in enumerate(shapes):
        q, k, v, meta = paged_inputs(batch, ctx, 1, 32, 8, d)
        base = triton_attention.choose_config(max(16, triton.next_power_of_2(d)), 4, 1)
        variants = {f"{name}_ms": (lambda cfg=dataclasses.replace(base, across_heads=flag):
                                   triton_attention.paged_attention(q, k, v, **meta, config=cfg))
                    for name, flag in (("per_head", False), ("across_heads", True))}
        variants["heuristic_ms"] = lambda: triton_attention.paged_attention(q, k, v, **meta)
        if i == 0:  # every variant against the reference once
            want = reference.paged_attention(q.float(), k.float(), v.float(), **meta)
            for name, fn in variants.items():
                err = ((fn().float() - want).norm() / want.norm()).item()
                assert err < 1e-2, f"{name}: rel_err {err:.2e}"
        floor = (2 * batch * ctx * 8 * d * 2 + 2 * q.numel() * 2) / (caps["copy_TBps"] * 1e9)
        row = dict(kind="decode-order", head_dim=d, batch=batch, context=ctx, **_round_robin(variants))
        row.update({n.replace("_ms", "_frac_copy_bw"): floor / row[n] for n in list(row)
                    if n.endswith("_ms") and isinstance(row[n], float)})
        rows.append(row)
        print(f"decode order d={d} b={batch} ctx={ctx} (us): " + ", ".join(
            f"{n[:-3]} {x * 1e3:.1f}" for n, x in row.items() if n.endswith("_ms") and isinstance(x, float)), flush=True)
        del q, k, v
    return rows


MIXED_STEPS = ((511, 520, 2048), (500, 200, 1024), (256, 2000, 4096))  # decodes, prompt tokens, graph bucket


def mixed_step_inputs(n_dec: int, prompt: int, bucket: int, heads=32, kv_heads=8, d=64, block_size=16,
                      max_seqs=512, max_context=4096, device="cuda"):
    """A graph of a mixed step as `MixedGraphs` pads it: ``n_dec`` decodes over 100-1,300 cached keys, then one
    new prompt; ``max_seqs`` sequence slots, ``bucket`` token rows (padding owned by no sequence), block tables of
    ``max_context`` keys. Returns q, the caches, the static-grid arguments, the step's own K/V and the keys read."""
    g = torch.Generator().manual_seed(0)
    ctxs = torch.cat([torch.randint(100, 1300, (n_dec,), generator=g), torch.tensor([prompt])])
    q_lens = torch.cat([torch.ones(n_dec, dtype=torch.long), torch.tensor([prompt])])
    blocks = (ctxs + block_size - 1) // block_size
    k = torch.randn(int(blocks.sum()), block_size, kv_heads, d, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    perm = torch.randperm(k.shape[0], device=device, dtype=torch.int32)
    tables = torch.zeros(max_seqs, max_context // block_size, dtype=torch.int32, device=device)
    starts = torch.cumsum(blocks, 0) - blocks
    for i, (start, n) in enumerate(zip(starts.tolist(), blocks.tolist())):
        tables[i, :n] = perm[start:start + n]
    num_seqs, total = n_dec + 1, int(q_lens.sum())
    cu = torch.full((max_seqs + 1,), total, dtype=torch.int32, device=device)
    cu[0] = 0
    cu[1:num_seqs + 1] = torch.cumsum(q_lens, 0).to(device)
    context_lens = torch.zeros(max_seqs, dtype=torch.int32, device=device)
    context_lens[:num_seqs] = ctxs.to(device)
    q = torch.randn(bucket, heads, d, device=device, dtype=torch.bfloat16)
    pos = torch.cat([torch.arange(c - n, c) for c, n in zip(ctxs.tolist(), q_lens.tolist())]).to(device)
    seq_of = torch.repeat_interleave(torch.arange(num_seqs, device=device), q_lens.to(device))
    slots = tables[seq_of, pos // block_size].long() * block_size + pos % block_size
    key = torch.zeros(bucket, kv_heads, d, device=device, dtype=torch.bfloat16)
    value = torch.zeros_like(key)
    key[:total], value[:total] = k.flatten(0, 1)[slots], v.flatten(0, 1)[slots]
    meta = dict(cu_seqlens_q=cu, context_lens=context_lens, block_tables=tables, scale=d**-0.5)
    return q, k, v, meta, key, value, int(ctxs.sum())


def run_mixed_step(caps) -> list[dict]:
    """A mixed step's attention as its graph launches it (static grid over the padded step) against the same
    step as two launches sized for its parts (the decodes; the prompt) and the decodes alone."""
    rows = []
    for n_dec, prompt, bucket in MIXED_STEPS:
        q, k, v, meta, key, value, keys = mixed_step_inputs(n_dec, prompt, bucket)
        cu, ctx, bt = meta["cu_seqlens_q"], meta["context_lens"], meta["block_tables"]
        max_context = bt.shape[1] * k.shape[1]  # the graph's bound: table width x block size
        decodes = dict(cu_seqlens_q=cu[:n_dec + 1], context_lens=ctx[:n_dec], block_tables=bt[:n_dec],
                       scale=meta["scale"], max_seqlen_q=1, max_context_len=max_context)
        prompt_meta = dict(cu_seqlens_q=cu[n_dec:n_dec + 2] - n_dec, context_lens=ctx[n_dec:n_dec + 1],
                           block_tables=bt[n_dec:n_dec + 1], scale=meta["scale"], max_seqlen_q=prompt,
                           max_context_len=max_context, key=key[n_dec:n_dec + prompt],
                           value=value[n_dec:n_dec + prompt])
        static = lambda: triton_attention.paged_attention(  # noqa: E731
            q, k, v, **meta, max_seqlen_q=bucket, max_context_len=max_context, static_grid=True, key=key,
            value=value)
        parts = lambda: (triton_attention.paged_attention(q[:n_dec], k, v, **decodes),  # noqa: E731
                         triton_attention.paged_attention(q[n_dec:n_dec + prompt], k, v, **prompt_meta))
        want = torch.cat(parts())
        assert (static()[:n_dec + prompt] - want).abs().max().item() < 1e-2
        floor = 2 * keys * k.shape[2] * k.shape[3] * 2 / (caps["copy_TBps"] * 1e9)
        row = dict(decodes=n_dec, prompt=prompt, bucket=bucket, ms_static=bench_graph(static),
                   ms_parts=bench_graph(parts),
                   ms_decodes_only=bench_graph(lambda: triton_attention.paged_attention(q[:n_dec], k, v, **decodes)),
                   kv_floor_ms=floor)
        rows.append(row)
        print(f"mixed step {n_dec} decodes + {prompt}-token prompt (bucket {bucket}): static grid "
              f"{row['ms_static'] * 1e3:.1f} us, two launches sized for the parts {row['ms_parts'] * 1e3:.1f} us, "
              f"decodes alone {row['ms_decodes_only'] * 1e3:.1f} us, K/V at copy bandwidth {floor * 1e3:.1f} us",
              flush=True)
    return rows


def markdown(env, caps, decode, prefill, sweep) -> str:
    lines = [f"# Kernel benchmark ({env['gpu']}, {env['date']})", "",
             f"torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}. "
             f"Copy bandwidth {caps['copy_TBps']:.2f} TB/s (read+write), bf16 matmul "
             f"{caps['matmul_bf16_TFLOPs']:.0f} TFLOP/s, both measured in the same process. Times are medians of "
             "CUDA-graph replays (device time; `do_bench_cudagraph`) for triton and SDPA alike; 'eager' is the "
             "triton call launched from Python (`do_bench`), which adds host launch overhead when the GPU "
             "outruns it. Rows marked * have K/V smaller than L2 (60 MB): graph replays hit L2 there.", "",
             "## Decode (q_len 1, 32 q / 8 kv heads, block 16, bf16)", "",
             "| head_dim | batch | context | splits | triton us | eager us | TB/s | % copy bw | floor us | sdpa us | sdpa % bw | speedup vs sdpa |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in decode:
        star = "*" if r["l2_resident"] else ""
        lines.append(f"| {r['head_dim']} | {r['batch']} | {r['context']}{star} | {r['splits']} | {r['ms'] * 1e3:.1f} | "
                     f"{r['ms_eager'] * 1e3:.1f} | "
                     f"{r['TBps']:.2f} | {100 * r['frac_copy_bw']:.0f}% | {r['floor_ms'] * 1e3:.1f} | "
                     f"{r['ms_sdpa'] * 1e3:.1f} | {100 * r['sdpa_frac_copy_bw']:.0f}% | {r['speedup_vs_sdpa']:.2f}x |")
    lines += ["", "## Prefill (causal, all tokens new, 32 q / 8 kv heads, block 16, bf16)", "",
              "| head_dim | batch | length | triton ms | eager ms | TFLOP/s | floor ms | % matmul | sdpa TFLOP/s | triton/sdpa speed |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in prefill:
        lines.append(f"| {r['head_dim']} | {r['batch']} | {r['length']} | {r['ms']:.3f} | {r['ms_eager']:.3f} | "
                     f"{r['TFLOPs']:.0f} | "
                     f"{r['floor_ms']:.3f} | {100 * r['frac_matmul']:.0f}% | {r['TFLOPs_sdpa']:.0f} ({r['sdpa']}) | "
                     f"{r['ratio_vs_sdpa']:.2f}x |")
    if sweep:
        lines += ["", "## Config sweep", "", "| kind | batch | context | head_dim | config | us |", "|---|---|---|---|---|---|"]
        for r in sweep:
            lines.append(f"| {r['kind']} | {r['batch']} | {r['context']} | {r['head_dim']} | `{r['config']}` | "
                         f"{r['ms'] * 1e3:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--quick", action="store_true", help="a few shapes only")
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--tune", action="store_true", help="only the decode config sweep")
    parser.add_argument("--tune-shapes", default=TUNE_SHAPES, help="decode shapes BATCHxCONTEXTxHEAD_DIM, comma-separated")
    parser.add_argument("--tune-configs", default=None, help="with --tune: decode configs BLOCK_NxWARPSxSTAGES, "
                        "comma-separated (default: key tiles 64-256, 2-4 warps, 1-3 tiles in flight)")
    parser.add_argument("--fa4", action="store_true", help="only FA4 vs ours vs SDPA at issue 16's shapes, "
                        "and a prefill config sweep of ours")
    parser.add_argument("--no-fa4-table", action="store_true", help="with --fa4: the prefill sweep only")
    parser.add_argument("--no-prefill-tune", action="store_true", help="with --fa4: the table only")
    parser.add_argument("--prefill-tune", default=None, metavar="DxBxL,...",
                        help="only the prefill config sweep at these shapes (beside FA4 when installed), e.g. 128x1x2048")
    parser.add_argument("--graph-decode", action="store_true", help="only batch-1 decode planned for a graph's "
                        "context, by split count")
    parser.add_argument("--prefill-order", action="store_true", help="only causal prefill by launch order "
                        "(per KV head, across heads, the rule's), beside FA4 (when installed) and SDPA")
    parser.add_argument("--decode-order", action="store_true", help="only decode by launch order (one KV head "
                        "across sequences, a sequence's KV heads together, the rule's)")
    parser.add_argument("--prompt-kernels", action="store_true", help="only the Gluon prompt kernel vs the tl "
                        "kernel at d128 (Hopper)")
    parser.add_argument("--mixed-step", action="store_true", help="only a mixed step's attention as its graph "
                        "launches it vs launches sized for its decodes and its prompt")
    args = parser.parse_args()
    import transformers

    if args.tune:
        caps = ceilings()
        os.makedirs(args.out, exist_ok=True)

        def save(rows):
            with open(os.path.join(args.out, "decode-tune.json"), "w") as f:
                json.dump(dict(gpu=torch.cuda.get_device_name(), triton=triton.__version__, ceilings=caps, rows=rows),
                          f, indent=1)

        run_tune(args.tune_shapes, caps, save, args.tune_configs)
        return

    env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               transformers=transformers.__version__, python=platform.python_version(),
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    print(env, flush=True)
    caps = ceilings()
    print(caps, flush=True)
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        env["flash_attn_4"] = importlib.metadata.version("flash-attn-4")
    only = None  # one sweep alone: (file name, rows)
    if args.mixed_step:
        only = ("mixed-step", run_mixed_step(caps))
    elif args.prefill_tune:
        shapes = [tuple(int(x) for x in shape.split("x")) for shape in args.prefill_tune.split(",")]
        only = ("prefill-tune", run_prefill_tune(caps, shapes))
    elif args.graph_decode:
        only = ("graph-decode", run_graph_decode(caps))
    elif args.prefill_order:
        only = ("prefill-order", run_prefill_order(caps))
    elif args.decode_order:
        only = ("decode-order", run_decode_order(caps))
    elif args.prompt_kernels:
        only = ("prompt-kernels", run_prompt_kernels(caps))
    if only:
        path = os.path.join(args.out, f"kernels-{only[0]}-{env['gpu'].replace(' ', '_')}-{env['date'][:10]}.json")
        os.makedirs(args.out, exist_ok=True)
        with open(path, "w") as f:  # opened once the rows exist: a run cut short leaves no empty file
            json.dump(dict(env=env, ceilings=caps, rows=only[1]), f, indent=1)
        print(f"wrote {path}", flush=True)
        return
    if args.fa4:
        why = fa4_backend.why_unavailable(torch.device("cuda"), torch.bfloat16)
        if why:
            raise SystemExit(why)
        env["flash_attn_4"] = importlib.metadata.version("flash-attn-4")
        kind = "prefill-tune" if args.no_fa4_table else "fa4"
        path = os.path.join(args.out, f"kernels-{kind}-{env['gpu'].replace(' ', '_')}-{env['date'][:10]}.json")
        os.makedirs(args.out, exist_ok=True)
        result = dict(env=env, ceilings=caps, **({} if args.no_fa4_table else run_fa4(caps)))
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        if not args.no_prefill_tune:
            result["prefill_tune"] = run_prefill_tune(caps)
            with open(path, "w") as f:
                json.dump(result, f, indent=1)
        print(f"wrote {path}", flush=True)
        return
    if args.quick:
        decode = run_decode(caps, [128], [1, 32], [2048, 32768])
        prefill = run_prefill(caps, [128], [1], [2048])
    else:
        decode = run_decode(caps, [128, 64], [1, 8, 32, 128, 256], [512, 2048, 8192, 32768])
        prefill = run_prefill(caps, [128, 64], [1, 8], [512, 2048, 8192])
    os.makedirs(args.out, exist_ok=True)
    stamp = env["date"][:10]

    def save(sweep):  # written before and after the sweep, so a cut-short run keeps the main tables
        with open(os.path.join(args.out, f"kernels-{stamp}.json"), "w") as f:
            json.dump(dict(env=env, ceilings=caps, decode=decode, prefill=prefill, sweep=sweep), f, indent=1)
        table = markdown(env, caps, decode, prefill, sweep)
        with open(os.path.join(args.out, f"kernels-{stamp}.md"), "w") as f:
            f.write(table)
        return table

    save([])
    print(save([] if args.no_sweep else run_sweep(args.quick)), flush=True)


if __name__ == "__main__":
    main()
