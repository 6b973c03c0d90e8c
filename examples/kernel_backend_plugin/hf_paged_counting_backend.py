"""Example hf_paged plugin: a kernel backend that counts its calls and delegates to the torch reference.

A backend is any object with a ``name`` and the two functions of `hf_paged.kernels.reference`
(``store_kv`` and ``paged_attention``, same arguments and semantics). A plugin offers it through the
pluggy hook ``hf_paged_kernel_backend(device, dtype)``: return the backend to serve tensors of that
device/dtype, or ``None`` to pass. hf_paged takes the first offer (the reference offers last);
``HF_PAGED_BACKEND=<name>`` picks a backend by name among the offers.

This one only offers itself when asked for by name, so installing it changes nothing by default.
A real backend would check ``device.type`` / ``dtype`` and return its kernels.
"""

from __future__ import annotations

import os
import sys
from collections import Counter

import torch

from hf_paged.kernels import hookimpl, reference

name = "counting"
calls: Counter[str] = Counter()


@hookimpl
def hf_paged_kernel_backend(device: torch.device, dtype: torch.dtype):
    if os.environ.get("HF_PAGED_BACKEND") != name:
        return None
    return sys.modules[__name__]


def store_kv(key, value, k_cache, v_cache, slot_mapping) -> None:
    calls["store_kv"] += 1
    reference.store_kv(key, value, k_cache, v_cache, slot_mapping)


def paged_attention(query, k_cache, v_cache, **metadata) -> torch.Tensor:
    calls["paged_attention"] += 1
    return reference.paged_attention(query, k_cache, v_cache, **metadata)
