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


def _tokens(model, prompts, params, **engine_kwargs) -> tuple[list, Engine]:
    """Each request's samples' tokens from a fresh engine; its pool must be whole afterwards."""
    engine = Engine(model, num_blocks=2048, max_num_seqs=16, **engine_kwargs)
    outs = [[s.token_ids for s in o.samples] for o in engine.generate(prompts, params)]
    assert engine.kv_pool.blocks.num_free == 2048
    return outs, engine


def _assert_same(a: list, b: list) -> None:
    same = sum(x == y for x, y in zip(a, b))
    assert same == len(a), f"{same}/{len(a)} identical"


def test_graph_replay_matches_eager():
    model = _model()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(4, 1000, (int(n),), generator=g).tolist() for n in torch.randint(1, 300, (37,), generator=g)]
    params = SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True)
    eager, _ = _tokens(model, prompts, params, cuda_graphs=False)
    graphed, engine = _tokens(model, prompts, params, cuda_graphs=True)
    assert engine.runner._graphs._graphs, "no decode graph was captured"
    _assert_same(eager, graphed)


def test_async_scheduling_with_graphs_matches_synchronous_eager_steps():
    """fp32: one step in flight (placeholder tokens read on the device, decode and mixed-step graphs,
    seeded sampling, n=2, stops found one step late) gives the tokens of synchronous eager steps."""
    model = _model()
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(4, 1000, (int(n),), generator=g).tolist() for n in torch.randint(1, 300, (48,), generator=g)]
    params = [SamplingParams(max_new_tokens=int(n), temperature=0.0, ignore_eos=True)
              for n in torch.randint(1, 60, (24,), generator=g)]
    params += [SamplingParams(max_new_tokens=30, temperature=0.8, top_k=50, seed=i, n=1 + i % 2,
                              stop_token_ids=[7, 11]) for i in range(24)]
    slow, _ = _tokens(model, prompts, params, cuda_graphs=False, async_scheduling=False)
    fast, engine = _tokens(model, prompts, params, cuda_graphs=True, async_scheduling=True)
    assert engine.runner._mixed_graphs._graphs, "no mixed-step graph was captured"
    _assert_same(slow, fast)


def test_compiled_model_with_graphs_matches_eager():
    """fp32: `compile_model=True` with decode and mixed-step graphs and async scheduling gives the
    tokens of the eager, synchronous, uncompiled engine."""
    model = _model()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(4, 1000, (int(n),), generator=g).tolist() for n in torch.randint(1, 300, (32,), generator=g)]
    params = SamplingParams(max_new_tokens=32, temperature=0.0, ignore_eos=True)
    slow, _ = _tokens(model, prompts, params, cuda_graphs=False, async_scheduling=False)
    fast, engine = _tokens(model, prompts, params, cuda_graphs=True, async_scheduling=True, compile_model=True)
    assert engine.runner._graphs._graphs and engine.runner._mixed_graphs._graphs, "no graph was captured"
    _assert_same(slow, fast)


def test_sampling_launches_without_waiting_for_the_device():
    """Sampled rows (temperature, top-k/p, min-p, a seed) build their parameters on the host: none of those copies
    may synchronize, or async scheduling's overlap ends (torch's sync debug mode raises on one)."""
    from hf_paged.engine.sampler import Sampler
    from hf_paged.engine.sequence import Request, Sequence

    params = [SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05),
              SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=7)]
    seqs = [Sequence(i, Request(f"r{i}", [1, 2, 3], p, frozenset()), 0, [1, 2, 3]) for i, p in enumerate(params)]
    logits = torch.randn(len(seqs), 1000, device="cuda")
    sampler = Sampler()
    sampler.tokens(logits, seqs)  # the seeded row's generator is made here (not a step's work)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tokens = sampler.tokens(logits, seqs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert tokens.shape == (3,) and tokens.device.type == "cuda"
