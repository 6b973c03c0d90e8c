"""Real-model numerics: bf16 paged vs an fp32 reference, beside bf16 sdpa (and fp32 paged == fp32 sdpa).

Greedy decoding of chat prompts (one left-padded `generate` batch per variant) with the real
SmolLM2-135M-Instruct (or any causal LM directory). Per variant: prompts whose tokens equal the fp32 sdpa
reference, and the mean position of the first divergence (= max_new_tokens where identical). Exits 1 when
fp32 paged differs from fp32 sdpa at all, or when bf16 paged is clearly further from the reference than
bf16 sdpa (identical count < sdpa's - 3, or mean first divergence < 0.7 x sdpa's).

    python bench/real_model_check.py                       # CUDA, demo model from the local cache
    python bench/real_model_check.py --model /models/SmolLM2-135M-Instruct
    python bench/real_model_check.py --device cpu --prompts 2 --max-new-tokens 8 --out /tmp   # smoke test
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import time

import torch

PROMPTS = [
    "What is the capital of France?",
    "Name the three primary colors.",
    "How many days are in a week?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "Give me three tips for better sleep.",
    "What is 12 times 7?",
    "Translate 'good morning' into French.",
    "Who wrote Romeo and Juliet?",
    "List four planets of the solar system.",
    "What does a CPU do?",
    "Write a short poem about autumn leaves.",
    "Why is the sky blue?",
    "Suggest a name for a pet goldfish.",
    "How do I boil an egg?",
    "What is the largest ocean on Earth?",
]

# (name, attention, dtype); the first is the reference.
VARIANTS = [
    ("fp32-sdpa", "sdpa", torch.float32),
    ("fp32-paged", "paged", torch.float32),
    ("bf16-sdpa", "sdpa", torch.bfloat16),
    ("bf16-paged", "paged", torch.bfloat16),
]


def greedy(model_dir: str, attn: str, dtype: torch.dtype, device: str, tok, chats, max_new: int) -> torch.Tensor:
    """[prompts, max_new] greedy tokens from one left-padded batch (rows that end early padded with pad id)."""
    from hf_paged.loader import load_model

    model, _ = load_model(model_dir, dtype=dtype, device=device, tokenizer=False, attn_implementation=attn)
    inputs = tok(chats, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id)
    out = out[:, inputs["input_ids"].shape[1]:].cpu()
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    if out.shape[1] < max_new:  # every row stopped early
        pad = torch.full((out.shape[0], max_new - out.shape[1]), tok.pad_token_id, dtype=out.dtype)
        out = torch.cat([out, pad], dim=1)
    return out


def first_divergence(a: torch.Tensor, b: torch.Tensor) -> list[int]:
    """Per row: the first position where a and b differ (row length where they don't)."""
    diff = a != b
    return [int(row.nonzero()[0]) if row.any() else a.shape[1] for row in diff]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model directory (default: hf_paged.demo_model.demo_model_dir())")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--prompts", type=int, default=len(PROMPTS))
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                   help="directory for real-model-check-<gpu>-<date>.json")
    args = p.parse_args()

    from transformers import AutoTokenizer
    from transformers import __version__ as tf_version

    import hf_paged

    model_dir = args.model
    if model_dir is None:
        from hf_paged.demo_model import demo_model_dir

        model_dir = str(demo_model_dir())
    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    questions = (PROMPTS * (args.prompts // len(PROMPTS) + 1))[: args.prompts]
    chats = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in questions]
    gpu = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else f"cpu-{platform.machine()}"
    print(f"{gpu} torch {torch.__version__} transformers {tf_version} hf_paged {hf_paged.__version__}", flush=True)
    print(f"model {model_dir}: {len(chats)} prompts x {args.max_new_tokens} greedy tokens", flush=True)

    tokens, seconds = {}, {}
    for name, attn, dtype in VARIANTS:
        start = time.perf_counter()
        tokens[name] = greedy(model_dir, attn, dtype, args.device, tok, chats, args.max_new_tokens)
        seconds[name] = time.perf_counter() - start
        print(f"  {name}: {seconds[name]:.1f} s", flush=True)

    ref = tokens[VARIANTS[0][0]]
    rows = {}
    for name, _, _ in VARIANTS[1:]:
        div = first_divergence(tokens[name], ref)
        rows[name] = {"identical": sum(d == args.max_new_tokens for d in div),
                          "mean_first_divergence": sum(div) / len(div), "first_divergence": div,
                          "seconds": round(seconds[name], 2)}

    failures = []
    if rows["fp32-paged"]["identical"] != len(chats):
        failures.append(f"fp32 paged differs from fp32 sdpa on "
                        f"{len(chats) - rows['fp32-paged']['identical']} prompt(s)")
    sdpa, paged = rows["bf16-sdpa"], rows["bf16-paged"]
    if paged["identical"] < sdpa["identical"] - 3:
        failures.append(f"bf16 paged identical {paged['identical']} < bf16 sdpa's {sdpa['identical']} - 3")
    if paged["mean_first_divergence"] < 0.7 * sdpa["mean_first_divergence"]:
        failures.append(f"bf16 paged mean first divergence {paged['mean_first_divergence']:.1f} "
                        f"< 0.7 x bf16 sdpa's {sdpa['mean_first_divergence']:.1f}")

    date = datetime.date.today().isoformat()
    result = {"gpu": gpu, "date": date, "device": args.device, "model": model_dir, "prompts": len(chats),
                  "max_new_tokens": args.max_new_tokens, "reference": "fp32-sdpa",
                  "versions": {"torch": torch.__version__, "transformers": tf_version, "hf_paged": hf_paged.__version__,
                                "python": platform.python_version()},
                  "variants": rows, "failures": failures, "ok": not failures}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"real-model-check-{re.sub(r'[^A-Za-z0-9.-]+', '_', gpu)}-{date}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")
    for failure in failures:
        print(f"FAIL: {failure}")

    print(f"\n| variant vs fp32-sdpa | identical / {len(chats)} | mean first divergence / {args.max_new_tokens} |")
    print("|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['identical']} | {row['mean_first_divergence']:.1f} |")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
