import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_paged import BlockPool, OutOfBlocksError


def test_allocate_free_roundtrip():
    pool = BlockPool(8)
    a = pool.allocate(3)
    assert len(set(a)) == 3 and pool.num_free == 5 and pool.num_used == 3
    pool.free(a)
    assert pool.num_free == 8


def test_out_of_blocks_leaves_pool_unchanged():
    pool = BlockPool(4)
    held = pool.allocate(3)
    with pytest.raises(OutOfBlocksError, match="2 needed, 1 free of 4"):
        pool.allocate(2)
    assert pool.num_free == 1
    pool.free(held)
    assert pool.num_free == 4


def test_fork_keeps_block_until_last_owner_frees():
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    pool.fork([b])
    assert pool.refcount(b) == 2
    pool.free([b])
    assert pool.num_free == 1 and pool.refcount(b) == 1
    pool.free([b])
    assert pool.num_free == 2


def test_double_free_and_fork_of_free_block_raise():
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    pool.free([b])
    with pytest.raises(ValueError, match="double free"):
        pool.free([b])
    with pytest.raises(ValueError, match="fork free block"):
        pool.fork([b])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["new", "append", "fork", "free"]), st.integers(0, 50)), max_size=80))
def test_random_operations_return_every_block(ops):
    """Sequences grow, fork and end in any order; at the end every block is free with refcount 0."""
    pool = BlockPool(16)
    seqs: list[list[int]] = []
    for op, k in ops:
        try:
            if op == "new":
                seqs.append(pool.allocate(k % 4))
            elif op == "append" and seqs:
                seqs[k % len(seqs)].extend(pool.allocate(1))
            elif op == "fork" and seqs:
                src = seqs[k % len(seqs)]
                pool.fork(src)
                seqs.append(list(src))
            elif op == "free" and seqs:
                pool.free(seqs.pop(k % len(seqs)))
        except OutOfBlocksError:
            pass
        owners = {}
        for s in seqs:
            for b in s:
                owners[b] = owners.get(b, 0) + 1
        assert all(pool.refcount(b) == n for b, n in owners.items())
        assert pool.num_used == len(owners)
    for s in seqs:
        pool.free(s)
    assert pool.num_free == 16
    assert all(pool.refcount(b) == 0 for b in range(16))
