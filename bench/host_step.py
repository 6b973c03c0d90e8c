"""Host time of an engine decode step, the model call stubbed out: what the scheduler, the input packing,
the sampler launch, `update_from_output` and output processing cost per step, on any machine.

    python bench/host_step.py [--num-seqs 512] [--steps 200] [--baseline-tree ../other-checkout]

``--baseline-tree`` imports another checkout's ``hf_paged`` under another name and alternates steps between
the two engines in this one process, so CPU frequency drift and neighbours hit both alike (on a shared
2-core VM separate runs of the same code differed by 2x). The forward is replaced by the runner's packing
(`_pack`) and its eager upload (`_upload`: on the CPU only concatenations) and constant logits; on CUDA a
decode step would instead stage its inputs into a graph's buffers and replay it, which is not timed here.
Async scheduling is on, as on CUDA; the loop runs under the engine's `quiet_gc`, as `Engine.generate` does.
"""

from __future__ import annotations

import argparse
import importlib
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# registers attn_implementation="paged"
import hf_paged  # noqa: E402,F401
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

from hf_paged.engine.gc_pauses import quiet_gc  # noqa: E402


def build_engine(package: str, num_seqs: int, prompt_len: int, max_new_tokens: int):
    """An engine of ``package`` on a tiny CPU model whose forward is stubbed, its ``num_seqs`` prompts prefilled."""
    pkg = importlib.import_module(package)
    runner = importlib.import_module(f"{package}.engine.model_runner").ModelRunner

    def stub_execute(self, out, block_copies=None, extra_rows=(), last_tokens=None):
        host = self._pack(out, extra_rows)
        self._upload(host, last_tokens)
        return torch.zeros(host.logits_indices.numel(), 8)

    runner.execute = stub_execute
    vocab = 1000
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=4096,
                         bos_token_id=None, eos_token_id=None)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="paged").eval()
    blocks = num_seqs * (prompt_len + max_new_tokens) // 16 + num_seqs
    engine = pkg.Engine(model, num_blocks=blocks, max_num_seqs=num_seqs, max_num_batched_tokens=16384,
                        async_scheduling=True)
    rng = random.Random(0)
    params = pkg.SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)
    for _ in range(num_seqs):
        engine.add_request([rng.randrange(1, vocab) for _ in range(prompt_len)], params)
    scheduler = engine.scheduler
    while scheduler.waiting or any(s.num_computed_tokens < s.num_prompt_tokens for s in scheduler.running):
        engine.step()
    return engine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-seqs", type=int, default=512)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--baseline-tree", default=None, help="another checkout whose hf_paged to compare with")
    args = p.parse_args()
    engines = {}
    if args.baseline_tree:
        tmp = Path(tempfile.mkdtemp())
        shutil.copytree(Path(args.baseline_tree) / "hf_paged", tmp / "hf_paged_baseline")
        sys.path.insert(0, str(tmp))
        engines["baseline"] = build_engine("hf_paged_baseline", args.num_seqs, args.prompt_len, args.steps + 8)
    engines["this tree"] = build_engine("hf_paged", args.num_seqs, args.prompt_len, args.steps + 8)
    times: dict[str, list[float]] = {name: [] for name in engines}
    order = list(engines.items())
    with quiet_gc():  # steps are called directly here, not through generate(), which holds it
        for i in range(args.steps):
            for name, engine in order if i % 2 else order[::-1]:
                t0 = time.perf_counter()
                engine.step()
                times[name].append(time.perf_counter() - t0)
    print(f"host ms per decode step, {args.num_seqs} sequences, model call stubbed ({args.steps} steps each):")
    for name, ts in times.items():
        ts.sort()
        print(f"  {name:10s} median {statistics.median(ts) * 1e3:.3f}  p25 {ts[len(ts) // 4] * 1e3:.3f}"
              f"  p75 {ts[3 * len(ts) // 4] * 1e3:.3f}")


if __name__ == "__main__":
    main()
