"""The pluggy hook specifications of hf_paged and the backend protocol they return."""

from __future__ import annotations

from typing import Protocol

import pluggy
import torch

__all__ = ["PROJECT", "KernelBackend", "HookSpecs", "hookimpl", "hookspec"]

PROJECT = "hf_paged"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class KernelBackend(Protocol):
    """What a kernel backend provides; `hf_paged.kernels.reference` defines the semantics."""

    name: str

    def store_kv(self, key, value, k_cache, v_cache, slot_mapping) -> None: ...

    def paged_attention(self, query, k_cache, v_cache, **metadata) -> torch.Tensor: ...


class HookSpecs:
    @hookspec
    def hf_paged_kernel_backend(self, device: torch.device, dtype: torch.dtype) -> KernelBackend | None:
        """Offer a backend for tensors of ``dtype`` on ``device``, or return ``None`` to pass.

        Example plugin module (published under the entry-point group ``hf_paged.plugins``)::

            from hf_paged.kernels import hookimpl

            @hookimpl
            def hf_paged_kernel_backend(device, dtype):
                return my_backend if device.type == "cuda" else None
        """
