"""TRL: a ``rollout_func`` for ``GRPOTrainer`` that samples completions with hf_paged's continuous-batching engine.

::

    from trl import GRPOConfig, GRPOTrainer
    from hf_paged.integrations.trl import rollout_func

    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(...), train_dataset=ds,
                          rollout_func=rollout_func)

TRL (>= 1.16, the version this is tested with) calls ``rollout_func(prompts, trainer)`` with this process's
prompts, each already repeated ``num_generations`` times in a row, and expects one completion per
entry: ``{"prompt_ids", "completion_ids", "logprobs"}``. Consecutive repeats of a prompt become one
engine request with ``n`` samples, which share the prompt's KV blocks.

The engine wraps the trainer's own model object (no copy), so every rollout samples from the
current weights. Around each rollout the model is put in eval mode on ``"paged"`` attention and
then restored (training forwards keep their attention implementation), and the prefix cache is
dropped because its KV came from older weights. ``logprobs`` are log-softmax of the model's raw
logits (like vLLM's), i.e. the sampling distribution when ``temperature == 1``.
Use `make_rollout_func` to size the engine (``num_blocks``, ``max_num_seqs``...). Unlike other front
ends, the engine here keeps each layer's projections apart (``fuse_projections=False`` unless given).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import require

require("trl", "trl")

import torch  # noqa: E402

from ..engine import AsyncEngine, Engine, SamplingParams  # noqa: E402
from ..registration import ATTN_IMPLEMENTATION  # noqa: E402

__all__ = ["make_rollout_func", "rollout_func"]

_ENGINE_ATTR = "_hf_paged_engine"  # the trainer's `AsyncEngine` (its ``engine`` wraps the model)


def make_rollout_func(**engine_kwargs: Any) -> Callable[[list, Any], dict[str, list]]:
    """A ``rollout_func`` whose engine is built with ``engine_kwargs`` (see `Engine`)."""

    def rollout(prompts: list, trainer) -> dict[str, list]:
        return _rollout(prompts, trainer, engine_kwargs)

    rollout.__doc__ = rollout_func.__doc__
    return rollout


def rollout_func(prompts: list, trainer) -> dict[str, list]:
    """Generate one completion per prompt entry with the trainer's sampling settings (default engine)."""
    return _rollout(prompts, trainer, {})


def _rollout(prompts: list, trainer, engine_kwargs: dict) -> dict[str, list]:
    model = trainer.accelerator.unwrap_model(trainer.model)
    tokenizer = trainer.processing_class
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor's text tokenizer
    prompt_ids = [_encode(tokenizer, p, trainer) for p in prompts]
    params = _sampling_params(trainer)

    # Consecutive equal prompts (TRL repeats each num_generations times) -> one request with n samples.
    groups: list[tuple[list[int], int]] = []
    for ids in prompt_ids:
        if groups and groups[-1][0] == ids:
            groups[-1] = (ids, groups[-1][1] + 1)
        else:
            groups.append((ids, 1))

    was_training = model.training
    impl = getattr(model.config, "_attn_implementation", None)
    try:
        model.eval()
        if impl != ATTN_IMPLEMENTATION:
            model.set_attn_implementation(ATTN_IMPLEMENTATION)
        client = _client(trainer, model, engine_kwargs)
        # Blocks cached by earlier rollouts hold KV of earlier weights (nothing is in flight here).
        client.engine.reset_prefix_cache()
        outs = client.generate([ids for ids, _ in groups], [_with_n(params, n) for _, n in groups])
    finally:
        if impl != ATTN_IMPLEMENTATION and impl is not None:
            model.set_attn_implementation(impl)
        model.train(was_training)

    completion_ids: list[list[int]] = []
    logprobs: list[list[float]] = []
    for out in outs:
        if out.error is not None:
            raise RuntimeError(f"hf_paged rollout failed: {out.error}")
        for sample in out.samples:
            completion_ids.append(list(sample.token_ids))
            logprobs.append([lp for lp, _ in sample.logprobs])
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": logprobs}


def _client(trainer, model: torch.nn.Module, engine_kwargs: dict) -> AsyncEngine:
    """The engine client kept on the trainer, built on first use around ``model`` itself."""
    client = getattr(trainer, _ENGINE_ATTR, None)
    if client is None or client.engine.model is not model or not client.alive:
        if client is not None:
            client.shutdown()  # an engine of an older model object: free its KV pool
        # Projections stay apart unless asked for: fused, their parameters become views of one weight, which a
        # trainer that swaps parameter tensors (ZeRO, FSDP, load_state_dict(assign=True)) would leave behind.
        client = AsyncEngine(Engine(model, **{"fuse_projections": False, **engine_kwargs}), name="hf-paged-trl")
        setattr(trainer, _ENGINE_ATTR, client)
    return client


def _encode(tokenizer, prompt, trainer) -> list[int]:
    """Token ids of a plain-text or conversational prompt, as TRL tokenizes it."""
    if isinstance(prompt, list):  # conversational: a list of {"role", "content"} messages
        text = tokenizer.apply_chat_template(
            prompt, tokenize=False, add_generation_prompt=True, **(getattr(trainer, "chat_template_kwargs", None) or {})
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def _sampling_params(trainer) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=trainer.max_completion_length,
        temperature=float(trainer.temperature),
        top_p=float(trainer.top_p if trainer.top_p is not None else 1.0),
        top_k=int(trainer.top_k or 0),
        min_p=float(trainer.min_p or 0.0),
        repetition_penalty=float(trainer.repetition_penalty or 1.0),
        logprobs=0,
    )


def _with_n(params: SamplingParams, n: int) -> SamplingParams:
    from dataclasses import replace

    return replace(params, n=n)
