"""Fixed-size block allocator with reference counts; knows nothing of tensors."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

__all__ = ["BlockPool", "OutOfBlocksError"]


class OutOfBlocksError(RuntimeError):
    """Raised when a request for KV blocks exceeds the free blocks of the pool.

    The pool is left exactly as it was before the failing call.
    """


class BlockPool:
    """A free list of ``num_blocks`` block ids with a reference count per block.

    A block is free when its count is zero. ``fork`` adds an owner to blocks (shared prefixes, beams);
    ``free`` drops one owner and returns blocks nobody owns to the free list.

    Example:
        >>> pool = BlockPool(4)
        >>> table = pool.allocate(2)
        >>> pool.num_free
        2
        >>> pool.fork(table); pool.free(table); pool.free(table)
        >>> pool.num_free
        4
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        # Insertion-ordered (oldest freed first), and O(1) removal of a given block for `take`.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._refcount = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def refcount(self, block: int) -> int:
        return self._refcount[block]

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` free blocks, each with one owner; raises `OutOfBlocksError` if fewer are free."""
        if n > len(self._free):
            raise OutOfBlocksError(
                f"out of KV blocks: {n} needed, {len(self._free)} free of {self.num_blocks}"
            )
        blocks = [self._free.popitem(last=False)[0] for _ in range(n)]
        for b in blocks:
            self._refcount[b] = 1
        return blocks

    def fork(self, blocks: Iterable[int]) -> None:
        """Add one owner to each of ``blocks`` (they must be in use)."""
        for b in self._owned(blocks, "cannot fork free block"):
            self._refcount[b] += 1

    def _owned(self, blocks: Iterable[int], error: str) -> list[int]:
        """``blocks`` as a list, checked to be in use before anything changes (else ``ValueError``)."""
        blocks = list(blocks)
        for b in blocks:
            if self._refcount[b] <= 0:
                raise ValueError(f"{error} {b}")
        return blocks

    def free(self, blocks: Iterable[int]) -> None:
        """Drop one owner from each of ``blocks``; blocks left with none go back to the free list."""
        for b in self._owned(blocks, "double free of block"):
            self._refcount[b] -= 1
            if self._refcount[b] == 0:
                self._free[b] = None

    def is_free(self, block: int) -> bool:
        """Whether ``block`` has no owner (it sits in the free list)."""
        return self._refcount[block] == 0

    def take(self, block: int) -> None:
        """Take the specific free ``block`` out of the free list with one owner.

        A prefix cache uses this to revive a freed block whose contents are still valid.
        """
        if self._refcount[block] != 0:
            raise ValueError(f"cannot take block {block}: it is in use")
        del self._free[block]
        self._refcount[block] = 1
