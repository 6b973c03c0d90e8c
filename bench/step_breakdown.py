"""Where the wall time of an engine step goes, phase by phase, by step kind (`throughput.classify_steps`:
decode-only; mixed steps of up to 4,096 tokens, which replay graphs; larger prefill steps).

    python bench/step_breakdown.py [--num-requests 1024] [--max-num-seqs 512] [--workload mixed] [--compile-model]

Runs the uniform (or mixed) workload of `bench/throughput.py` (same model shape) through `Engine.step` with
every phase timed on the host: schedule, runner (pack, upload, launch), sample (launch), wait (for
the step's tokens: the one device->host copy), `update_from_output`, output processing and the rest
(stats, bookkeeping). Without async scheduling the host phases other than "wait" are time the GPU
sits idle; with it, they overlap the step in flight. Warm-up runs first so no Triton compile is timed.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import time
from pathlib import Path

import torch
from throughput import _params, add_head_dim_arg, build_models, classify_steps, make_workload, sync

from hf_paged import Engine
from hf_paged.engine import engine as engine_module

PHASES = {"schedule": ("scheduler", "schedule"), "runner": ("runner", "execute"),
          "sample": ("sampler", "tokens"), "wait": (None, "result"),
          "update_from_output": ("scheduler", "update_from_output"), "output_processing": ("outputs", "updates")}


def instrument(engine: Engine, totals: dict[str, float]) -> None:
    """Wrap each phase's method on ``engine`` (``None``: the class of a launched step) to add its wall time to ``totals``."""
    for phase, (attr, method) in PHASES.items():
        owner = getattr(engine, attr) if attr else engine_module._LaunchedStep
        fn = getattr(owner, method)

        def timed(*args, _fn=fn, _phase=phase, **kwargs):
            t0 = time.perf_counter()
            try:
                return _fn(*args, **kwargs)
            finally:
                totals[_phase] += time.perf_counter() - t0

        setattr(owner, method, timed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-requests", type=int, default=1024)
    p.add_argument("--workload", choices=["uniform", "mixed"], default="uniform")
    p.add_argument("--max-num-seqs", type=int, default=512)
    p.add_argument("--max-num-batched-tokens", type=int, default=16384)
    p.add_argument("--memory-fraction", type=float, default=0.6)
    p.add_argument("--tiny", action="store_true")
    add_head_dim_arg(p)
    p.add_argument("--model", default=None, help="a real model directory instead of the random 1.2B shape")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-async-scheduling", action="store_true")
    p.add_argument("--compile-model", action="store_true", help="Engine(compile_model=True)")
    p.add_argument("--out", default=None, help="JSON path (default: bench/results/step-breakdown-<gpu>-<date>.json)")
    args = p.parse_args()
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    _, model, _ = build_models(args)
    engine = Engine(model, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                    memory_fraction=args.memory_fraction if args.device == "cuda" else None,
                    num_blocks=None if args.device == "cuda" else 4096,
                    async_scheduling=False if args.no_async_scheduling else None, compile_model=args.compile_model)
    scale = 0.05 if args.tiny else 1.0
    warm = make_workload("uniform", 16, engine.vocab_size, args.seed + 1000, scale)
    engine.generate([q for q, _ in warm], [_params(n) for _, n in warm])
    engine.reset_prefix_cache()

    per_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    steps = collections.Counter()
    for prompt, n in make_workload(args.workload, args.num_requests, engine.vocab_size, args.seed, scale):
        engine.add_request(prompt, _params(n))
    kind, _ = classify_steps(engine)
    totals: dict[str, float] = collections.Counter()
    instrument(engine, totals)
    sync(args.device)
    while engine.has_unfinished():
        totals.clear()
        t0 = time.perf_counter()
        engine.step()
        wall = time.perf_counter() - t0
        k = kind["now"]
        per_kind[k].update({**totals, "other": wall - sum(totals.values()), "wall": wall})
        steps[k] += 1
    sync(args.device)

    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    ms_per_step = {k: {ph: c[ph] / steps[k] * 1e3 for ph in [*PHASES, "other", "wall"]} | {"steps": steps[k]}
                   for k, c in per_kind.items() if steps[k]}
    result = dict(date=datetime.date.today().isoformat(), gpu=gpu, torch=torch.__version__, args=vars(args),
                  ms_per_step=ms_per_step)
    name = f"step-breakdown-{gpu.replace(' ', '_')}-{result['date']}.json"
    out = Path(args.out or Path(__file__).parent / "results" / name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"device: {gpu}, torch {torch.__version__}; wrote {out}")
    print("| step kind | steps | wall ms/step | " + " | ".join(list(PHASES) + ["other"]) + " |")
    print("|---|---|---|" + "---|" * (len(PHASES) + 1))
    for k, c in per_kind.items():
        if steps[k]:
            cells = [f"{c[ph] / steps[k] * 1e3:.2f}" for ph in [*PHASES, "other"]]
            print(f"| {k} | {steps[k]} | {c['wall'] / steps[k] * 1e3:.2f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
