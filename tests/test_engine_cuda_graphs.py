"""Decode steps replayed from CUDA graphs give the tokens of eager steps (GPU only)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from hf_paged import Engine, SamplingParams

pytestmark = pytest.mark.gpu


def _model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
                      initializer_range=0.2)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="paged").to("cuda", torch.float32).eval()


def test_graph_replay_matches_eager():
    model = _model()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(4, 1000, (int(n),), generator=g).tolist() for n in torch.randint(1, 300, (37,), generator=g)]
    params = SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True)
    outs = {}
    for graphs in (False, True):
        engine = Engine(model, num_blocks=2048, max_num_seqs=16, cuda_graphs=graphs)
        outs[graphs] = [o.token_ids for o in engine.generate(prompts, params)]
        assert engine.kv_pool.blocks.num_free == 2048
        if graphs:
            assert engine.runner._graphs._graphs, "no decode graph was captured"
    same = sum(a == b for a, b in zip(outs[False], outs[True]))
    assert same == len(prompts), f"{same}/{len(prompts)} identical"
