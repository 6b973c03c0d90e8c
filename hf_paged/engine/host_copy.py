"""Host tensors of a step onto the device without stopping the host.

A plain ``tensor.to("cuda")`` from pageable memory waits for the copy, and so for everything queued on
the stream before it: one such copy per step ends async scheduling's overlap (the host then idles while
the device finishes the step in flight). Staging in pinned memory makes the copy asynchronous; torch's
pinned-memory cache keeps the buffer until the copy has run.
"""

from __future__ import annotations

import torch

__all__ = ["upload"]


def upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` on ``device``, copied asynchronously on CUDA (the host does not wait)."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
