"""Model geometry (layers, KV heads, head dim, context length) and KV pool sizing, in one place.

Everything here reads a model's (text) config or the device's free memory; nothing allocates.
"""

from __future__ import annotations

import torch

from .._intmath import cdiv
from .kv_pool import KVPool

__all__ = [
    "cdiv",
    "check_tensor_parallel",
    "config_kv_geometry",
    "default_num_blocks",
    "kv_geometry",
    "max_model_len",
    "num_blocks_for_memory",
    "tensor_parallel_size",
    "text_config",
]


def text_config(config):
    """The decoder's text config of ``config`` (itself for a text-only model).

    Example:
        >>> text_config(model.config).num_hidden_layers  # doctest: +SKIP
        32
    """
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def tensor_parallel_size(model: torch.nn.Module) -> int:
    """How many ranks Transformers sharded ``model`` over (``model.tp_size``; 1 when not sharded).

    Example:
        >>> tensor_parallel_size(torch.nn.Linear(2, 2))
        1
    """
    size = getattr(model, "tp_size", None) or getattr(model, "_tp_size", None)
    return int(size) if size else 1


def config_kv_geometry(config) -> tuple[int, int, int]:
    """``(num_layers, num_kv_heads, head_dim)`` of an unsharded model of ``config``.

    Example:
        >>> config_kv_geometry(LlamaConfig(num_hidden_layers=2, num_key_value_heads=2))  # doctest: +SKIP
        (2, 2, 128)
    """
    text = text_config(config)
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return text.num_hidden_layers, _kv_heads(text), head_dim


def kv_geometry(model: torch.nn.Module) -> tuple[int, int, int]:
    """``(num_layers, KV heads on this rank, head_dim)`` of ``model``, after tensor-parallel sharding.

    Example:
        >>> kv_geometry(model)  # doctest: +SKIP
        (2, 2, 16)
    """
    num_layers, kv_heads, head_dim = config_kv_geometry(model.config)
    tp = tensor_parallel_size(model)
    check_tensor_parallel(model.config, tp)
    return num_layers, kv_heads // tp, head_dim


def check_tensor_parallel(config, tp_size: int) -> None:
    """Raise ``ValueError`` unless Transformers can shard a model of ``config`` over ``tp_size`` ranks.

    Checks that the architecture has a tensor-parallel plan (``base_model_tp_plan``) and that both
    the attention heads and the KV heads split evenly (hf_paged does not replicate KV heads).

    Example:
        >>> check_tensor_parallel(config, 1)  # any model runs on one rank  # doctest: +SKIP
    """
    if not isinstance(tp_size, int) or isinstance(tp_size, bool) or tp_size < 1:
        raise ValueError(f"the tensor-parallel size must be a positive int, got {tp_size!r}")
    if tp_size == 1:
        return
    text = text_config(config)
    model_type = getattr(text, "model_type", type(text).__name__)
    if not getattr(text, "base_model_tp_plan", None):
        raise ValueError(
            f"{model_type} has no tensor-parallel plan (its config's base_model_tp_plan is empty), so "
            f"Transformers cannot shard it over {tp_size} ranks; run it on one device per replica instead "
            f"(hf_paged.integrations.ray)"
        )
    heads, kv_heads = text.num_attention_heads, _kv_heads(text)
    for name, value in (("num_attention_heads", heads), ("num_key_value_heads", kv_heads)):
        if value % tp_size:
            raise ValueError(
                f"{model_type} has {name}={value}, not divisible by the tensor-parallel size {tp_size}: "
                f"use a size that divides both num_attention_heads={heads} and num_key_value_heads={kv_heads}"
            )


def max_model_len(model: torch.nn.Module) -> int | None:
    """The model's ``max_position_embeddings`` (of its text config), if it has one.

    Example:
        >>> max_model_len(model)  # doctest: +SKIP
        2048
    """
    return getattr(text_config(model.config), "max_position_embeddings", None)


def num_blocks_for_memory(fraction: float, device: torch.device | str, bytes_per_block: int) -> int:
    """How many blocks fit in ``fraction`` of the memory now free on ``device`` (at least 1). On CUDA that
    counts what this process's allocator holds unused (tensors freed since loading, such as the weights
    `hf_paged.fused_projections` replaced), which it gives back when a larger allocation needs it.

    Example:
        >>> num_blocks_for_memory(0.5, "cpu", 2**20) > 0
        True
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"memory_fraction must be in (0, 1], got {fraction}")
    device = torch.device(device)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    else:
        import psutil

        free = psutil.virtual_memory().available
    return max(1, int(free * fraction) // bytes_per_block)


def default_num_blocks(
    model: torch.nn.Module, block_size: int = 16, memory_fraction: float | None = None, max_num_seqs: int = 256
) -> int:
    """The pool size `Engine` picks for ``model`` when given no ``num_blocks``.

    ``memory_fraction`` (default 0.9 on CUDA) of the device's free memory; on CPU without a fraction,
    room for ``max_num_seqs`` sequences of ``max_position_embeddings`` within a quarter of free RAM.

    Example:
        >>> default_num_blocks(model, block_size=16, max_num_seqs=8)  # doctest: +SKIP
        1024
    """
    num_layers, num_kv_heads, head_dim = kv_geometry(model)
    param = next(model.parameters())
    per_block = KVPool.bytes_per_block(num_layers, block_size, num_kv_heads, head_dim, param.dtype)
    if memory_fraction is not None or param.device.type == "cuda":
        return num_blocks_for_memory(memory_fraction or 0.9, param.device, per_block)
    wanted = max_num_seqs * cdiv(max_model_len(model) or 4096, block_size)
    return min(wanted, num_blocks_for_memory(0.25, param.device, per_block))


def _kv_heads(text) -> int:
    return getattr(text, "num_key_value_heads", None) or text.num_attention_heads
