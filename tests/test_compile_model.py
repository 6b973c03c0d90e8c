"""`Engine(compile_model=True)`: the model under torch.compile, the paged-attention step one opaque op,
gives the tokens of the eager model (CPU here; the GPU variant with graphs is in test_engine_cuda_graphs)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_pair

from hf_paged import Engine, SamplingParams


@pytest.fixture(autouse=True)
def _fail_at_recompile_limit(monkeypatch):
    """Past the recompile limit torch.compile runs a frame eagerly with a log line; here it raises instead. Every
    model's decoder layers share one code object, so each test starts with no compiled entries."""
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    torch._dynamo.reset()


def test_compiled_model_matches_eager():
    from torch._dynamo.utils import counters

    model, _ = make_pair("llama-gqa")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, 96, (int(n),), generator=g).tolist() for n in torch.randint(1, 60, (30,), generator=g)]
    params = [SamplingParams(max_new_tokens=int(n), temperature=0.0, ignore_eos=True)
              for n in torch.randint(1, 24, (20,), generator=g)]
    params += [SamplingParams(max_new_tokens=12, temperature=0.9, seed=i, n=1 + i % 2) for i in range(10)]
    # Chunked prefill (48-token budget) and decodes share steps: query lengths, sequences and
    # rows vary from step to step, so the compiled model must cover dynamic shapes.
    kwargs = dict(num_blocks=256, max_num_seqs=8, max_num_batched_tokens=48)
    want = [[s.token_ids for s in o.samples] for o in Engine(model, **kwargs).generate(prompts, params)]
    counters.clear()
    engine = Engine(model, compile_model=True, **kwargs)
    got = [[s.token_ids for s in o.samples] for o in engine.generate(prompts, params)]
    assert got == want
    assert counters["frames"]["ok"] >= 1  # the model did run compiled
    assert engine.kv_pool.blocks.num_free == 256


def test_layers_share_one_compiled_graph():
    """Each decoder layer is compiled in place and all of them run the same code: a 20-layer model (more
    layers than the recompile limit of 16 the engine sets) compiles no more frames than a 2-layer one, and no
    layer falls back to eager for lack of recompiles."""
    from torch._dynamo.utils import counters
    from transformers import AutoModelForCausalLM
    from tiny_models import make_config

    frames = {}
    for layers in (2, 20):
        config = make_config("llama-gqa")
        config.num_hidden_layers = layers
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="paged").eval()
        prompts = [[5, 9, 11, 3] * k for k in (1, 3, 5)]
        params = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
        want = [o.token_ids for o in Engine(model, num_blocks=64).generate(prompts, params)]
        torch._dynamo.reset()  # the 20-layer model compiles afresh, not from the 2-layer one's entries
        counters.clear()
        got = [o.token_ids for o in Engine(model, num_blocks=64, compile_model=True).generate(prompts, params)]
        assert got == want
        frames[layers] = counters["frames"]["ok"]
    assert 1 <= frames[20] <= frames[2]


def test_warm_up_leaves_nothing_to_compile_while_serving(monkeypatch):
    """Warm-up runs steps of one and of several sequences, so torch.compile has made the batch dimensions
    dynamic before the first request: larger, uncaptured steps (on the GPU: above the graph buckets) reuse
    the compiled code instead of recompiling the whole model mid-serving. It also runs a step as large as
    the engine schedules (under tensor parallelism a compiled model branches on the message size)."""
    from torch._dynamo.utils import counters

    model, _ = make_pair("llama-gqa")
    engine = Engine(model, compile_model=True, num_blocks=1024, max_num_seqs=300, max_num_batched_tokens=1024)
    runner, steps = engine.runner, []
    execute = runner.execute
    monkeypatch.setattr(runner, "execute", lambda out, *a, **k: steps.append(out.num_batched_tokens) or execute(out, *a, **k))
    runner.warm_up()  # Engine warms up on CUDA only
    monkeypatch.undo()
    assert steps[-1] == 1024  # four prompts of 256 tokens, the model's longest
    compiled = counters["frames"]["total"]
    # The last: a step of more than 256 sequences (where the kv_start buffer was once reallocated).
    for lengths in ((300,), (700, 40, 3), (200, 300, 400), (2,) * 290):
        engine.generate([[5] * n for n in lengths], SamplingParams(max_new_tokens=2, ignore_eos=True))
    assert counters["frames"]["total"] == compiled


def test_large_steps_past_a_size_branch_stay_compiled(monkeypatch):
    """Under tensor parallelism the compiled layer branches on the step's size (symmetric memory's all-reduce takes
    messages of up to 16 MB: 2,048 tokens of the 8B shape; 4 MB then), so steps past it have a compiled entry of their own.
    Warm-up runs two such steps of different sequence counts, leaving that count dynamic there: with one, the
    first served prompt step of 16 sequences recompiled the layer (3.3 s inside a timed TP=2 run on two H100s).
    Here the branch is a stand-in in the MLP, at 200 tokens, and warm-up's largest step is one 256-token prompt
    (the model's longest), as one 8,192-token prompt was there."""
    import transformers.models.llama.modeling_llama as llama
    from torch._dynamo.utils import counters

    mlp = llama.LlamaMLP.forward
    monkeypatch.setattr(llama.LlamaMLP, "forward", lambda self, x: mlp(self, x) * (1.0 if x.shape[1] > 200 else 1))
    model, _ = make_pair("llama-gqa")
    engine = Engine(model, compile_model=True, num_blocks=1024, max_num_seqs=64, max_num_batched_tokens=256)
    engine.runner.warm_up()  # Engine warms up on CUDA only
    compiled = counters["frames"]["total"]
    for lengths in ((128, 128), (100, 60, 60, 30), (256,)):
        engine.generate([[5] * n for n in lengths], SamplingParams(max_new_tokens=2, ignore_eos=True))
    assert counters["frames"]["total"] == compiled


def test_graph_captures_after_warm_up_stay_compiled(monkeypatch):
    """On CUDA, warm-up is followed by the forwards that decode graphs (1 to max_num_seqs one-token sequences)
    and mixed-step graphs (every token bucket, launches sized from shapes) capture, each a specialisation
    torch.compile may recompile for. At torch's default recompile limit (8) the layer passed it there and
    every mixed-step graph ran the layers eagerly. The same forwards here on the CPU, without capturing
    (pinned staging and graph pools are CUDA's)."""
    from torch._dynamo.utils import counters

    from hf_paged.cuda_graphs import DecodeGraphs, MixedGraphs

    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    model, _ = make_pair("llama-gqa")
    engine = Engine(model, compile_model=True, num_blocks=512, max_num_seqs=64, max_num_batched_tokens=1024)
    runner = engine.runner
    counters.clear()
    runner.warm_up()  # Engine warms up on CUDA only
    graphs = [DecodeGraphs(model, runner.kv_pool, max_batch=64, max_context=256, mask=runner._mask),
              MixedGraphs(model, runner.kv_pool, max_seqs=64, max_tokens=1024, max_context=256, mask=runner._mask)]
    with torch.inference_mode():
        for g in graphs:
            for bucket in reversed(g.buckets):  # as `capture_all`: no slot stored into, no key read
                g._forward(bucket)
    assert counters["frames"]["total"] <= 12  # nine today; the engine's limit is 16
