"""PagedCache bookkeeping: copy-on-write, cropping, sizing, and decoding modes that rely on them."""

import pytest
import torch
from tiny_models import VOCAB, make_config, make_pair

from hf_paged import PagedCache


def _update_all_layers(cache, key, value):
    for layer in range(len(cache)):
        cache.update(key, value, layer)


def test_fork_then_write_copies_the_shared_partial_block():
    cfg = make_config("llama-gqa")  # 2 layers, 2 KV heads of dim 16
    cache = PagedCache(cfg, num_blocks=16, block_size=4)
    first = torch.randn(2, 2, 6, 16)
    _update_all_layers(cache, first, -first)
    cache.reorder_cache(torch.tensor([0, 0]))  # both rows now continue row 0: blocks shared
    tables = [list(t) for t in cache._tables]
    assert tables[0] == tables[1] and cache.stats().blocks_used == 2
    step = torch.randn(2, 2, 1, 16)
    _update_all_layers(cache, step, -step)
    after = cache._tables
    assert after[0][0] == after[1][0]  # the full block stays shared
    assert after[0][1] != after[1][1]  # the partial one was copied before the write
    k_cache, _ = cache.pool.layer(1)
    for row in range(2):
        keys = k_cache[after[row]].flatten(0, 1)[:7].transpose(0, 1)  # [Hkv, 7, D]
        torch.testing.assert_close(keys[:, :6], first[0])
        torch.testing.assert_close(keys[:, 6], step[row, :, 0])
    cache.reset()
    assert cache.pool.blocks.num_free == 16


def test_crop_returns_blocks():
    cache = PagedCache(make_config("llama-gqa"), num_blocks=16, block_size=4)
    _update_all_layers(cache, *(torch.randn(3, 2, 10, 16),) * 2)
    assert cache.stats().blocks_used == 9
    cache.crop(-3)  # 7 tokens left: 2 blocks per row
    assert cache.get_seq_length() == 7 and cache.stats().blocks_used == 6
    cache.crop(4)  # legacy form: keep 4 tokens
    assert cache.get_seq_length() == 4 and cache.stats().blocks_used == 3


def test_memory_fraction_sizes_the_pool():
    cache = PagedCache(make_config("llama-gqa"), memory_fraction=0.001, block_size=16)
    _update_all_layers(cache, *(torch.randn(1, 2, 3, 16),) * 2)
    per_block = 2 * 2 * 16 * 2 * 16 * 4
    assert cache.pool.num_blocks > 1
    assert cache.pool.nbytes == cache.pool.num_blocks * per_block


def test_cuda_pool_sizing_counts_memory_the_allocator_holds_unused(monkeypatch):
    """Memory this process's allocator keeps after tensors were freed (weights replaced by fused ones) is
    free for the pool: it is given back when the pool's allocation needs it."""
    from hf_paged.cache.geometry import num_blocks_for_memory

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 << 30, 80 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 30 << 30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 24 << 30)
    assert num_blocks_for_memory(0.5, "cuda", 1 << 20) == (16 << 30) // 2 // (1 << 20)


@pytest.mark.parametrize("mode", [dict(prompt_lookup_num_tokens=3), "assistant"])
def test_speculative_decoding_crops_correctly(mode):
    paged, ref = make_pair("llama-gqa")
    ids = torch.randint(4, VOCAB, (1, 8), generator=torch.Generator().manual_seed(2))
    if mode == "assistant":
        paged_draft, ref_draft = make_pair("llama-gqa", seed=3)
        kwargs_ref, kwargs_paged = dict(assistant_model=ref_draft), dict(assistant_model=paged_draft)
    else:
        kwargs_ref = kwargs_paged = mode
    want = ref.generate(input_ids=ids, max_new_tokens=12, do_sample=False, **kwargs_ref)
    got = paged.generate(input_ids=ids, max_new_tokens=12, do_sample=False, **kwargs_paged)
    assert torch.equal(got, want)


def _gen(model, ids, cache=None):
    from hf_paged.registration import _cache_kwarg

    kw = {} if cache is None else {_cache_kwarg({}): cache}
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, **kw)


@pytest.mark.parametrize("second_len", [5, 8, 14])  # shorter, equal, longer than the first prompt
def test_reusing_a_cache_for_a_new_prompt_starts_fresh(second_len):
    paged, _ = make_pair("llama-gqa")
    g = torch.Generator().manual_seed(5)
    first = torch.randint(4, VOCAB, (2, 8), generator=g)
    second = torch.randint(4, VOCAB, (2, second_len), generator=g)
    cache = PagedCache(paged.config, num_blocks=64, block_size=4)
    got1, got2 = _gen(paged, first, cache), _gen(paged, second, cache)
    assert torch.equal(got1, _gen(paged, first, PagedCache(paged.config)))
    assert torch.equal(got2, _gen(paged, second, PagedCache(paged.config)))
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.stats().blocks_used == 0


def test_reusing_a_cache_to_continue_keeps_it():
    paged, ref = make_pair("llama-gqa")
    ids = torch.randint(4, VOCAB, (1, 7), generator=torch.Generator().manual_seed(6))
    cache = PagedCache(paged.config, num_blocks=64, block_size=4)
    out = _gen(paged, ids, cache)
    held = cache.get_seq_length()
    more = torch.cat([out, torch.tensor([[5, 6]])], dim=1)
    got = _gen(paged, more, cache)
    assert torch.equal(got, _gen(ref, more))
    assert cache.get_seq_length() > held


def test_released_pool_holds_no_layer_views():
    """`KVPool.layer` hands out views made once; `release` must drop them with the storage, or they keep it alive."""
    import gc
    import weakref

    from hf_paged.cache.kv_pool import KVPool

    pool = KVPool(num_layers=3, num_blocks=4, block_size=2, num_kv_heads=1, head_dim=4, dtype=torch.float32,
                  device="cpu")
    k, v = pool.layer(2)
    assert k.data_ptr() == pool.storage[2, 0].data_ptr() and v.data_ptr() == pool.storage[2, 1].data_ptr()
    storage = weakref.ref(pool.storage)
    del k, v
    pool.release()
    gc.collect()
    assert storage() is None and pool.nbytes == 0


def test_keys_unlike_the_last_checked_ones_are_still_refused():
    """`PagedCache.update` checks a layer fully only when its keys differ from the last ones that passed."""
    cfg = make_config("llama-gqa")
    heads, dim = cfg.num_key_value_heads, cfg.head_dim
    cache = PagedCache(cfg, num_blocks=16)
    good = torch.zeros(1, heads, 3, dim)
    cache.update(good, good, 0)
    cache.update(good, good, 1)  # the fast path
    with pytest.raises(ValueError, match="stores torch.float32, got keys of torch.float16"):
        cache.update(good.half(), good.half(), 0)
    cache.update(good, good, 0)
    with pytest.raises(ValueError, match="KV heads"):
        cache.update(torch.zeros(1, heads + 1, 3, dim), torch.zeros(1, heads + 1, 3, dim), 1)


def test_keys_no_attention_call_took_are_stored_when_the_cache_is_next_updated_or_read():
    """`update` hands the step's keys to the attention call that follows it (a backend may store them in its
    attention launch); keys no attention call took are stored by the next `update` or a read of the pool."""
    cfg = make_config("llama-gqa")  # 2 layers, 2 KV heads of dim 16
    cache = PagedCache(cfg, num_blocks=16, block_size=4)
    keys = torch.randn(1, 2, 3, 16)

    def stored(layer: int) -> torch.Tensor:
        k_cache, v_cache = cache._pool.layer(layer)  # the storage as it is: `pool` would store pending keys first
        rows = k_cache[cache._tables[0]].flatten(0, 1)[:3].transpose(0, 1)
        return rows, v_cache[cache._tables[0]].flatten(0, 1)[:3].transpose(0, 1)

    cache.update(keys, -keys, 0)
    assert not torch.equal(stored(0)[0], keys[0])  # handed over, not stored yet
    cache.update(keys + 1, -keys - 1, 1)  # no attention call took layer 0's keys: stored now
    torch.testing.assert_close(stored(0), (keys[0], -keys[0]))
    assert not torch.equal(stored(1)[0], keys[0] + 1)
    assert cache.pool is not None  # a read stores layer 1's
    torch.testing.assert_close(stored(1), (keys[0] + 1, -keys[0] - 1))
