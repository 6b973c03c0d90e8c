"""KV block tables of sequences on top of a `BlockPool`, with prefix caching and copy-on-write.

Prefix caching: a block whose ``block_size`` slots all hold computed tokens is keyed by its tokens and
the hash of the block before it (a chain, so a key names the whole prefix). A new sequence whose
leading blocks match takes those blocks instead of recomputing them. Blocks nobody owns stay in
the pool's free list with their contents and key, oldest freed first, so they are evicted in LRU
order when the pool hands them out again.

Only full blocks are ever shared through the cache, and only blocks before the one holding the
sequence's last token, so a cached block is never written. Blocks shared by forked samples
(``n > 1``) may end in a partly filled block: the first sample to write into it copies it first.
"""

from __future__ import annotations

import numpy as np

from ..cache.block_pool import BlockPool
from ..cache.geometry import cdiv
from .sequence import Sequence

__all__ = ["BlockManager", "BlockTableRows"]

# The hash standing for "no block before this one".
_ROOT_HASH = 0x5F3759DF


class BlockTableRows:
    """Every block table mirrored in one host array, a row per sequence that holds blocks.

    The block manager writes a row where the table changes (new blocks, a copy-on-write, a fork), so a
    step gathers its tables with one indexing operation instead of flattening hundreds of Python lists.
    A row's entries past its table's length are 0. int32, as the kernels read block tables.
    """

    def __init__(self, rows: int = 64, width: int = 64) -> None:
        self.tables = np.zeros((rows, width), dtype=np.int32)
        self.lens = np.zeros(rows, dtype=np.int64)
        self._free_rows = list(range(rows - 1, -1, -1))

    def write(self, seq: Sequence, start: int) -> None:
        """Copy ``seq.block_table[start:]`` into its row (taking a row first if it has none)."""
        if seq.table_row < 0:
            if not self._free_rows:
                self._grow(2 * len(self.lens), self.tables.shape[1])
            seq.table_row = self._free_rows.pop()
        table, row = seq.block_table, seq.table_row
        if len(table) > self.tables.shape[1]:
            self._grow(len(self.lens), max(len(table), 2 * self.tables.shape[1]))
        self.tables[row, start : len(table)] = table[start:]
        self.lens[row] = len(table)

    def release(self, seq: Sequence) -> None:
        """Give ``seq``'s row back (its table is empty now)."""
        row = seq.table_row
        if row >= 0:
            self.tables[row, : self.lens[row]] = 0
            self.lens[row] = 0
            self._free_rows.append(row)
            seq.table_row = -1

    def _grow(self, rows: int, width: int) -> None:
        old_rows, old_width = self.tables.shape
        tables = np.zeros((rows, width), dtype=np.int32)
        tables[:old_rows, :old_width] = self.tables
        self.tables = tables
        self.lens = np.concatenate([self.lens, np.zeros(rows - old_rows, dtype=np.int64)])
        self._free_rows.extend(range(rows - 1, old_rows - 1, -1))


class BlockManager:
    """Allocates, shares and frees the KV blocks of sequences (and mirrors their tables in `rows`).

    Args:
        pool: the block pool (free list and reference counts) of the engine's `KVPool`.
        block_size: tokens per block.
        enable_prefix_caching: reuse blocks of identical prefixes across requests.
    """

    def __init__(self, pool: BlockPool, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.pool = pool
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        # Key (parent hash, block tokens) -> block; the tuple compares exactly, so a hash collision
        # of two different blocks can never alias them.
        self._cached: dict[tuple[int, tuple[int, ...]], int] = {}
        self._key_of: dict[int, tuple[int, tuple[int, ...]]] = {}
        # Block copies (src, dst) the runner must perform before the next forward (copy-on-write).
        self.pending_copies: list[tuple[int, int]] = []
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0
        self.rows = BlockTableRows()

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out (cached but unowned blocks included: they are evictable)."""
        return self.pool.num_free

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def capacity_tokens(self) -> int:
        return self.pool.num_blocks * self.block_size

    @property
    def prefix_hit_rate(self) -> float:
        """Share of looked-up prompt tokens (first admissions only) served from the prefix cache."""
        return self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0

    # -- admission --------------------------------------------------------------------------------

    def try_admit(self, seq: Sequence, token_budget: int, *, count_query: bool) -> int:
        """Give a waiting ``seq`` its cached prefix and blocks for its first chunk.

        Returns the number of tokens to compute this step (at most ``token_budget``), or ``0`` when
        the pool cannot hold the chunk now (nothing is changed then).
        """
        assert not seq.block_table and seq.num_computed_tokens == 0
        hits = self._match_prefix(seq)
        cached = len(hits) * self.block_size
        num_new = min(seq.num_tokens - cached, token_budget)
        if num_new <= 0:
            return 0
        revived = sum(1 for b in hits if self.pool.is_free(b))
        needed = cdiv(cached + num_new, self.block_size) - len(hits) + revived
        if needed > self.pool.num_free:
            return 0
        for b in hits:
            if self.pool.is_free(b):
                self.pool.take(b)
            else:
                self.pool.fork([b])
        seq.block_table = list(hits)
        self.rows.write(seq, 0)
        seq.num_committed_blocks = len(hits)
        seq.num_computed_tokens = cached
        self._allocate_into(seq, cdiv(cached + num_new, self.block_size) - len(hits))
        if count_query:
            self.prefix_query_tokens += seq.num_tokens
            self.prefix_hit_tokens += cached
            seq.request.num_cached_tokens = cached
        return num_new

    def _match_prefix(self, seq: Sequence) -> list[int]:
        if not self.enable_prefix_caching:
            return []
        # Never the block holding the last token: that token is recomputed for its logits, and a
        # cached block must never be written.
        limit = (seq.num_tokens - 1) // self.block_size
        cap = seq.request.max_cached_prefix  # positions whose prompt logprobs are still wanted
        if cap is not None:
            limit = min(limit, cap // self.block_size)
        self._extend_hashes(seq, limit)
        hits: list[int] = []
        parent = _ROOT_HASH
        bs = self.block_size
        for i in range(limit):
            block = self._cached.get((parent, tuple(seq.token_ids[i * bs : (i + 1) * bs])))
            if block is None:
                break
            hits.append(block)
            parent = seq.block_hashes[i]
        return hits

    def _extend_hashes(self, seq: Sequence, num_blocks: int) -> None:
        bs = self.block_size
        hashes = seq.block_hashes
        for i in range(len(hashes), num_blocks):
            parent = hashes[i - 1] if i else _ROOT_HASH
            hashes.append(hash((parent, tuple(seq.token_ids[i * bs : (i + 1) * bs]))))

    # -- growth -----------------------------------------------------------------------------------

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks the pool must provide for ``seq`` to store ``num_new_tokens`` more tokens."""
        total = cdiv(seq.num_computed_tokens + num_new_tokens, self.block_size) - len(seq.block_table)
        return max(total, 0) + (1 if self._needs_copy(seq) else 0)

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= self.pool.num_free

    def try_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        """`append` when the pool has room (returns True), else change nothing and return False."""
        computed, table = seq.num_computed_tokens, seq.block_table
        # The common decode step, decided without `blocks_needed`: the tokens fit the table and the block
        # they are written into is fresh or owned by this sequence alone.
        if computed + num_new_tokens <= len(table) * self.block_size and (
                computed % self.block_size == 0 or self.pool.refcount(table[computed // self.block_size]) == 1):
            return True
        needed = self.blocks_needed(seq, num_new_tokens)
        if needed > self.pool.num_free:
            return False
        if needed:
            self.append(seq, num_new_tokens)
        return True

    def append(self, seq: Sequence, num_new_tokens: int) -> None:
        """Make room in ``seq``'s table for ``num_new_tokens`` more tokens (call `can_append` first)."""
        if self._needs_copy(seq):
            # The partly filled block is shared with a sibling sample: write into a copy.
            idx = seq.num_computed_tokens // self.block_size
            shared = seq.block_table[idx]
            (fresh,) = self._allocate(1)
            self.pending_copies.append((shared, fresh))
            self.pool.free([shared])
            seq.block_table[idx] = fresh
            self.rows.write(seq, idx)
        more = cdiv(seq.num_computed_tokens + num_new_tokens, self.block_size) - len(seq.block_table)
        if more > 0:
            self._allocate_into(seq, more)

    def _needs_copy(self, seq: Sequence) -> bool:
        idx, used = divmod(seq.num_computed_tokens, self.block_size)
        return used != 0 and idx < len(seq.block_table) and self.pool.refcount(seq.block_table[idx]) > 1

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """``child`` shares every block of ``parent`` (one more owner each)."""
        self.pool.fork(parent.block_table)
        child.block_table = list(parent.block_table)
        self.rows.write(child, 0)
        child.block_hashes = list(parent.block_hashes)
        child.num_committed_blocks = parent.num_committed_blocks
        child.num_computed_tokens = parent.num_computed_tokens

    def commit(self, seq: Sequence, num_computed: int) -> None:
        """Register in the prefix cache the blocks ``seq`` has filled since the last call, up to
        ``num_computed`` tokens (those whose K/V a finished step wrote)."""
        if not self.enable_prefix_caching:
            return
        full = min(num_computed, len(seq.token_ids)) // self.block_size
        full = min(full, len(seq.block_table))
        if full <= seq.num_committed_blocks:
            return
        self._extend_hashes(seq, full)
        bs = self.block_size
        for i in range(seq.num_committed_blocks, full):
            block = seq.block_table[i]
            parent = seq.block_hashes[i - 1] if i else _ROOT_HASH
            key = (parent, tuple(seq.token_ids[i * bs : (i + 1) * bs]))
            # A block with the same contents may already be cached (computed by a concurrent
            # request): keep that one, this copy is freed normally.
            if key not in self._cached and block not in self._key_of:
                self._cached[key] = block
                self._key_of[block] = key
        seq.num_committed_blocks = full

    def free(self, seq: Sequence) -> None:
        """Drop ``seq``'s ownership of its blocks; unowned blocks keep their cached contents."""
        # Freed last-first: the pool evicts the oldest freed block first, so a prefix's tail goes
        # before its head (the head is the part other requests are likeliest to share).
        self.pool.free(reversed(seq.block_table))
        seq.block_table = []
        self.rows.release(seq)
        seq.num_committed_blocks = 0
        seq.num_computed_tokens = 0

    def take_pending_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def _allocate_into(self, seq: Sequence, n: int) -> None:
        start = len(seq.block_table)
        seq.block_table.extend(self._allocate(n))
        self.rows.write(seq, start)

    def _allocate(self, n: int) -> list[int]:
        blocks = self.pool.allocate(n)
        if self._key_of:
            for b in blocks:
                key = self._key_of.pop(b, None)  # evicted: its old contents are about to be overwritten
                if key is not None:
                    del self._cached[key]
        return blocks

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (their contents are left as they are)."""
        self._cached.clear()
        self._key_of.clear()
