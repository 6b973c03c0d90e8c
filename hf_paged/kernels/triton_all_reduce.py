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

__all__ = ["NOT_WRITTEN", "all_reduce", "receive_elems"]

NOT_WRITTEN = -32768  # int16 bits of -0.0 in bf16 and fp16
_NOT_WRITTEN = tl.constexpr(NOT_WRITTEN)
_BLOCK = 1024
_BUFFERS = tl.constexpr(3)  # receive buffers each rank cycles through


@triton.jit
def _all_reduce_kernel(x_ptr, out_ptr, receive_ptr, peers_ptr, counter_ptr, n, slot_elems, rank,
                       WORLD: tl.constexpr, BLOCK: tl.constexpr):
    """``out`` = sum over ranks of ``x`` (``n`` elements). ``receive_ptr``: this rank's receive buffer, int16,
    ``3 x WORLD`` slots of ``slot_elems``; ``peers_ptr[r]``: where rank r's is, in int16 elements from
    ``receive_ptr``; ``counter_ptr``: [calls so far, programs finished in this call]."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
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
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    # The last program of the call moves the counter on; the next launch on the stream sees it.
    if tl.atomic_add(counter_ptr + 1, 1) == tl.num_programs(0) - 1:
        tl.store(counter_ptr + 1, 0)
        tl.store(counter_ptr, tl.load(counter_ptr) + 1)


def all_reduce(x: torch.Tensor, receive: torch.Tensor, peers: torch.Tensor, counter: torch.Tensor, slot_elems: int,
               rank: int, world: int) -> torch.Tensor:
    """The sum over ``world`` ranks of the contiguous bf16/fp16 ``x`` (at most ``slot_elems`` elements), every
    rank calling with its partials. ``receive``: this rank's receive buffer (int16, ``3 x world x slot_elems``,
    filled with `NOT_WRITTEN` before the first call); ``peers``: int64, where each rank's buffer is mapped
    here, in int16 elements from ``receive`` (multiples of 16); ``counter``: int32 [2], zeros.

    Example:
        >>> total = all_reduce(partial, receive, offsets, counter, 1 << 18, rank, 2)  # doctest: +SKIP
    """
    out = torch.empty_like(x)
    launch(_all_reduce_kernel, (triton.cdiv(x.numel(), _BLOCK),), x, out, receive, peers, counter, x.numel(),
           slot_elems, rank, WORLD=world, BLOCK=_BLOCK)
    return out


def receive_elems(world: int, slot_elems: int) -> int:
    """Elements (int16) of one rank's receive buffer for `all_reduce`."""
    return _BUFFERS.value * world * slot_elems
