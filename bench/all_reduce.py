"""Tensor parallel's all-reduce: NCCL vs symmetric memory's one-shot and two-shot kernels (`hf_paged.tp_all_reduce`),
inside CUDA graphs.

Run on every GPU of one host::

    torchrun --nproc-per-node 2 bench/all_reduce.py

Each size is what a row-parallel layer sums at some step (tokens x hidden x 2 bytes in bf16: 8 KB is one
decode at hidden 4,096, 2 MB 256 of them, 128 MB a 16k-token prefill chunk). A graph of 64 all-reduces
(two per layer of a 32-layer model) is captured per method and replayed; the table gives microseconds per
all-reduce (CUDA events, median of 20 replays after 5) and the bus bandwidth ``2 (n-1)/n x bytes / time``.
Both methods' sums are compared first (``identical``). Rank 0 writes
``bench/results/all-reduce-<n>x<gpu>-<date>.json``.

``lamport`` (up to 8 MB) is the barrier-free one-shot kernel (`hf_paged.kernels.triton_all_reduce`) that
row-parallel layers use up to ``LAMPORT_MAX_BYTES``: the data is its own arrival flag.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hf_paged.tp_all_reduce import (  # noqa: E402
    _rms_norm, _symmetric_add_rms_norm, enable_symmetric_memory, symmetric_all_reduce)

LAMPORT_BENCH_MAX_BYTES = 8 << 20  # past the library's LAMPORT_MAX_BYTES, to show where it stops paying
SIZES = [8 << 10, 64 << 10, 128 << 10, 256 << 10, 512 << 10, 2 << 20, 4 << 20, 8 << 20, 16 << 20, 32 << 20, 64 << 20, 128 << 20]
CALLS = 64


def _graph(fn, x):
    """A graph of CALLS all-reduces of ``x`` (values are not checked here: NCCL's sums in place grow)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            fn(x)
    return graph


def _time(graph) -> float:
    """Median microseconds per all-reduce over 20 replays."""
    for _ in range(5):
        graph.replay()
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        dist.barrier()
        torch.cuda.synchronize()
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / CALLS)
    return statistics.median(times)


def main() -> None:
    dist.init_process_group("nccl", device_id=torch.device("cuda", int(os.environ["LOCAL_RANK"])))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    group = dist.group.WORLD
    if not enable_symmetric_memory(group, max(SIZES), lamport_max_bytes=LAMPORT_BENCH_MAX_BYTES):
        raise SystemExit("no symmetric memory on this group")
    name = group.group_name

    def nccl(x):  # in place, as Transformers' row-parallel layers call it
        dist.all_reduce(x, group=group)
        return x

    def one_shot(x):
        return symmetric_all_reduce(x, name, one_shot_max_bytes=x.numel() * x.element_size(), lamport_max_bytes=0)

    def two_shot(x):
        return symmetric_all_reduce(x, name, one_shot_max_bytes=0, lamport_max_bytes=0)

    def lamport(x):
        return symmetric_all_reduce(x, name)

    rows = []
    for size in SIZES:
        g = torch.Generator(device="cuda").manual_seed(rank * 1000 + size)
        x = torch.randn(size // 2, device="cuda", dtype=torch.bfloat16, generator=g)
        total = nccl(x.clone())
        # Two ranks: a + b on every path. More ranks add in other orders, so each path is also held against the
        # fp32 sum of every rank's partials (in units of the bf16 spacing at the largest sum).
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x, group=group)
        exact = torch.stack(parts).float().sum(0)
        ulp = exact.abs().max().item() * 2.0 ** -7

        def err(y):
            return (y.float() - exact).abs().max().item() / ulp

        row = {"bytes": size, "identical": torch.equal(total, one_shot(x)) and torch.equal(total, two_shot(x)),
               "nccl_err_ulp": err(total), "one_shot_err_ulp": err(one_shot(x)), "two_shot_err_ulp": err(two_shot(x))}
        methods = [("nccl", nccl), ("one_shot", one_shot), ("two_shot", two_shot)]
        if size <= LAMPORT_BENCH_MAX_BYTES:
            # Three calls in a row: each of the three buffers used, read and cleared once.
            outs = [lamport(x) for _ in range(3)]
            row["lamport_identical"] = all(torch.equal(total, y) for y in outs)
            row["lamport_err_ulp"] = max(err(y) for y in outs)
            # Every rank must hold the same sums (else TP ranks drift apart): compare with rank 0's.
            first = outs[0].clone()
            dist.broadcast(first, 0, group=group)
            # The same kernel with a decoder layer's epilogue (residual add, Llama RMSNorm) against those ops
            # after NCCL's sum, rows of 4,096.
            rows_of = x.view(-1, 4096)
            residual = torch.randn_like(rows_of)
            weight = torch.randn(4096, device="cuda", dtype=x.dtype)
            summed, normed = _symmetric_add_rms_norm(rows_of, residual, weight, 1e-5, name, 0, None)
            reference = residual + total.view(-1, 4096)
            row["epilogue_sum_identical"] = torch.equal(summed, reference)
            row["epilogue_norm_err_ulp"] = ((normed.float() - _rms_norm(reference, weight, 1e-5).float()).abs().max()
                                            / (normed.float().abs().max() * 2.0 ** -7)).item()
            agree = torch.tensor([int(torch.equal(first, outs[0]))], device="cuda")
            dist.all_reduce(agree, op=dist.ReduceOp.MIN, group=group)
            row["lamport_same_on_ranks"] = bool(agree.item())
            methods.append(("lamport", lamport))
        for label, fn in methods:
            us = _time(_graph(fn, x))
            row[f"{label}_us"] = us
            row[f"{label}_busbw_gb_s"] = 2 * (world - 1) / world * size / us / 1e3
        rows.append(row)
    if rank == 0:
        gpu = torch.cuda.get_device_name(0)
        now = _dt.datetime.now(_dt.timezone.utc)
        record = {"date": now.strftime("%Y-%m-%d"), "gpu": gpu, "gpus": world, "calls_per_graph": CALLS,
                  "versions": {"torch": torch.__version__, "nccl": ".".join(map(str, torch.cuda.nccl.version()))},
                  "rows": rows}
        out = Path(__file__).parent / "results" / f"all-reduce-{world}x{gpu.replace(' ', '_')}-{now:%Y-%m-%d}.json"
        out.write_text(json.dumps(record, indent=1))
        print(f"{'bytes':>10} {'nccl us':>9} {'one-shot us':>12} {'two-shot us':>12} {'lamport us':>11} {'nccl GB/s':>10} "
              f"{'1-shot GB/s':>12} {'2-shot GB/s':>12} same")
        for r in rows:
            lamport_us = f"{r['lamport_us']:>11.1f}" if "lamport_us" in r else f"{'-':>11}"
            print(f"{r['bytes']:>10} {r['nccl_us']:>9.1f} {r['one_shot_us']:>12.1f} {r['two_shot_us']:>12.1f} "
                  f"{lamport_us} {r['nccl_busbw_gb_s']:>10.1f} {r['one_shot_busbw_gb_s']:>12.1f} "
                  f"{r['two_shot_busbw_gb_s']:>12.1f} {r['identical']} {r.get('lamport_identical', '-')} "
                  f"err ulp nccl {r['nccl_err_ulp']:.2f} lamport {r.get('lamport_err_ulp', float('nan')):.2f} "
                  f"ranks agree {r.get('lamport_same_on_ranks', '-')} epilogue sum same "
                  f"{r.get('epilogue_sum_identical', '-')} "
                  f"norm err ulp {r.get('epilogue_norm_err_ulp', float('nan')):.2f}")
        print(f"wrote {out}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
