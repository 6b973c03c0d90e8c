"""BlockManager: prefix-cache hits, LRU eviction order, copy-on-write of shared partial blocks."""

from __future__ import annotations

from hf_paged.cache.block_pool import BlockPool
from hf_paged.engine.block_manager import BlockManager
from hf_paged.engine.sampling_params import SamplingParams
from hf_paged.engine.sequence import Request, Sequence

BS = 4


def _seq(tokens: list[int], seq_id: int = 0) -> Sequence:
    request = Request(f"r{seq_id}", list(tokens), SamplingParams(), frozenset())
    return Sequence(seq_id, request, 0, tokens)


def _prefill(bm: BlockManager, seq: Sequence) -> None:
    n = bm.try_admit(seq, 1000, count_query=True)
    assert n > 0
    seq.num_computed_tokens += n
    bm.commit(seq, seq.num_computed_tokens)


def test_prefix_hits_revive_freed_blocks_and_skip_the_last_token_block():
    bm = BlockManager(BlockPool(16), BS)
    a = _seq(list(range(10, 23)))  # 13 tokens: 3 full blocks + 1
    _prefill(bm, a)
    first_blocks = list(a.block_table)
    bm.free(a)
    assert bm.pool.num_free == 16 and bm.num_cached_blocks == 3

    b = _seq(list(range(10, 22)) + [99], seq_id=1)  # same 12-token prefix
    n = bm.try_admit(b, 1000, count_query=True)
    assert b.block_table[:3] == first_blocks[:3] and b.num_computed_tokens == 12 and n == 1
    assert b.request.num_cached_tokens == 12
    # A prompt of exactly 12 tokens reuses only 2 blocks: its last token is recomputed in a fresh block.
    c = _seq(list(range(10, 22)), seq_id=2)
    assert bm.try_admit(c, 1000, count_query=True) == 4 and c.num_computed_tokens == 8
    assert c.block_table[:2] == first_blocks[:2] and c.block_table[2] != first_blocks[2]
    assert bm.pool.refcount(first_blocks[0]) == 2
    bm.free(b)
    bm.free(c)
    assert bm.pool.num_free == 16
    assert bm.prefix_hit_tokens == 20 and 0 < bm.prefix_hit_rate < 1


def test_eviction_takes_the_tail_of_an_old_prefix_first():
    bm = BlockManager(BlockPool(6), BS)
    a = _seq(list(range(10, 23)))
    _prefill(bm, a)
    head, mid, tail = a.block_table[:3]
    bm.free(a)
    other = _seq(list(range(50, 58)), seq_id=1)  # 2 blocks: the never-used ones go first
    _prefill(bm, other)
    assert bm.num_cached_blocks == 5
    big = _seq(list(range(60, 68)), seq_id=2)  # 2 more: a's uncached partial block, then a's tail
    assert bm.try_admit(big, 1000, count_query=False) == 8
    assert bm.num_cached_blocks == 4 and tail in big.block_table and head not in big.block_table
    probe = _seq(list(range(10, 23)), seq_id=3)
    assert bm._match_prefix(probe) == [head, mid]


def test_copy_on_write_of_a_shared_partial_block():
    bm = BlockManager(BlockPool(8), BS, enable_prefix_caching=False)
    parent = _seq([5, 6, 7, 8, 9, 10])  # 1 full block + 2 tokens
    _prefill(bm, parent)
    child = _seq([5, 6, 7, 8, 9, 10], seq_id=1)
    bm.fork(parent, child)
    shared = parent.block_table[1]
    assert bm.pool.refcount(shared) == 2
    parent.token_ids.append(11)
    assert bm.blocks_needed(parent, 1) == 1
    bm.append(parent, 1)
    (copy,) = bm.take_pending_copies()
    assert copy == (shared, parent.block_table[1]) and parent.block_table[1] != shared
    assert bm.pool.refcount(shared) == 1 and parent.block_table[0] == child.block_table[0]
    child.token_ids.append(12)
    bm.append(child, 1)  # the last owner writes in place
    assert bm.take_pending_copies() == [] and child.block_table[1] == shared
    bm.free(parent)
    bm.free(child)
    assert bm.pool.num_free == 8


def _assert_rows_mirror(bm: BlockManager, seqs) -> None:
    rows = bm.rows
    held = [s for s in seqs if s.block_table]
    assert len({s.table_row for s in held}) == len(held), "two sequences share a row"
    for s in seqs:
        if not s.block_table:
            assert s.table_row == -1
            continue
        n = len(s.block_table)
        assert rows.lens[s.table_row] == n
        assert rows.tables[s.table_row, :n].tolist() == s.block_table
        assert not rows.tables[s.table_row, n:].any()
    for r in range(len(rows.lens)):  # rows no sequence holds are all zero
        if r not in {s.table_row for s in held}:
            assert rows.lens[r] == 0 and not rows.tables[r].any()


def test_table_rows_mirror_admission_growth_forks_copies_and_frees():
    bm = BlockManager(BlockPool(80), BS, enable_prefix_caching=True)
    a = _seq(list(range(10, 23)))  # 3 full blocks + 1 token
    _prefill(bm, a)
    b = _seq(list(range(10, 21)), seq_id=1)  # prefix hits on a's blocks
    _prefill(bm, b)
    child = _seq(list(range(10, 21)), seq_id=2)
    bm.fork(b, child)
    seqs = [a, b, child]
    _assert_rows_mirror(bm, seqs)
    for step in range(40):  # decodes past several block boundaries; b's shared partial block is copied once
        for s in seqs:
            s.token_ids.append(100 + step)
            assert bm.try_append(s, 1)
            s.num_computed_tokens += 1
        _assert_rows_mirror(bm, seqs)
    assert bm.take_pending_copies(), "the forked partial block was never copied"
    bm.free(b)
    _assert_rows_mirror(bm, seqs)
    d = _seq(list(range(300, 400)), seq_id=3)  # takes the row b gave back
    _prefill(bm, d)
    _assert_rows_mirror(bm, [a, b, child, d])


def test_table_rows_grow_in_rows_and_columns():
    bm = BlockManager(BlockPool(600), BS, enable_prefix_caching=False)
    seqs = [_seq([7] * 5, seq_id=i) for i in range(70)]  # more sequences than the 64 initial rows
    for s in seqs:
        _prefill(bm, s)
    wide = _seq(list(range(1000, 1000 + 4 * 70)), seq_id=99)  # 70 blocks: more than the 64 initial columns
    _prefill(bm, wide)
    _assert_rows_mirror(bm, [*seqs, wide])
    for s in seqs[::2]:
        bm.free(s)
    _assert_rows_mirror(bm, [*seqs, wide])
