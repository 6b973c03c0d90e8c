"""`generate_batch`: run a list of prompts through a fresh `Engine` and return the outputs in order."""

from __future__ import annotations

from collections.abc import Sequence as SequenceABC

import torch

from .engine import Engine, Prompt, default_num_blocks
from .outputs import GenerationOutput
from .sampling_params import SamplingParams

__all__ = ["generate_batch"]


def generate_batch(
    model: torch.nn.Module,
    prompts: SequenceABC[Prompt],
    sampling_params: SamplingParams | dict | SequenceABC[SamplingParams | dict] | None = None,
    *,
    tokenizer=None,
    progress: bool = True,
    **engine_kwargs,
) -> list[GenerationOutput]:
    """Generate for every prompt with continuous batching over a paged KV cache.

    Args:
        model: a decoder-only causal LM (switched to ``attn_implementation="paged"`` if needed).
        prompts: strings (need ``tokenizer``) or lists of token ids.
        sampling_params: one `SamplingParams` for all prompts, or a list with one per prompt.
        tokenizer: tokenizes string prompts, decodes ``text``, enables stop strings.
        progress: show a tqdm bar (requests done, output tokens/s).
        **engine_kwargs: `Engine` options (``num_blocks``, ``block_size``, ``memory_fraction``,
            ``max_num_seqs``, ``max_num_batched_tokens``, ``enable_prefix_caching``). Without
            ``num_blocks``/``memory_fraction`` the pool is sized for the whole batch at once,
            bounded by `Engine`'s default.

    Returns:
        One `GenerationOutput` per prompt, in input order. A bad prompt or parameter gives that
        prompt ``finish_reason="error"`` with a message in ``error``; the others complete.

    Example:
        >>> outs = generate_batch(model, [[1, 5, 9], [1, 7]], SamplingParams(max_new_tokens=8, temperature=0.0))  # doctest: +SKIP
        >>> outs[0].token_ids  # doctest: +SKIP
    """
    if engine_kwargs.get("num_blocks") is None and engine_kwargs.get("memory_fraction") is None:
        engine_kwargs["num_blocks"] = _blocks_for_batch(model, prompts, sampling_params, tokenizer, engine_kwargs)
    engine = Engine(model, tokenizer=tokenizer, **engine_kwargs)
    return engine.generate(prompts, sampling_params, progress=progress)


def _blocks_for_batch(model, prompts, sampling_params, tokenizer, engine_kwargs) -> int:
    """Blocks holding every request at its full length at once (capped by the default pool)."""
    block_size = engine_kwargs.get("block_size", 16)
    per_prompt = sampling_params if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(prompts)
    total = 0
    for prompt, params in zip(prompts, per_prompt):
        try:
            params = SamplingParams.coerce(params)
        except ValueError:
            continue
        if isinstance(prompt, str):
            length = len(tokenizer(prompt)["input_ids"]) if tokenizer is not None else 0
        else:
            length = len(prompt) if hasattr(prompt, "__len__") else 0
        # Each sample may copy the shared partial block once.
        total += params.n * (-(-(length + params.max_new_tokens) // block_size) + 1)
    cap = default_num_blocks(model, block_size, None, engine_kwargs.get("max_num_seqs", 256))
    return max(1, min(total, cap))
