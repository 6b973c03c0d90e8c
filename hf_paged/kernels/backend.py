"""Choosing a kernel backend: built-in plugins plus those published under ``hf_paged.plugins``.

Every plugin may offer a backend for a device/dtype; the first offer wins, installed plugins offer
before the built-in backends (FlashAttention-4 where installed on SM90+, then Triton) and the torch
reference offers last. Set ``HF_PAGED_BACKEND=<name>``
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
    """What a kernel backend provides; `hf_paged.kernels.reference` defines the semantics.

    Optional flags: ``supports_static_grid`` (``paged_attention`` takes ``static_grid=True``) and
    ``stores_step_kv`` (it takes the step's new ``key``/``value`` with their ``slot_mapping`` and stores them
    itself, as ``store_kv`` would, before attending).
    """

    name: str

    def store_kv(self, key, value, k_cache, v_cache, slot_mapping) -> None: ...

    def paged_attention(self, query, k_cache, v_cache, **metadata) -> torch.Tensor: ...


_missing: dict[str, str] = {}  # built-in backends that could not be imported, and why


@functools.cache
def _builtins() -> tuple:
    try:
        from . import fa4_backend, triton_backend
    except ImportError as exc:  # no triton here: the reference serves
        _missing["fa4"] = _missing["triton"] = f"the triton package is not importable: {exc}"
        return (reference,)
    return (fa4_backend, triton_backend, reference)


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
    # Installed plugins first (in pluggy's order), then the built-ins in the order `_builtins` gives.
    offers.sort(key=lambda backend: next((i for i, b in enumerate(builtins) if backend is b), -1))
    wanted = os.environ.get("HF_PAGED_BACKEND")
    if wanted:
        for backend in offers:
            if backend.name == wanted:
                return backend
        named = _manager().get_plugin(wanted)
        why = _missing.get(wanted) or getattr(named, "why_unavailable", lambda *_: None)(device, dtype)
        raise ValueError(
            f"HF_PAGED_BACKEND={wanted!r} offers nothing for {dtype} on {device}"
            f"{f' ({why})' if why else ''}; available: {[b.name for b in offers]}"
        )
    return offers[0]
