"""`hf_paged.fused_projections`: q/k/v and gate/up as one matmul per group, the model's outputs and
parameters unchanged, eager and under torch.compile, in the engine."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ARCHS, make_pair

from hf_paged import Engine, SamplingParams
from hf_paged.fused_projections import fuse_projections


def _count_linear_calls(monkeypatch) -> list:
    calls = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, w, b=None: calls.append(w.shape) or linear(x, w, b))
    return calls


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_fused_model_gives_the_same_logits_with_fewer_matmuls(arch, monkeypatch):
    _, model = make_pair(arch)  # the sdpa/eager oracle: fusion does not depend on the attention implementation
    ids = torch.randint(4, 96, (2, 11), generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        want = model(ids).logits
        layers = model.config.num_hidden_layers
        assert fuse_projections(model) == 2 * layers
        assert fuse_projections(model) == 0  # already fused
        calls = _count_linear_calls(monkeypatch)
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Per layer: one q/k/v matmul, o_proj, one gate/up matmul, down_proj; then the LM head.
    assert len(calls) == 4 * layers + 1
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_members_called_apart_compute_their_own(monkeypatch):
    """A member called with another input than its group's first, or in another order, still gives its
    own projection (so a model that does not call the group on one input stays correct)."""
    _, model = make_pair("llama-gqa")
    attn = model.model.layers[0].self_attn
    x, other = torch.randn(1, 3, 64), torch.randn(1, 3, 64)
    want = {n: getattr(attn, n)(t) for n, t in (("q_proj", x), ("k_proj", other), ("v_proj", x))}
    fuse_projections(model)
    with torch.no_grad():
        q = attn.q_proj(x)
        v = attn.v_proj(x)  # out of order: its slice of the group's matmul
        k = attn.k_proj(other)  # another input: its own matmul
        lone_k = attn.k_proj(x)  # the group's outputs are handed out: its own matmul again
    torch.testing.assert_close(q, want["q_proj"])
    torch.testing.assert_close(v, want["v_proj"])
    torch.testing.assert_close(k, want["k_proj"])
    torch.testing.assert_close(lone_k, torch.nn.functional.linear(x, attn.k_proj.weight))


def test_fused_model_saves_and_loads_as_before(tmp_path):
    from transformers import AutoModelForCausalLM

    _, model = make_pair("qwen2-bias-window")  # q/k/v with biases
    fuse_projections(model)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    ids = torch.randint(4, 96, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("compile_model", [False, True])
def test_engine_with_fused_projections_gives_the_same_tokens(compile_model, monkeypatch):
    """Greedy tokens of `Engine(fuse_projections=True)` equal the unfused engine's, eager and with compiled
    decoder layers (every layer shares one compiled graph: a per-layer guard on the fused modules would
    recompile each layer and hit the limit, which raises here)."""
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(4, 96, (int(n),), generator=g).tolist() for n in (5, 17, 33, 2)]
    params = SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True)
    outputs = []
    for fuse in (False, True):
        model, _ = make_pair("llama-gqa")
        with Engine(model, num_blocks=256, max_num_batched_tokens=32, compile_model=compile_model,
                    fuse_projections=fuse) as engine:
            outputs.append([o.token_ids for o in engine.generate(prompts, params)])
        assert (type(model.model.layers[0].self_attn.k_proj) is torch.nn.Linear) is not fuse
    assert outputs[0] == outputs[1]


def test_training_a_fused_model_reaches_every_parameter():
    """With gradients on, each member runs its own matmul on its own parameters, so a trainer that shares the
    model with an engine (TRL's rollouts) gets the gradients of the unfused model, and its updates reach
    the fused weight (the parameters are views of it)."""
    _, plain = make_pair("llama-gqa")
    _, fused = make_pair("llama-gqa")
    fuse_projections(fused)
    ids = torch.randint(4, 96, (2, 7), generator=torch.Generator().manual_seed(2))
    for model in (plain, fused):
        model.train()
        model(ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in fused.named_parameters()}
    for name, p in plain.named_parameters():
        assert grads[name] is not None, name
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6)
    k_proj = fused.model.layers[0].self_attn.k_proj
    with torch.no_grad():
        k_proj.weight.sub_(k_proj.weight.grad)  # an optimizer step in place
        x = torch.randn(1, 3, k_proj.in_features)
        fused.model.layers[0].self_attn.q_proj(x)  # the group's matmul, handing out k_proj's slice
        torch.testing.assert_close(k_proj(x), torch.nn.functional.linear(x, k_proj.weight))
