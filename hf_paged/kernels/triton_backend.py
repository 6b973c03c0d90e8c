"""The Triton kernel backend: offered for CUDA tensors in fp16, bf16 and fp32.

Importing this module touches no GPU (it must import on CPU-only machines that have Triton); the
kernels compile at their first call. Semantics are those of `hf_paged.kernels.reference`:
``store_kv`` is one launch per call, ``paged_attention`` one unified decode/prefill kernel.
"""

from __future__ import annotations

import sys

import torch

from ..plugins import hookimpl
from .triton_attention import SUPPORTED_DTYPES, paged_attention
from .triton_store import store_kv

__all__ = ["name", "store_kv", "paged_attention"]

name = "triton"
# paged_attention takes ``static_grid=True`` (launches sized from shapes: graphs of mixed steps).
supports_static_grid = True
# paged_attention takes the step's new ``key``/``value``/``slot_mapping`` and stores them itself (in the attention
# launch for decode steps; prompt steps then read them through TMA on SM90+).
stores_step_kv = True


@hookimpl
def hf_paged_kernel_backend(device: torch.device, dtype: torch.dtype):
    """Offer this backend for CUDA devices and the dtypes the kernels handle; pass otherwise."""
    if torch.device(device).type == "cuda" and dtype in SUPPORTED_DTYPES:
        return sys.modules[__name__]
    return None
