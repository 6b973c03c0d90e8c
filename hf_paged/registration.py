"""Registers ``"paged"`` with Transformers and gives ``generate`` a `PagedCache` by default."""

from __future__ import annotations

import functools

from transformers import AttentionInterface
from transformers.generation.utils import GenerationMixin
from transformers.masking_utils import AttentionMaskInterface

from .attention import paged_attention_forward, paged_mask
from .cache import PagedCache

__all__ = ["ATTN_IMPLEMENTATION", "register"]

ATTN_IMPLEMENTATION = "paged"


def register() -> None:
    """Make ``attn_implementation="paged"`` available process-wide (idempotent).

    Registers the attention function and its mask hook, and wraps
    ``GenerationMixin._prepare_cache_for_generation`` so that ``generate`` on a model set to
    ``"paged"`` builds a `PagedCache` when the caller passed no cache. Called on ``import hf_paged``.

    Example:
        >>> import hf_paged
        >>> hf_paged.register()  # already done by the import; harmless again
    """
    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, paged_mask)
    original = GenerationMixin._prepare_cache_for_generation
    if not getattr(original, "_hf_paged", False):
        GenerationMixin._prepare_cache_for_generation = _with_paged_cache(original)


def _cache_kwarg(model_kwargs: dict) -> str:
    # Transformers 5.24 renamed generate's cache slot from "past_key_values" to "cache".
    from transformers.generation.utils import ALL_CACHE_NAMES

    return "cache" if "cache" in ALL_CACHE_NAMES else "past_key_values"


def _with_paged_cache(original):
    @functools.wraps(original)
    def prepare(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length, *args, **kw):
        name = _cache_kwarg(model_kwargs)
        wants_paged = (
            self.config._attn_implementation == ATTN_IMPLEMENTATION
            and model_kwargs.get(name) is None
            and generation_config.use_cache is not False
            and generation_config.cache_implementation is None
        )
        if not wants_paged:
            return original(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length, *args, **kw)
        if self.config.is_encoder_decoder:
            raise NotImplementedError(
                f"attn_implementation='paged' supports decoder-only models; {type(self).__name__} is encoder-decoder"
            )
        cache = PagedCache(self.config, max_cache_len=max_cache_length, tp_size=getattr(self, "tp_size", None))
        model_kwargs[name] = cache
        result = original(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length, *args, **kw)
        # The cache is ours, not the caller's: generate need not keep it alive for them.
        cache._is_user_defined = False
        return result

    prepare._hf_paged = True
    return prepare
