"""`generate_batch`: run a list of prompts through the model's `Engine` and return the outputs in order."""

from __future__ import annotations

from collections.abc import Sequence as SequenceABC

import torch

from ..cache.geometry import cdiv, default_num_blocks
from .engine import Engine
from .input_processor import Prompt, per_prompt
from .outputs import GenerationOutput
from .sampling_params import SamplingParams

__all__ = ["generate_batch", "release_engine"]

# Where generate_batch keeps its engine between calls (an attribute of the model).
_SLOT = "_hf_paged_engine"


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

    The engine (KV pool, CUDA graphs) stays with ``model`` for the next call, which reuses it
    when the tokenizer and options are the same and its pool is large enough; `release_engine`
    frees it.

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
    engine = _engine_for(model, tokenizer, prompts, sampling_params, engine_kwargs)
    return engine.generate(prompts, sampling_params, progress=progress)


def release_engine(model: torch.nn.Module) -> None:
    """Close the engine `generate_batch` keeps on ``model`` (its KV pool and graphs are freed now)."""
    slot = model.__dict__.pop(_SLOT, None)
    if slot is not None and slot.engine is not None:
        slot.engine.close()


class _EngineSlot:
    """The engine kept on a model; copies and pickles of the model get an empty slot."""

    __slots__ = ("engine", "options")

    def __init__(self, engine: Engine | None = None, options: dict | None = None) -> None:
        self.engine = engine
        self.options = options

    def __deepcopy__(self, memo) -> _EngineSlot:
        return _EngineSlot()

    def __reduce__(self):
        return (_EngineSlot, ())


def _engine_for(model, tokenizer, prompts, sampling_params, engine_kwargs: dict) -> Engine:
    """The engine kept on ``model`` when it serves this call as a new one would, else a new one."""
    options = dict(engine_kwargs)
    wanted = None
    if options.get("num_blocks") is None and options.get("memory_fraction") is None:
        options.pop("num_blocks", None)
        wanted = _blocks_for_batch(model, prompts, sampling_params, tokenizer, options)
    slot = model.__dict__.get(_SLOT)
    if slot is not None and slot.engine is not None:
        engine = slot.engine
        if (slot.options == options and engine.tokenizer is tokenizer and not engine.has_unfinished()
                and (wanted is None or engine.kv_pool.num_blocks >= wanted)):
            engine.reset_stats()
            return engine
        release_engine(model)
    engine = Engine(model, tokenizer=tokenizer, **options, **({"num_blocks": wanted} if wanted else {}))
    model.__dict__[_SLOT] = _EngineSlot(engine, options)
    return engine


def _blocks_for_batch(model, prompts, sampling_params, tokenizer, engine_kwargs) -> int:
    """Blocks holding every request at its full length at once (capped by the default pool)."""
    block_size = engine_kwargs.get("block_size", 16)
    total = 0
    for prompt, params in zip(prompts, per_prompt(sampling_params, len(prompts))):
        try:
            params = SamplingParams.coerce(params)
        except ValueError:
            continue
        if isinstance(prompt, str):
            length = len(tokenizer(prompt)["input_ids"]) if tokenizer is not None else 0
        else:
            length = len(prompt) if hasattr(prompt, "__len__") else 0
        # Each sample may copy the shared partial block once.
        total += params.n * (cdiv(length + params.max_new_tokens, block_size) + 1)
    cap = default_num_blocks(model, block_size, None, engine_kwargs.get("max_num_seqs", 256))
    return max(1, min(total, cap))
