"""The device-side tile map of launches sized from shapes alone (CUDA graphs of mixed steps, whose query lengths
only the device knows): `tile_map_kernel` writes where each sequence's query tiles start, `tile_owner` finds the
sequence of a program's tile. The Triton attention kernel and the Gluon prompt kernel (which calls `tile_owner`
too: a Gluon kernel may call a ``@triton.jit`` function of scalar ops) share them."""

import triton
import triton.language as tl

__all__ = ["tile_map_kernel", "tile_owner"]


@triton.jit(do_not_specialize=["num_seqs", "block_q"])
def tile_map_kernel(cu_ptr, map_ptr, num_seqs, block_q, SKIP_DECODES: tl.constexpr, BLOCK: tl.constexpr):
    """``map[s]``: the first query tile of sequence ``s`` (``map[num_seqs]``: their count), one launch; with
    ``SKIP_DECODES`` sequences of one query get no tile (their launch is another)."""
    offs = tl.arange(0, BLOCK)
    ok = offs < num_seqs
    q_len = tl.load(cu_ptr + offs + 1, mask=ok, other=0) - tl.load(cu_ptr + offs, mask=ok, other=0)
    tiles = (q_len + block_q - 1) // block_q
    if SKIP_DECODES:
        tiles = tl.where(q_len == 1, 0, tiles)
    tl.store(map_ptr + offs + 1, tl.cumsum(tiles, 0), mask=ok)
    tl.store(map_ptr + offs, tl.zeros_like(offs), mask=offs == 0)


@triton.jit
def tile_owner(tiles_ptr, num_seqs, slot):
    """The sequence of tile ``slot`` in a map of `tile_map_kernel`'s: the last s with ``tiles_ptr[s] <= slot`` (a
    binary search; sequences of no tile share their start with the next one and are passed over)."""
    lo = slot * 0
    hi = lo + num_seqs
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if tl.load(tiles_ptr + mid) <= slot:
            lo = mid
        else:
            hi = mid
    return lo
