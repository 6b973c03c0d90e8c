"""The ``"paged"`` attention function Transformers calls in every attention layer, and its mask hook."""

from __future__ import annotations

import torch

from .cache.kv_pool import KVPool
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
    * `PagedCache` step: ``key``/``value`` are the layer's block pools its ``update`` returned.
    * Anything else (a plain forward, a ``DynamicCache``): dense keys, viewed as one block per
      sequence so the same kernel serves them.

    ``query`` is ``[B, H, Q, D]``; returns ``([B, Q, H, D], None)`` as Transformers expects.
    """
    _check_supported(module, dropout)
    batch, num_heads, q_len, head_dim = query.shape
    metadata = kwargs.get("paged_metadata")
    scale = scaling if scaling is not None else head_dim**-0.5
    if metadata is not None and torch.compiler.is_compiling():
        # Under torch.compile the step is one opaque op, so the compiler fuses the layer's other work around it.
        k_cache, v_cache = kwargs["paged_kv"].layer(module.layer_idx)
        hkv = key.shape[1]
        out = torch.ops.hf_paged.step_attention(
            query.transpose(1, 2).reshape(batch * q_len, num_heads, head_dim),
            key[0].transpose(0, 1).reshape(-1, hkv, head_dim),
            value[0].transpose(0, 1).reshape(-1, hkv, head_dim), k_cache, v_cache, metadata.slot_mapping,
            metadata.cu_seqlens_q, metadata.context_lens, metadata.block_tables, metadata.kv_start, scale,
            -1 if sliding_window is None else sliding_window, 0.0 if softcap is None else softcap,
            metadata.max_seqlen_q, metadata.max_context_len, metadata.static_grid,
        )
        return out.view(batch, q_len, num_heads, head_dim), None
    if metadata is not None:
        key, value = _store_step(kwargs["paged_kv"], module.layer_idx, key, value, metadata)
    else:
        metadata = take_published(key)
    if metadata is None:
        key, value, metadata = _dense_as_paged(key, value, batch, q_len)
    if metadata.kv_start is None and attention_mask is not None:
        metadata.kv_start = _left_padding(attention_mask, metadata.max_context_len)
    q = query.transpose(1, 2).reshape(batch * q_len, num_heads, head_dim)
    out = get_backend(q.device, q.dtype).paged_attention(
        q,
        key,
        value,
        cu_seqlens_q=metadata.cu_seqlens_q,
        context_lens=metadata.context_lens,
        block_tables=metadata.block_tables,
        kv_start=metadata.kv_start,
        scale=scale,
        sliding_window=sliding_window,
        softcap=softcap,
        max_seqlen_q=metadata.max_seqlen_q,
        max_context_len=metadata.max_context_len,
        **({"static_grid": True} if metadata.static_grid else {}),
    )
    return out.view(batch, q_len, num_heads, head_dim), None


@torch.library.custom_op("hf_paged::step_attention", mutates_args=("k_cache", "v_cache"))
def _step_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor, cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, block_tables: torch.Tensor,
    kv_start: torch.Tensor | None, scale: float, sliding_window: int, softcap: float, max_seqlen_q: int,
    max_context_len: int, static_grid: bool,
) -> torch.Tensor:
    """An engine step's attention as one op (what `torch.compile` sees): store the step's ``[T, Hkv, D]``
    keys/values at ``slot_mapping``, attend the ``[T, H, D]`` queries; ``-1``/``0.0``: no window/soft-cap."""
    backend = get_backend(query.device, query.dtype)
    backend.store_kv(key, value, k_cache, v_cache, slot_mapping)
    return backend.paged_attention(
        query, k_cache, v_cache, cu_seqlens_q=cu_seqlens_q, context_lens=context_lens, block_tables=block_tables,
        kv_start=kv_start, scale=scale, sliding_window=None if sliding_window < 0 else sliding_window,
        softcap=softcap or None, max_seqlen_q=max_seqlen_q, max_context_len=max_context_len,
        **({"static_grid": True} if static_grid else {}),
    )


@_step_attention.register_fake
def _(query, key, value, k_cache, v_cache, slot_mapping, cu_seqlens_q, context_lens, block_tables, kv_start,
      scale, sliding_window, softcap, max_seqlen_q, max_context_len, static_grid):
    return torch.empty_like(query)


def _check_supported(module: torch.nn.Module, dropout: float) -> None:
    if not getattr(module, "is_causal", True):
        raise NotImplementedError(
            f"attn_implementation='paged' supports causal decoder self-attention only; "
            f"{type(module).__name__} is not causal"
        )
    if getattr(module, "sinks", None) is not None:
        raise NotImplementedError(f"attention sinks ({type(module).__name__}.sinks) are not supported by 'paged'")
    if dropout:
        raise NotImplementedError("attention dropout is not supported by 'paged' (use it for inference, in eval mode)")


def _store_step(
    kv_pool: KVPool, layer_idx: int, key: torch.Tensor, value: torch.Tensor, metadata: PagedAttentionMetadata
) -> tuple[torch.Tensor, torch.Tensor]:
    k_cache, v_cache = kv_pool.layer(layer_idx)
    hkv, head_dim = key.shape[1], key.shape[3]
    get_backend(key.device, key.dtype).store_kv(
        key[0].transpose(0, 1).reshape(-1, hkv, head_dim),
        value[0].transpose(0, 1).reshape(-1, hkv, head_dim),
        k_cache,
        v_cache,
        metadata.slot_mapping,
    )
    return k_cache, v_cache


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


def _left_padding(attention_mask: torch.Tensor, kv_len: int) -> torch.Tensor:
    """First visible key per row of a 2D left-padding mask (raises for any other mask)."""
    if attention_mask.dim() != 2:
        raise NotImplementedError(
            f"attn_implementation='paged' takes 2D padding masks, got a {attention_mask.dim()}D mask"
        )
    mask = attention_mask[:, -kv_len:].bool()
    start = mask.shape[1] - mask.sum(dim=1)
    positions = torch.arange(mask.shape[1], device=mask.device)
    if not torch.equal(mask, positions[None, :] >= start[:, None]):
        raise NotImplementedError(
            "attn_implementation='paged' supports left padding only; the attention mask has gaps or right "
            "padding (use tokenizer.padding_side='left')"
        )
    return start.to(torch.int32)
