"""The ``"paged"`` attention function Transformers calls in every attention layer, and its mask hook."""

from __future__ import annotations

import weakref

import torch

from .cache.metadata import PagedAttentionMetadata, take_published
from .kernels import get_backend

__all__ = ["paged_attention_forward", "paged_mask"]


def paged_mask(*, attention_mask: torch.Tensor | None = None, kv_length: int, **kwargs) -> torch.Tensor | None:
    """Mask hook: keep the 2D padding mask as it is, never build a dense ``[B, 1, Q, K]`` mask.

    The kernels apply causality and sliding windows themselves and turn left padding into a
    per-sequence first visible key.
    """
    if attention_mask is None:
        return None
    return attention_mask[:, -kv_length:].bool()


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Paged attention for the three ways Transformers may call it.

    * Engine step: the caller passed ``paged_metadata=`` and ``paged_kv=`` (a `KVPool`) as forward
      kwargs, ``query`` is one packed ``[1, H, T, D]`` batch; the new keys/values are stored here.
    * `PagedCache` step: ``key``/``value`` are the layer's block pools its ``update`` returned; the step's
      keys/values it handed over are stored here, as in an engine step.
    * Anything else (a plain forward, a ``DynamicCache``): dense keys, viewed as one block per
      sequence so the same kernel serves them.

    ``query`` is ``[B, H, Q, D]``; returns ``([B, Q, H, D], None)`` as Transformers expects.
    """
    _check_supported(module, dropout)
    batch, num_heads, q_len, head_dim = query.shape
    metadata = kwargs.get("paged_metadata")
    query = query.transpose(1, 2).reshape(batch * q_len, num_heads, head_dim)
    scale = scaling if scaling is not None else head_dim**-0.5
    window = -1 if sliding_window is None else sliding_window
    softcap = 0.0 if softcap is None else softcap
    if metadata is not None:  # an engine step: its new keys/values are stored by the attention call below
        hkv = key.shape[1]
        step_key = key[0].transpose(0, 1).reshape(-1, hkv, head_dim)
        step_value = value[0].transpose(0, 1).reshape(-1, hkv, head_dim)
        # Under torch.compile one opaque op over the whole pool, its layer an argument: the compiler fuses
        # the layer's other work around it, and every decoder layer shares one compiled graph. Eager calls
        # skip the dispatcher.
        attend = _pool_attention_op if torch.compiler.is_compiling() else _pool_attention
        m = metadata
        out = attend(
            query, step_key, step_value, kwargs["paged_kv"].storage, module.layer_idx, m.slot_mapping,
            m.cu_seqlens_q, m.context_lens, m.block_tables, m.kv_start, scale, window, softcap, m.max_seqlen_q,
            m.max_context_len, m.static_grid,
        )
        return out.view(batch, q_len, num_heads, head_dim), None
    published = take_published(key)  # a `PagedCache` step (its `update` handed over the new keys), else dense keys
    if published is None:
        step_key = step_value = None
        key, value, metadata = _dense_as_paged(key, value, batch, q_len)
    else:
        metadata, step_key, step_value = published
    if metadata.kv_start is None and attention_mask is not None:
        metadata.kv_start = _left_padding(attention_mask, metadata.max_context_len, check=metadata.max_seqlen_q > 1)
    out = _attention(
        query, step_key, step_value, key, value, metadata.slot_mapping, metadata.cu_seqlens_q,
        metadata.context_lens, metadata.block_tables, metadata.kv_start, scale, window, softcap,
        metadata.max_seqlen_q, metadata.max_context_len, metadata.static_grid,
    )
    return out.view(batch, q_len, num_heads, head_dim), None


def _attention(
    query: torch.Tensor, key: torch.Tensor | None, value: torch.Tensor | None, k_cache: torch.Tensor,
    v_cache: torch.Tensor, slot_mapping: torch.Tensor, cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
    block_tables: torch.Tensor, kv_start: torch.Tensor | None, scale: float, sliding_window: int, softcap: float,
    max_seqlen_q: int, max_context_len: int, static_grid: bool,
) -> torch.Tensor:
    """Store ``key``/``value`` (``[T, Hkv, D]``; ``None``: stored already) at ``slot_mapping``, then
    attend the ``[T, H, D]`` queries over the paged cache; ``-1``/``0.0``: no window/soft-cap."""
    backend = get_backend(query.device, query.dtype)
    extra = {"static_grid": True} if static_grid else {}
    if key is not None:
        if getattr(backend, "stores_step_kv", False):  # in its attention launch, or reading them without the pages
            extra.update(key=key, value=value, slot_mapping=slot_mapping)
        else:
            backend.store_kv(key, value, k_cache, v_cache, slot_mapping)
    return backend.paged_attention(
        query, k_cache, v_cache, cu_seqlens_q=cu_seqlens_q, context_lens=context_lens, block_tables=block_tables,
        kv_start=kv_start, scale=scale, sliding_window=None if sliding_window < 0 else sliding_window,
        softcap=softcap or None, max_seqlen_q=max_seqlen_q, max_context_len=max_context_len, **extra,
    )


def _pool_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv: torch.Tensor, layer: int,
    slot_mapping: torch.Tensor, cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, block_tables: torch.Tensor,
    kv_start: torch.Tensor | None, scale: float, sliding_window: int, softcap: float, max_seqlen_q: int,
    max_context_len: int, static_grid: bool,
) -> torch.Tensor:
    """`_attention` on layer ``layer`` of a `KVPool`'s storage ``kv`` (``[L, 2, blocks, ...]``): an engine
    step. As the op torch.compile sees, the layer is an argument rather than a constant so that the
    compiled code of one decoder layer serves all of them (the engine makes module ints dynamic)."""
    return _attention(query, key, value, kv[layer, 0], kv[layer, 1], slot_mapping, cu_seqlens_q, context_lens,
                      block_tables, kv_start, scale, sliding_window, softcap, max_seqlen_q, max_context_len,
                      static_grid)


_pool_attention_op = torch.library.custom_op("hf_paged::pool_attention", mutates_args=("kv",))(_pool_attention)


@_pool_attention_op.register_fake
def _(query, key, value, kv, layer, slot_mapping, cu_seqlens_q, context_lens, block_tables, kv_start,
      scale, sliding_window, softcap, max_seqlen_q, max_context_len, static_grid):
    return torch.empty_like(query)


# Eager calls check each module once (its attribute misses cost microseconds, every layer and token); traced code
# checks every time, which costs nothing at run time and keeps the set out of the compiler's guards.
_supported_modules: weakref.WeakSet = weakref.WeakSet()


def _check_supported(module: torch.nn.Module, dropout: float) -> None:
    if dropout:
        raise NotImplementedError("attention dropout is not supported by 'paged' (use it for inference, in eval mode)")
    compiling = torch.compiler.is_compiling()
    if not compiling and module in _supported_modules:
        return
    if not getattr(module, "is_causal", True):
        raise NotImplementedError(
            f"attn_implementation='paged' supports causal decoder self-attention only; "
            f"{type(module).__name__} is not causal"
        )
    if getattr(module, "sinks", None) is not None:
        raise NotImplementedError(f"attention sinks ({type(module).__name__}.sinks) are not supported by 'paged'")
    if not compiling:
        _supported_modules.add(module)


def _dense_as_paged(
    key: torch.Tensor, value: torch.Tensor, batch: int, q_len: int
) -> tuple[torch.Tensor, torch.Tensor, PagedAttentionMetadata]:
    kv_len, device = key.shape[2], key.device
    # [B, Hkv, K, D] -> [B, K, Hkv, D]: each sequence is one block of size K.
    k_cache = key.transpose(1, 2).contiguous()
    v_cache = value.transpose(1, 2).contiguous()
    metadata = PagedAttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.long, device=device),
        cu_seqlens_q=torch.arange(0, (batch + 1) * q_len, q_len, dtype=torch.int32, device=device),
        context_lens=torch.full((batch,), kv_len, dtype=torch.int32, device=device),
        block_tables=torch.arange(batch, dtype=torch.int32, device=device)[:, None],
        max_seqlen_q=q_len,
        max_context_len=kv_len,
    )
    return k_cache, v_cache, metadata


def _left_padding(attention_mask: torch.Tensor, kv_len: int, check: bool) -> torch.Tensor:
    """First visible key per row of a 2D left-padding mask; ``check``: raise for any other mask.

    Checking reads the mask on the host, a device sync (the H100 machine's host: 90-140 us a step checked,
    40-60 unchecked), which one-token steps skip: their mask is the checked prompt mask plus the columns
    ``generate`` appends, which it always marks visible.
    """
    if attention_mask.dim() != 2:
        raise NotImplementedError(
            f"attn_implementation='paged' takes 2D padding masks, got a {attention_mask.dim()}D mask"
        )
    mask = attention_mask[:, -kv_len:].bool()
    start = mask.shape[1] - mask.sum(dim=1)
    if not check:
        return start.to(torch.int32)
    positions = torch.arange(mask.shape[1], device=mask.device)
    if not torch.equal(mask, positions[None, :] >= start[:, None]):
        raise NotImplementedError(
            "attn_implementation='paged' supports left padding only; the attention mask has gaps or right "
            "padding (use tokenizer.padding_side='left')"
        )
    return start.to(torch.int32)
