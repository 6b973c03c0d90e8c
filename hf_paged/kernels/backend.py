"""Choosing a kernel backend: built-in plugins plus those published under ``hf_paged.plugins``.

Every plugin may offer a backend for a device/dtype; the first offer wins and the torch reference
offers last. Set ``HF_PAGED_BACKEND=<name>`` to pick a specific backend among the offers.
"""

from __future__ import annotations

import functools
import os

import pluggy
import torch

from . import reference
from .hookspecs import PROJECT, HookSpecs, KernelBackend

__all__ = ["PLUGIN_GROUP", "plugin_manager", "get_backend"]

PLUGIN_GROUP = "hf_paged.plugins"


@functools.cache
def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager: built-in backends, then the ``hf_paged.plugins`` entry points."""
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(HookSpecs)
    pm.register(reference, name="reference")
    try:
        from . import triton_backend
    except ImportError:  # no triton here: the reference serves
        pass
    else:
        pm.register(triton_backend, name="triton")
    pm.load_setuptools_entrypoints(PLUGIN_GROUP)
    return pm


@functools.cache
def get_backend(device: torch.device, dtype: torch.dtype) -> KernelBackend:
    """The backend for tensors of ``dtype`` on ``device`` (``HF_PAGED_BACKEND`` may name one)."""
    offers = plugin_manager().hook.hf_paged_kernel_backend(device=torch.device(device), dtype=dtype)
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
