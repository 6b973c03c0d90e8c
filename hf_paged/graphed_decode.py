"""CUDA graphs for the one-token steps of ``model.generate`` on a `PagedCache`.

``generate`` runs every decode step through Transformers' per-layer Python, which at small batches costs the
host more than the step costs the GPU (on the H100 machines' hosts, ~0.7 ms a layer against ~0.1 ms of device
time). On CUDA a `PagedCache`'s one-token steps instead replay a graph of the whole forward: the engine's
`DecodeGraphs` (the packed forward the engine makes, the step's metadata passed as forward kwargs), captured
at the first such step over the cache's pool and kept with the cache. Only the cache's block bookkeeping runs
on the host. `hf_paged.registration` routes ``generate``'s decode calls here; ``generate(...,
disable_compile=True)`` keeps them eager, as it keeps Transformers' own compiled decoding off.
"""

from __future__ import annotations

import logging

import torch

from .attention import _left_padding
from .cache import PagedCache
from .cache.geometry import max_model_len
from .cuda_graphs import DecodeGraphs, packed_forward_mask

__all__ = ["decode_logits", "supported"]

logger = logging.getLogger(__name__)

# Set on a model whose forward failed to capture: its steps run eagerly from then on.
_UNCAPTURABLE = "_hf_paged_uncapturable"

# Inputs of a one-token step that the graphed forward reproduces; a step with anything else set runs eagerly.
_HANDLED = frozenset({"input_ids", "position_ids", "attention_mask", "past_key_values", "cache", "use_cache",
                      "return_dict", "logits_to_keep", "cache_position"})


def supported(model: torch.nn.Module) -> bool:
    """Whether ``model``'s one-token ``generate`` steps may replay graphs: on one CUDA device (the current one,
    where graphs are captured), not tensor-parallel, and its forward not found uncapturable before."""
    device = model.device
    if device.type != "cuda" or device.index not in (None, torch.cuda.current_device()):
        return False
    if getattr(model, _UNCAPTURABLE, False):
        return False
    return len(set(getattr(model, "hf_device_map", {}).values())) <= 1 and getattr(model, "tp_size", None) in (None, 1)


def decode_logits(model: torch.nn.Module, cache: PagedCache, inputs: dict) -> torch.Tensor | None:
    """The ``[B, V]`` logits of the one-token step ``inputs`` (``model``'s forward kwargs), replayed from the
    graph of ``cache``; ``None`` when the step must run eagerly (more than one token, inputs the graph does not
    reproduce, a sequence longer than the graph's context). Call it in inference mode."""
    ids = inputs.get("input_ids")
    if ids is None or ids.dim() != 2 or ids.shape[1] != 1 or cache.pool is None or cache.batch_size != ids.shape[0]:
        return None
    if any(v is not None and v is not False for k, v in inputs.items() if k not in _HANDLED):
        return None
    batch = ids.shape[0]
    graphs = _graphs(model, cache, batch, cache.get_seq_length() + 1)
    if graphs is None:
        return None
    new_len, slots, tables = cache._begin_graphed_step(batch)
    mask = inputs.get("attention_mask")
    kv_start = _left_padding(mask, new_len, check=False) if mask is not None else None
    positions = inputs.get("position_ids")
    if positions is not None:
        positions = positions[:, -1]
    else:
        positions = torch.full((batch,), new_len - 1, device=ids.device)
        if kv_start is not None:
            positions -= kv_start
    context_lens = torch.full((batch,), new_len, dtype=torch.int32)
    return graphs.run(ids[:, -1], positions, slots, context_lens, tables, kv_start=kv_start)


def _graphs(model: torch.nn.Module, cache: PagedCache, batch: int, new_len: int) -> DecodeGraphs | None:
    """``cache``'s graphs with the bucket of ``batch`` captured (built at the first step that needs them), or
    ``None`` when a sequence of ``new_len`` tokens is longer than they can attend over."""
    if getattr(model, _UNCAPTURABLE, False):
        return None
    graphs = cache._decode_graphs
    if graphs is None or graphs.buckets[-1] < batch or graphs.model is not model:
        pool = cache.pool
        capacity = pool.num_blocks * pool.block_size
        # What this generate call may reach (its max_length), else what the model or the pool allows.
        max_context = min(capacity, cache._max_cache_len or max_model_len(model) or capacity)
        graphs = cache._decode_graphs = DecodeGraphs(model, pool, max_batch=batch, max_context=max_context,
                                                     mask=packed_forward_mask(pool.device))
    if not graphs.fits(batch, new_len):
        return None
    if not graphs.captured(batch):
        try:
            graphs.capture(batch)
        except RuntimeError as e:  # e.g. a host sync in the model's forward: not capturable
            logger.warning("%s's one-token generate steps cannot be captured in a CUDA graph (%s); they run eagerly",
                           type(model).__name__, e)
            setattr(model, _UNCAPTURABLE, True)
            cache._decode_graphs = None
            return None
    return graphs
