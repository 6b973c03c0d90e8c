"""Run under ``torchrun --nproc-per-node N`` by tests/test_distributed.py: one tensor-parallel run.

argv: model_dir out_dir. Every rank writes ``rank{r}.json`` with what it generated through
``model.generate`` (PagedCache), ``generate_batch`` and an ``Engine`` with a small pool.
"""

import json
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import hf_paged
from hf_paged.cache.geometry import tensor_parallel_size
from hf_paged.distributed import load_tensor_parallel_model

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from tp_cases import engine_cases, generate_inputs  # noqa: E402


def main(model_dir: str, out_dir: str) -> None:
    model = load_tensor_parallel_model(model_dir)
    rank = dist.get_rank()
    result = {"tp_size": tensor_parallel_size(model), "heads": []}
    # Transformers' own spelling works too and gives the same shards.
    plain = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="paged", tp_plan="auto")
    result["plain_tp_size"] = plain.tp_size
    del plain

    ids, mask = generate_inputs()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    result["generate"] = out[:, ids.shape[1]:].tolist()

    prompts, params, engine_kwargs = engine_cases()
    outs = hf_paged.generate_batch(model, prompts, params, progress=False)
    result["generate_batch"] = [o.samples[0].token_ids if o.samples else o.error for o in outs]
    engine = hf_paged.Engine(model, **engine_kwargs)
    result["kv_pool_heads"] = engine.kv_pool.num_kv_heads
    outs = engine.generate(prompts, params, progress=False)
    result["engine"] = [o.samples[0].token_ids if o.samples else o.error for o in outs]
    result["preemptions"] = engine.stats().preemptions
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.manual_seed(1234)  # unseeded sampling differs per rank unless the engine broadcasts tokens
    main(sys.argv[1], sys.argv[2])
