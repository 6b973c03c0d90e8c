"""TRL: one GRPO step on CPU with ``rollout_func`` from hf_paged; the engine samples from the trained weights.

Skipped when TRL is not installed (``pip install -e ".[trl]"``).
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("trl")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from tiny_model_dir import save_tiny_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from hf_paged.integrations.trl import make_rollout_func  # noqa: E402


def _length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def test_grpo_step_with_engine_rollouts(tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    model_dir = save_tiny_model(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    tok = AutoTokenizer.from_pretrained(model_dir)
    args = GRPOConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=2, max_completion_length=6,
        max_steps=1, learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", bf16=False, seed=0,
    )
    calls = []
    rollout = make_rollout_func(num_blocks=64, block_size=4)

    def recording_rollout(prompts, trainer):
        out = rollout(prompts, trainer)
        calls.append((list(prompts), out))
        return out

    dataset = Dataset.from_dict({"prompt": ["w5 w6 w7", "w9 w4", "w10 w11", "w12"]})
    trainer = GRPOTrainer(model=model, reward_funcs=_length_reward, args=args, train_dataset=dataset,
                          processing_class=tok, rollout_func=recording_rollout)
    before = model.lm_head.weight.detach().clone()
    trainer.train()

    (prompts, out), = calls
    assert len(out["prompt_ids"]) == len(out["completion_ids"]) == len(out["logprobs"]) == len(prompts) == 4
    assert all(1 <= len(c) == len(lp) <= 6 for c, lp in zip(out["completion_ids"], out["logprobs"]))
    assert not torch.equal(before, model.lm_head.weight)  # the step trained the model
    assert trainer._hf_paged_engine.engine.model is model  # the engine wraps the trained model, no copy
    assert type(model.model.layers[0].self_attn.k_proj) is torch.nn.Linear  # projections not fused under a trainer
    assert model.config._attn_implementation == "sdpa"  # restored for training forwards

    # A rollout after the update samples from the new weights: its logprobs are those of a plain
    # forward of the trained model (prefix cache dropped, nothing stale).
    again = rollout(["w5 w6 w7", "w5 w6 w7"], trainer)
    model.eval()
    for ids, completion, logprobs in zip(again["prompt_ids"], again["completion_ids"], again["logprobs"]):
        with torch.no_grad():
            logits = model(torch.tensor([ids + completion])).logits[0, len(ids) - 1 : -1].float()
        expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(completion)[:, None])[:, 0]
        assert logprobs == pytest.approx(expected.tolist(), abs=1e-4)
    assert os.environ["TRL_EXPERIMENTAL_SILENCE"] == "1"
