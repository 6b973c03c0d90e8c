"""Run under ``torchrun --nproc-per-node N`` by tests/test_distributed.py: one tensor-parallel run.

argv: model_dir out_dir. Every rank writes ``rank{r}.json`` with what it generated through
``model.generate`` (PagedCache), an ``Engine`` with a small pool, unfused, then after
`fuse_projections`, ``generate_batch`` and the Engine again.
"""

import json
import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import hf_paged
from hf_paged.cache.geometry import tensor_parallel_size
from hf_paged.distributed import load_tensor_parallel_model
from hf_paged.fused_projections import fuse_projections

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
    engine = hf_paged.Engine(model, **engine_kwargs, fuse_projections=False)
    outs = engine.generate(prompts, params, progress=False)
    result["engine_unfused"] = [o.samples[0].token_ids if o.samples else o.error for o in outs]
    engine.close()

    # q/k/v and gate/up fused per rank over their column shards (what an Engine does by default): the same
    # logits, one matmul per group.
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        result["fused_groups"], result["layers"] = fuse_projections(model), model.config.num_hidden_layers
        result["fused_logits_max_diff"] = (model(ids, attention_mask=mask).logits - logits).abs().max().item()
    with torch.enable_grad():  # each member's own (tensor-parallel) forward, as before fusing
        result["fused_grad_logits_max_diff"] = (model(ids, attention_mask=mask).logits - logits).abs().max().item()

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
