"""Registers ``"paged"`` with Transformers and gives ``generate`` a `PagedCache` by default."""

from __future__ import annotations

import functools

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.generation.utils import GenerationMixin
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_outputs import CausalLMOutputWithPast

from . import graphed_decode
from .attention import paged_attention_forward, paged_mask
from .cache import PagedCache

__all__ = ["ATTN_IMPLEMENTATION", "register"]

ATTN_IMPLEMENTATION = "paged"


def register() -> None:
    """Make ``attn_implementation="paged"`` available process-wide (idempotent).

    Registers the attention function and its mask hook, and wraps
    ``GenerationMixin._prepare_cache_for_generation`` so that ``generate`` on a model set to
    ``"paged"`` builds a `PagedCache` when the caller passed no cache. On CUDA, ``generate``'s one-token
    steps on a `PagedCache` then replay CUDA graphs (`hf_paged.graphed_decode`; ``disable_compile=True``
    keeps them eager): the two methods through which ``generate`` picks its decode-step forward are wrapped
    too. Called on ``import hf_paged``.

    Example:
        >>> import hf_paged
        >>> hf_paged.register()  # already done by the import; harmless again
    """
    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, paged_mask)
    for owner, name, wrap in (
        (GenerationMixin, "_prepare_cache_for_generation", _with_paged_cache),
        (GenerationMixin, "_prefill", _with_fresh_start),
        (GenerationMixin, "_valid_auto_compile_criteria", _with_graphed_decode),
        (PreTrainedModel, "get_compiled_call", _with_graphed_forward),
    ):
        original = getattr(owner, name)
        if not getattr(original, "_hf_paged", False):
            wrapped = wrap(original)
            wrapped._hf_paged = True
            setattr(owner, name, wrapped)


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

    return prepare


def _with_fresh_start(original):
    """Make a `PagedCache` reused for a new prompt start fresh, as a new ``generate`` call expects.

    A cache that already holds tokens is kept only when the incoming ``input_ids`` continue what it
    holds (longer than the cache and beginning with the prompt it was filled from, same batch);
    otherwise it is reset before the prefill. Assistant models (``is_first_iteration=False``)
    continue their cache by design and are left alone.
    """

    @functools.wraps(original)
    def prefill(self, input_ids, generation_config, model_kwargs, is_first_iteration=True, *args, **kw):
        cache = model_kwargs.get(_cache_kwarg(model_kwargs))
        if isinstance(cache, PagedCache) and is_first_iteration and input_ids is not None:
            if cache.get_seq_length() > 0 and not cache._continues(input_ids):
                cache.reset()
                position_ids = model_kwargs.get("position_ids")
                if (
                    position_ids is not None
                    and model_kwargs.get("attention_mask") is None
                    and position_ids.shape[-1] != input_ids.shape[1]
                ):
                    # generate derived them from the stale cache length
                    model_kwargs["position_ids"] = position_ids[..., -input_ids.shape[1]:] - (
                        position_ids.shape[-1] - input_ids.shape[1]
                    )
            if cache.get_seq_length() == 0:
                cache._prompt_ids = input_ids.detach().clone()
        return original(self, input_ids, generation_config, model_kwargs, is_first_iteration, *args, **kw)

    return prefill


def _with_graphed_decode(original):
    """``generate`` asks this whether to take its decode-step forward from ``get_compiled_call``: yes for a
    `PagedCache` where graphs can run, unless the caller set ``disable_compile``."""

    @functools.wraps(original)
    def criteria(self, model_kwargs, generation_config):
        cache = model_kwargs.get(_cache_kwarg(model_kwargs))
        if isinstance(cache, PagedCache) and not generation_config.disable_compile and graphed_decode.supported(self):
            return True
        return original(self, model_kwargs, generation_config)

    return criteria


def _with_graphed_forward(original):
    """On a ``"paged"`` model, the decode-step forward ``generate`` gets replays `PagedCache` graphs; steps the
    graphs do not cover run eagerly, and other caches keep Transformers' compiled call."""

    @functools.wraps(original)
    def get_compiled_call(self, compile_config):
        if self.config._attn_implementation != ATTN_IMPLEMENTATION:
            return original(self, compile_config)
        return functools.partial(_graphed_forward, self, functools.partial(original, self, compile_config))

    return get_compiled_call


def _graphed_forward(model, compiled_call, **inputs):
    name = _cache_kwarg(inputs)
    cache = inputs.get(name)
    if not isinstance(cache, PagedCache):
        return compiled_call()(**inputs)
    with torch.inference_mode():
        logits = graphed_decode.decode_logits(model, cache, inputs)
    if logits is None:
        return model(**inputs)
    return CausalLMOutputWithPast(logits=logits[:, None], **{name: cache})
