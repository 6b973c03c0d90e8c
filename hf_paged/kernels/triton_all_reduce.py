"""A one-shot all-reduce with no barrier, over peer memory (NVLink): the flag travels in the data.

Every rank stores its partial sums straight into each rank's receive buffer and then polls its own buffer
until no element of the message still holds ``NOT_WRITTEN`` (the bits of -0.0 in bf16 and fp16; senders
turn -0.0 into +0.0, which sums the same). Arrival of the data is its own signal, so there is no barrier
before the sums (as NVIDIA's TensorRT-LLM does it for small messages). A rank reuses a receive buffer three
calls later, after clearing it itself as it reads; a call counter on the device picks the buffer, so a
CUDA graph replays the launch unchanged. Every rank adds the ranks' partials in rank order (fp32), so all
get the same sums.

Two H200s, 64 calls in a CUDA graph (bench/all_reduce.py, session 19): 3.3 us at 8 KB (PyTorch's
symmetric-memory one-shot kernel, with a barrier on either side: 6.7 us; NCCL 11.6), 5.3 us at 512 KB (11.3),
10.0 us at 2 MB (two-shot 19.3), 30.4 us at 8 MB (42.6). Every rank writes the whole message to every peer, so
the bytes each sends grow with the ranks.

The buffers and peer addresses come from the caller (`hf_paged.tp_all_reduce` sets them up in symmetric
memory); this module only launches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_launch import launch

__all__ = ["NOT_WRITTEN", "add_rms_norm", "all_reduce", "all_reduce_rms_norm", "receive_elems"]

NOT_WRITTEN = -32768  # int16 bits of -0.0 in bf16 and fp16
_NOT_WRITTEN = tl.constexpr(NOT_WRITTEN)
_BLOCK = 1024
_BUFFERS = tl.constexpr(3)  # receive buffers each rank cycles through


@triton.jit
def _epilogue(total, offs, cols, mask, row_len, eps, residual_ptr, weight_ptr, out_ptr, normed_ptr,
              HAS_RESIDUAL: tl.constexpr, HAS_NORM: tl.constexpr):
    """Store ``total`` (+ ``residual``, rounded as torch adds) to ``out``; with ``HAS_NORM`` the row's Llama RMSNorm
    of weight ``weight`` to ``normed`` too (fp32 statistics, the normalised row rounded before the weight)."""
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + offs, mask=mask, other=0.0)
        total = (residual.to(tl.float32) + total.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs, total, mask=mask)
    if HAS_NORM:
        y = total.to(tl.float32)  # 0 past the row
        normal = (y * tl.rsqrt(tl.sum(y * y, 0) / row_len + eps)).to(out_ptr.dtype.element_ty)
        weight = tl.load(weight_ptr + cols, mask=cols < row_len, other=0.0)
        tl.store(normed_ptr + offs, (weight.to(tl.float32) * normal.to(tl.float32)).to(out_ptr.dtype.element_ty),
                 mask=mask)


@triton.jit
def _add_rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, normed_ptr, row_len, eps, BLOCK: tl.constexpr):
    """`_epilogue` alone, a row per program: for sums that took another way."""
    cols = tl.arange(0, BLOCK)
    offs = tl.program_id(0).to(tl.int64) * row_len + cols
    mask = cols < row_len
    _epilogue(tl.load(x_ptr + offs, mask=mask, other=0.0), offs, cols, mask, row_len, eps, residual_ptr, weight_ptr,
              out_ptr, normed_ptr, True, True)


@triton.jit
def _all_reduce_kernel(x_ptr, out_ptr, residual_ptr, weight_ptr, normed_ptr, receive_ptr, peers_ptr, counter_ptr, n,
                       row_len, slot_elems, rank, eps, WORLD: tl.constexpr, BLOCK: tl.constexpr,
                       HAS_RESIDUAL: tl.constexpr, HAS_NORM: tl.constexpr):
    """``out`` = sum over ranks of ``x`` (``n`` elements), each program summing ``row_len`` of them (a whole row
    when it normalises). With ``HAS_RESIDUAL`` ``out`` = ``residual`` + that sum (rounded to the dtype first, as
    an all-reduce then an add would); with ``HAS_NORM`` also ``normed`` = ``weight`` x RMSNorm(``out``) (Llama's:
    fp32 statistics, the normalised row rounded before the weight). ``receive_ptr``: this rank's receive buffer,
    int16, ``3 x WORLD`` slots of ``slot_elems``; ``peers_ptr[r]``: where rank r's is, in int16 elements from
    ``receive_ptr``; ``counter_ptr``: [calls so far, programs finished in this call]."""
    cols = tl.arange(0, BLOCK)
    offs = tl.program_id(0) * row_len + cols
    mask = (cols < row_len) & (offs < n)
    slot = tl.load(counter_ptr) % _BUFFERS * WORLD
    bits = tl.load(x_ptr + offs, mask=mask).to(tl.int16, bitcast=True)
    bits = tl.where(bits == _NOT_WRITTEN, tl.zeros_like(bits), bits)
    for r in tl.static_range(WORLD):
        # An offset from a real pointer, hinted aligned, so the stores move 16 bytes each (a pointer made from
        # an integer would move 2).
        peer = receive_ptr + tl.multiple_of(tl.load(peers_ptr + r), 16)
        tl.store(peer + (slot + rank) * slot_elems + offs, bits, mask=mask)
    acc = tl.zeros([BLOCK], tl.float32)
    for r in tl.static_range(WORLD):
        src = receive_ptr + (slot + r) * slot_elems + offs
        got = tl.load(src, mask=mask, other=0, volatile=True)
        while tl.max((got == _NOT_WRITTEN).to(tl.int32), 0) > 0:  # rank r's partials not all here yet
            got = tl.load(src, mask=mask, other=0, volatile=True)
        acc += got.to(x_ptr.dtype.element_ty, bitcast=True).to(tl.float32)
        tl.store(src, tl.full([BLOCK], _NOT_WRITTEN, tl.int16), mask=mask)  # free for the call 3 later
    _epilogue(acc.to(out_ptr.dtype.element_ty), offs, cols, mask, row_len, eps, residual_ptr, weight_ptr, out_ptr,
              normed_ptr, HAS_RESIDUAL, HAS_NORM)
    # The last program of the call moves the counter on; the next launch on the stream sees it.
    if tl.atomic_add(counter_ptr + 1, 1) == tl.num_programs(0) - 1:
        tl.store(counter_ptr + 1, 0)
        tl.store(counter_ptr, tl.load(counter_ptr) + 1)


def all_reduce(x: torch.Tensor, receive: torch.Tensor, peers: torch.Tensor, counter: torch.Tensor, slot_elems: int,
               rank: int, world: int, residual: torch.Tensor | None = None) -> torch.Tensor:
    """The sum over ``world`` ranks of the contiguous bf16/fp16 ``x`` (at most ``slot_elems`` elements), every
    rank calling with its partials; plus ``residual`` (``x``'s shape and dtype, contiguous) where given.
    ``receive``: this rank's receive buffer (int16, ``3 x world x slot_elems``, filled with `NOT_WRITTEN` before
    the first call); ``peers``: int64, where each rank's buffer is mapped here, in int16 elements from ``receive``
    (multiples of 16); ``counter``: int32 [2], zeros.

    Example:
        >>> total = all_reduce(partial, receive, offsets, counter, 1 << 18, rank, 2)  # doctest: +SKIP
    """
    out = torch.empty_like(x)
    launch(_all_reduce_kernel, (triton.cdiv(x.numel(), _BLOCK),), x, out, residual, None, None, receive, peers,
           counter, x.numel(), _BLOCK, slot_elems, rank, 0.0, WORLD=world, BLOCK=_BLOCK,
           HAS_RESIDUAL=residual is not None, HAS_NORM=False)
    return out


def all_reduce_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                        receive: torch.Tensor, peers: torch.Tensor, counter: torch.Tensor, slot_elems: int, rank: int,
                        world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`all_reduce` of ``x`` plus ``residual``, and that normalised as a Llama ``RMSNorm`` of weight ``weight``
    [hidden] and epsilon ``eps`` does it: ``(summed, normed)``, one kernel (rows of the last dim).

    Example:
        >>> hidden, normed = all_reduce_rms_norm(partial, residual, norm.weight, 1e-5, *buffers)  # doctest: +SKIP
    """
    out, normed, row_len, rows, options = _by_rows(x)
    launch(_all_reduce_kernel, (rows,), x, out, residual, weight, normed, receive, peers, counter, x.numel(),
           row_len, slot_elems, rank, float(eps), WORLD=world, HAS_RESIDUAL=True, HAS_NORM=True, **options)
    return out, normed


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`all_reduce_rms_norm`'s epilogue for a sum taken another way (NCCL, the barrier kernels): ``(residual + x,
    RMSNorm of that)``, rounded alike, one launch. Contiguous ``x``/``residual`` of one shape and dtype.

    Example:
        >>> hidden, normed = add_rms_norm(total, residual, norm.weight, 1e-5)  # doctest: +SKIP
    """
    out, normed, row_len, rows, options = _by_rows(x)
    launch(_add_rms_norm_kernel, (rows,), x, residual, weight, out, normed, row_len, float(eps), **options)
    return out, normed


def _by_rows(x: torch.Tensor) -> tuple:
    """A row-per-program launch over ``x``'s last dim: the two outputs, the row length, the rows, and the
    tile and warps."""
    row_len = x.shape[-1]
    block = triton.next_power_of_2(row_len)
    return (torch.empty_like(x), torch.empty_like(x), row_len, x.numel() // row_len,
            dict(BLOCK=block, num_warps=4 if block <= 4096 else 8))


def receive_elems(world: int, slot_elems: int) -> int:
    """Elements (int16) of one rank's receive buffer for `all_reduce`."""
    return _BUFFERS.value * world * slot_elems
