"""What a new user pays per call: `generate_batch` with a fresh engine vs the engine it keeps, and `Engine.close`.

    python bench/engine_reuse.py [--calls 10] [--out bench/results/engine-reuse-<gpu>-<date>.json]

The model has SmolLM2-135M-Instruct's shape (30 layers, 9 query / 3 KV heads, head_dim 64) with random
weights in bfloat16, so the run needs no download; one prompt, 8 new tokens (``ignore_eos``), as the
issue measured. Timings are wall-clock per call with a device sync at the end (what a user waits for).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import torch

import hf_paged
from hf_paged import Engine, SamplingParams, generate_batch
from hf_paged.engine import release_engine

PARAMS = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
PROMPT = [1, 9690, 198, 2683, 314, 253, 5356, 30]


def smollm2_shaped(device: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         tie_word_embeddings=True, rope_theta=100000.0)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="paged", dtype=torch.bfloat16).to(device).eval()


def timed_call(model, sync) -> float:
    t0 = time.perf_counter()
    out = generate_batch(model, [PROMPT], PARAMS, progress=False)
    sync()
    assert len(out[0].token_ids) == 8
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    cuda = torch.device(args.device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model = smollm2_shaped(args.device)

    # Warm-up: Triton compiles its kernels on first use; neither column should pay that.
    generate_batch(model, [PROMPT], PARAMS, progress=False)
    release_engine(model)

    fresh = []
    for _ in range(args.calls):  # the old behaviour: a new pool (and CUDA graph capture) every call
        release_engine(model)
        fresh.append(timed_call(model, sync))
    reused = [timed_call(model, sync) for _ in range(args.calls)]  # the engine kept from the call before
    release_engine(model)

    memory = {}
    if cuda:
        torch.cuda.empty_cache()
        memory["before_gib"] = torch.cuda.memory_allocated() / 2**30
        engine = Engine(model)  # default pool: 90% of free memory
        engine.generate([PROMPT], PARAMS)
        memory["engine_gib"] = torch.cuda.memory_allocated() / 2**30
        engine.close()  # no gc.collect(): close frees the pool and graphs at once
        memory["after_close_gib"] = torch.cuda.memory_allocated() / 2**30
        memory["reserved_after_close_gib"] = torch.cuda.memory_reserved() / 2**30

    result = dict(
        date=datetime.date.today().isoformat(),
        gpu=torch.cuda.get_device_name() if cuda else "cpu",
        torch=torch.__version__, transformers=_transformers_version(), hf_paged=hf_paged.__version__,
        model="SmolLM2-135M-Instruct shape, random weights, bfloat16", prompt_tokens=len(PROMPT), new_tokens=8,
        calls=args.calls,
        fresh_engine_s=statistics.median(fresh), reused_engine_s=statistics.median(reused),
        speedup=statistics.median(fresh) / statistics.median(reused), **memory,
    )
    out = args.out or f"bench/results/engine-reuse-{result['gpu'].replace(' ', '_')}-{result['date']}.json"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"\n| generate_batch, 1 prompt, 8 tokens | median of {args.calls} |\n|---|---|")
    print(f"| fresh engine per call | {result['fresh_engine_s'] * 1e3:.1f} ms |")
    print(f"| reused engine | {result['reused_engine_s'] * 1e3:.1f} ms |")
    if memory:
        print(f"| allocated: before / engine / after close() | {memory['before_gib']:.2f} / "
              f"{memory['engine_gib']:.2f} / {memory['after_close_gib']:.2f} GiB |")


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


if __name__ == "__main__":
    main()
