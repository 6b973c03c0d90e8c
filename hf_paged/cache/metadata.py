"""Per-step attention metadata, and how a cache hands it to the attention function."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from ..kernels import get_backend

__all__ = ["PagedAttentionMetadata", "flush_published", "publish", "take_published"]


@dataclass
class PagedAttentionMetadata:
    """Everything a paged-attention kernel needs for one forward step (all layers share it).

    Attributes:
        slot_mapping: ``[T]`` int64 slot of each new token (``-1``: store nothing).
        cu_seqlens_q: ``[S + 1]`` int32 start of each sequence's queries in the packed batch.
        context_lens: ``[S]`` int32 keys per sequence, this step's tokens included.
        block_tables: ``[S, max_blocks]`` int32 block ids per sequence (unused entries arbitrary).
        max_seqlen_q: longest query run of the step (host int, for launch sizes).
        max_context_len: longest ``context_lens`` entry (host int).
        kv_start: ``[S]`` int32 first visible key per sequence (left padding), or ``None``.
        static_grid: size kernel launches from shapes alone, for CUDA graphs of steps whose query
            lengths vary (only backends with ``supports_static_grid`` are asked for it).
    """

    slot_mapping: torch.Tensor
    cu_seqlens_q: torch.Tensor
    context_lens: torch.Tensor
    block_tables: torch.Tensor
    max_seqlen_q: int
    max_context_len: int
    kv_start: torch.Tensor | None = None
    static_grid: bool = False


_published = threading.local()


def publish(k_cache: torch.Tensor, v_cache: torch.Tensor, metadata: PagedAttentionMetadata,
            key: torch.Tensor | None = None, value: torch.Tensor | None = None) -> None:
    """Called by a cache's ``update``: the next attention call on ``k_cache`` uses ``metadata``, and stores the
    step's ``key``/``value`` (``[T, Hkv, D]``, at ``metadata.slot_mapping``) where given.

    Transformers (before 5.24) gives the attention function no handle on the cache, but always calls
    it right after ``update`` on the same layer, with the tensors ``update`` returned. Handing the keys over
    lets a backend store them inside its attention launch. The caller flushes first (`flush_published`): keys
    an earlier update handed over and no attention call took are stored before its blocks change.
    """
    _published.value = (k_cache, v_cache, metadata, key, value)


def take_published(k_cache: torch.Tensor) -> tuple[PagedAttentionMetadata, torch.Tensor | None, torch.Tensor | None] | None:
    """``(metadata, key, value)`` published for ``k_cache`` (a layer's key pool; ``key``/``value`` still to be
    stored, or ``None``), or ``None`` when ``k_cache`` is dense keys."""
    entry = getattr(_published, "value", None)
    if entry is None or entry[0] is not k_cache:
        return None
    _published.value = None
    return entry[2], entry[3], entry[4]


def flush_published() -> None:
    """Store the keys/values an ``update`` handed over that no attention call took (a cache read or changed
    between the two, or an attention function other than ``"paged"``)."""
    entry = getattr(_published, "value", None)
    if entry is None or entry[3] is None:
        return
    k_cache, v_cache, metadata, key, value = entry
    _published.value = (k_cache, v_cache, metadata, None, None)
    get_backend(key.device, key.dtype).store_kv(key, value, k_cache, v_cache, metadata.slot_mapping)
