"""Triton matmul for a few rows: ``x @ weight.T`` when ``x`` has at most `MAX_ROWS` rows (decode at small batches).

At batch 1 a linear layer reads its weight and almost nothing else, so its time is the weight's bytes over the
memory's bandwidth. cuBLAS's kernels for these shapes come close on large weights but not on the halves and
quarters a tensor-parallel rank holds (an H200 under TP=2, 8B shape: the 17-59 MB ``o_proj`` and ``down_proj``
shards at 1.8-3.4 TB/s of ~4.2, each with a split-K reduce launch of its own; bench/RESULTS.md, session 20).
Here each program owns ``BLOCK_N`` output columns and streams their weight rows once, whole ``K`` at a time in
pipelined ``BLOCK_K`` tiles, and the rows of ``x`` (padded to 16, the smallest ``tl.dot``) ride along: no
split-K, no second launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_launch import launch

__all__ = ["MAX_ROWS", "GemvConfig", "choose_gemv_config", "gemv"]

#: The most rows of ``x`` the kernel takes (one 16-row ``tl.dot`` tile; half of it is padding at 8 already).
MAX_ROWS = 8


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    offs_m = tl.arange(0, 16)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    acc = tl.zeros([16, BLOCK_N], tl.float32)
    for k in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
        k_ok = offs_k[None, :] < K - k
        x = tl.load(x_ptrs + k, mask=m_ok[:, None] & k_ok, other=0.0)
        w = tl.load(w_ptrs + k, mask=n_ok[:, None] & k_ok, other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


class GemvConfig(tuple):
    """``(block_n, block_k, num_warps, num_stages)``."""

    __slots__ = ()

    def __new__(cls, block_n: int, block_k: int, num_warps: int, num_stages: int):
        return super().__new__(cls, (block_n, block_k, num_warps, num_stages))


def choose_gemv_config(n: int, k: int, num_sms: int) -> GemvConfig:
    """Tiles for an ``[n, k]`` weight: the widest ``BLOCK_N`` that still gives every SM two programs."""
    block_n = 64
    while block_n > 16 and triton.cdiv(n, block_n) < 2 * num_sms:
        block_n //= 2
    return GemvConfig(block_n, 256, 4, 4)


def gemv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, config: GemvConfig | None = None
) -> torch.Tensor:
    """``torch.nn.functional.linear(x, weight, bias)`` for ``x`` of at most `MAX_ROWS` rows (any leading dims).

    ``weight`` is ``[N, K]`` with contiguous rows, as ``nn.Linear`` keeps it.

    Example:
        >>> y = gemv(x, layer.weight, layer.bias)  # doctest: +SKIP
    """
    k = x.shape[-1]
    n = weight.shape[0]
    rows = x.reshape(-1, k)
    if rows.shape[0] > MAX_ROWS:
        raise ValueError(f"gemv takes at most {MAX_ROWS} rows, got {rows.shape[0]}")
    if weight.shape[1] != k or weight.stride(1) != 1:
        raise ValueError(f"weight must be [N, {k}] with contiguous rows, got {tuple(weight.shape)} {weight.stride()}")
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape[0], n, dtype=x.dtype, device=x.device)
    if config is None:
        config = choose_gemv_config(n, k, _num_sms(x.device))
    block_n, block_k, num_warps, num_stages = config
    launch(
        _gemv_kernel, (triton.cdiv(n, block_n),), rows, weight, bias, out, rows.shape[0], n, k,
        rows.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k, NUM_STAGES=num_stages, num_warps=num_warps,
    )
    return out.reshape(*x.shape[:-1], n)


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count
