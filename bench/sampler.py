"""One sampler step on a [rows, vocab] batch of logits: the sort-based torch path vs the fused Triton kernel.

The `Sampler` is timed as the engine calls it (`Sampler.tokens`), once with the kernel switched off and once
with it, in one process, for the draws a chat server typically asks for. Needs a CUDA GPU.

    python bench/sampler.py [--rows 512] [--vocab 128256] [--out bench/results]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import types

import torch
import triton
import triton.testing

import hf_paged.engine.sampler as sampler_module
from hf_paged.engine.sampling_params import SamplingParams

CASES = {
    "temperature 0.8": dict(temperature=0.8),
    "temperature 0.8 + top_p 0.95": dict(temperature=0.8, top_p=0.95),
    "temperature 0.8 + top_k 50 + top_p 0.9": dict(temperature=0.8, top_k=50, top_p=0.9),
    "min_p 0.05": dict(temperature=1.0, min_p=0.05),
}


def fake_sequences(rows: int, params: SamplingParams) -> list:
    """What `Sampler` reads of a sequence: its request's parameters (no seed: the default generator)."""
    request = types.SimpleNamespace(params=params, argmax_only=params.greedy)
    return [types.SimpleNamespace(request=request, generator=None) for _ in range(rows)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/sampler.py needs a CUDA GPU (the fused kernel serves CUDA tensors only)")
    original = sampler_module._fused_sample
    fused = original()
    if fused is None:
        raise SystemExit("the fused sampling kernel needs Triton")
    logits = torch.randn(args.rows, args.vocab, device="cuda", dtype=torch.bfloat16) * 3
    sampler = sampler_module.Sampler()
    rows = []
    try:
        for name, kw in CASES.items():
            seqs = fake_sequences(args.rows, SamplingParams(**kw))
            timed = {}
            for path, fn in (("sort", lambda: None), ("fused", lambda: fused)):
                sampler_module._fused_sample = fn
                timed[path] = triton.testing.do_bench(lambda: sampler.tokens(logits, seqs), warmup=5, rep=200,
                                                      return_mode="median")
            rows.append(dict(case=name, sort_ms=timed["sort"], fused_ms=timed["fused"],
                             speedup=timed["sort"] / timed["fused"]))
            print(f"sampler {name:40s}: sort path {timed['sort']:.2f} ms | fused {timed['fused']:.2f} ms | "
                  f"{timed['sort'] / timed['fused']:.1f}x", flush=True)
    finally:
        sampler_module._fused_sample = original
    gpu = torch.cuda.get_device_name()
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"sampler-{gpu.replace(' ', '_')}-{date[:10]}.json")
    with open(path, "w") as f:
        json.dump(dict(gpu=gpu, date=date, torch=torch.__version__, triton=triton.__version__, rows=args.rows,
                       vocab=args.vocab, cases=rows), f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
