"""`model.generate` on ``attn_implementation="paged"`` against ``"sdpa"``: same weights, greedy, batch 1 and 8.
The paged model runs twice: as it comes (one-token steps replay CUDA graphs on a GPU) and with
``disable_compile=True`` (every step eager).

The 1.5B shape of `throughput.py` (or ``--model DIR``), prompts of ``--prompt-len`` random tokens, ``--new-tokens``
tokens each, no EOS. Each model generates once untimed (Triton compiles, cuBLAS initialises), then ``--repeats``
timed runs, the two models in turns (alternating which goes first), synchronised wall clock. Reported: the median
and the fastest run, the median of each repeat's sdpa/paged ratio (these runs are host-bound, and the device
machines' hosts are noisy and drift: runs next to each other in time compare best), and the share of identical
greedy tokens (bf16: the two attention kernels round differently, so long greedy runs may part at
near-ties). "ms per token" is the whole ``generate`` call over its new tokens: the prompt's prefill is included.

    python bench/generate_speed.py [--tiny] [--batches 1,8] [--new-tokens 128] [--prompt-len 512] [--profile]

``--profile`` then profiles one paged ``generate`` per batch size with cProfile: where its host time goes.

Writes ``bench/results/generate-speed-<gpu>-<date>.json``.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as _dt
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import RESULTS, add_head_dim_arg, build_models, sync  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,8", help="comma list of batch sizes")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", default=None, help="a local model directory instead of the random 1.5B shape")
    p.add_argument("--tiny", action="store_true", help="tiny model, short runs (a CPU smoke test)")
    add_head_dim_arg(p)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="profile one paged generate per batch size")
    p.add_argument("--out", default=None, help="JSON path (default: bench/results/generate-speed-<gpu>-<date>.json)")
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.tiny:
        args.new_tokens, args.prompt_len, args.repeats = min(args.new_tokens, 8), min(args.prompt_len, 16), 1
    return args


def time_generate(runs: dict, ids: torch.Tensor, args) -> dict[str, tuple[list[float], torch.Tensor]]:
    """Per run (``name: (model, extra generate kwargs)``): the seconds of each of ``args.repeats`` runs of
    ``model.generate`` after one untimed run, and its tokens. The runs take turns in every repeat, in alternating
    order, so that a slower or faster spell of the host (these runs are host-bound) falls on all of them alike."""
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    times: dict[str, list[float]] = {name: [] for name in runs}
    tokens = {}
    with torch.inference_mode():
        for model, extra in runs.values():
            model.generate(ids, **kw, **extra)
        for repeat in range(args.repeats):
            for name, (model, extra) in list(runs.items())[:: 1 if repeat % 2 == 0 else -1]:
                sync(args.device)
                t0 = time.perf_counter()
                out = model.generate(ids, **kw, **extra)
                sync(args.device)
                times[name].append(time.perf_counter() - t0)
                tokens[name] = out[:, ids.shape[1]:]
    return {name: (times[name], tokens[name]) for name in runs}


def profile_generate(model, ids: torch.Tensor, args) -> list[dict]:
    """The Python functions one ``generate`` spends its host time in (cProfile, by own time): Triton's launcher,
    the cache and attention glue and Transformers' layers show up by name, which an op-level profile misses."""
    stats = cProfile.Profile()
    with torch.inference_mode():
        stats.enable()
        model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
        sync(args.device)
        stats.disable()
    table = pstats.Stats(stats).sort_stats("tottime")
    table.print_stats(20)
    top = sorted(table.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:20]
    return [dict(function=f"{Path(file).name}:{line}({name})", calls=calls, own_ms=own * 1e3, total_ms=total * 1e3)
            for (file, line, name), (_, calls, own, total, _) in top]


def main(argv=None) -> int:
    args = parse_args(argv)
    sdpa, paged, _ = build_models(args)
    vocab = paged.config.vocab_size
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        g = torch.Generator().manual_seed(args.seed + batch)
        ids = torch.randint(3, vocab, (batch, args.prompt_len), generator=g).to(args.device)
        # "paged" replays CUDA graphs of its one-token steps where it can (`hf_paged.graphed_decode`); "paged
        # eager" is the same model with them off, as Transformers' own flag turns compiled decoding off.
        runs = {"sdpa": (sdpa, {}), "paged": (paged, {}), "paged eager": (paged, dict(disable_compile=True))}
        timed = time_generate(runs, ids, args)
        (times_sdpa, t_sdpa), (times_paged, t_paged) = timed["sdpa"], timed["paged"]
        times_eager, t_eager = timed["paged eager"]
        s_sdpa, s_paged = statistics.median(times_sdpa), statistics.median(times_paged)
        best_sdpa, best_paged = min(times_sdpa), min(times_paged)
        row = dict(batch=batch, sdpa_ms_per_token=1e3 * s_sdpa / args.new_tokens,
                   paged_ms_per_token=1e3 * s_paged / args.new_tokens, paged_speedup=s_sdpa / s_paged,
                   sdpa_best_ms_per_token=1e3 * best_sdpa / args.new_tokens,
                   paged_best_ms_per_token=1e3 * best_paged / args.new_tokens, paged_best_speedup=best_sdpa / best_paged,
                   # each repeat's two runs are neighbours in time: the median of their ratios is the least
                   # disturbed by the host's slow drifts
                   paged_paired_speedup=statistics.median(a / b for a, b in zip(times_sdpa, times_paged)),
                   paged_eager_ms_per_token=1e3 * statistics.median(times_eager) / args.new_tokens,
                   paged_eager_speedup=s_sdpa / statistics.median(times_eager),
                   sdpa_s=times_sdpa, paged_s=times_paged, paged_eager_s=times_eager,
                   same_tokens=float((t_sdpa == t_paged).float().mean()),
                   same_tokens_paged_eager=float((t_eager == t_paged).float().mean()))
        if args.profile:
            row["paged_profile"] = profile_generate(paged, ids, args)
        rows.append(row)
        print(f"batch {batch}: sdpa {row['sdpa_ms_per_token']:.2f} ms/token, paged {row['paged_ms_per_token']:.2f} "
              f"ms/token ({row['paged_speedup']:.2f}x); fastest runs {row['sdpa_best_ms_per_token']:.2f} / "
              f"{row['paged_best_ms_per_token']:.2f} ({row['paged_best_speedup']:.2f}x); paired runs "
              f"{row['paged_paired_speedup']:.2f}x; paged eager {row['paged_eager_ms_per_token']:.2f} ms/token "
              f"({row['paged_eager_speedup']:.2f}x); same greedy tokens as sdpa {100 * row['same_tokens']:.0f}%, "
              f"graphed as eager {100 * row['same_tokens_paged_eager']:.0f}%")
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    result = dict(date=_dt.date.today().isoformat(), gpu=gpu, torch=torch.__version__,
                  transformers=transformers.__version__, args=vars(args), rows=rows)
    out = Path(args.out or RESULTS / f"generate-speed-{gpu.replace(' ', '_')}-{result['date']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
