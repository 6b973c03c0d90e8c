"""Choosing a kernel backend: built-in plugins plus those published under ``hf_paged.plugins``.

Every plugin may offer a backend for a device/dtype; the first offer wins, installed plugins offer
before the built-in backends and the torch reference offers last. Set ``HF_PAGED_BACKEND=<name>``
to pick a specific backend among the offers.
"""

from __future__ import annotations

import functools
import os
from typing import Protocol

import pluggy
import torch

from ..plugins import plugin_manager
from . import reference

__all__ = ["KernelBackend", "get_backend"]


class KernelBackend(Protocol):
    """What a kernel backend provides; `hf_paged.kernels.reference` defines the semantics."""

    name: str

    def store_kv(self, key, value, k_cache, v_cache, slot_mapping) -> None: ...

    def paged_attention(self, query, k_cache, v_cache, **metadata) -> torch.Tensor: ...


@functools.cache
def _builtins() -> tuple:
    try:
        from . import triton_backend
    except ImportError:  # no triton here: the reference serves
        return (reference,)
    return (triton_backend, reference)


def _manager() -> pluggy.PluginManager:
    """`plugin_manager` with the built-in backends registered on it (once; the entry points may hold one)."""
    pm = plugin_manager()
    for module in _builtins():
        if not pm.is_registered(module) and pm.get_plugin(module.name) is None:
            pm.register(module, name=module.name)
    return pm


@functools.cache
def get_backend(device: torch.device, dtype: torch.dtype) -> KernelBackend:
    """The backend for tensors of ``dtype`` on ``device`` (``HF_PAGED_BACKEND`` may name one).

    Example:
        >>> get_backend(torch.device("cpu"), torch.float32).name
        'reference'
    """
    offers = _manager().hook.hf_paged_kernel_backend(device=torch.device(device), dtype=dtype)
    builtins = _builtins()
    offers.sort(key=lambda backend: any(backend is b for b in builtins))  # stable: installed plugins first
    wanted = os.environ.get("HF_PAGED_BACKEND")
    if wanted:
        for backend in offers:
            if backend.name == wanted:
                return backend
        raise ValueError(
            f"HF_PAGED_BACKEND={wanted!r} offers nothing for {dtype} on {device}; "
            f"available: {[b.name for b in offers]}"
        )
    return offers[0]
