"""Triton kernels against the torch reference.

On CPU they run under Triton's interpreter (conftest sets TRITON_INTERPRET=1), in fp32 at small
shapes; the ``gpu``-marked tests run the compiled kernels at real shapes in bf16/fp16. Marked
``any_transformers``: the kernels use nothing of Transformers.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.any_transformers

from hf_paged.kernels import reference, triton_attention, triton_backend, triton_tile_map  # noqa: E402
from hf_paged.kernels.triton_attention import Config  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_problem(q_lens, kv_lens, *, heads=4, kv_heads=2, head_dim=64, block_size=16, dtype=torch.float32,
                 starts=None, device=DEVICE, seed=0, spare_blocks=3):
    """Random packed queries over random caches whose block tables use shuffled, non-contiguous ids."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in kv_lens]
    num_blocks = sum(need) + spare_blocks
    width = max(need) + 1
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.randint(0, num_blocks, (len(kv_lens), width), generator=g, dtype=torch.int32)  # junk tail
    used = 0
    for i, n in enumerate(need):
        tables[i, :n] = perm[used : used + n].int()
        used += n
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    query = torch.randn(sum(q_lens), heads, head_dim, generator=g)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    to = dict(device=device)
    meta = dict(
        cu_seqlens_q=cu.to(**to), context_lens=torch.tensor(kv_lens, dtype=torch.int32, **to),
        block_tables=tables.to(**to), max_seqlen_q=max(q_lens), max_context_len=max(kv_lens),
        kv_start=None if starts is None else torch.tensor(starts, dtype=torch.int32, **to),
    )
    return query.to(device, dtype), k_cache.to(device, dtype), v_cache.to(device, dtype), meta


def check(q, k, v, meta, *, atol=2e-5, rtol=2e-5, **kwargs):
    kwargs.setdefault("scale", q.shape[-1] ** -0.5)
    want = reference.paged_attention(q, k, v, **meta, **kwargs)
    got = triton_attention.paged_attention(q, k, v, **meta, **{k_: v_ for k_, v_ in kwargs.items()})
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    return got


# --- store_kv -----------------------------------------------------------------------------------


@pytest.mark.parametrize("hkv,d,bs", [(2, 64, 16), (1, 80, 32), (3, 16, 16)])
def test_store_kv_matches_reference(hkv, d, bs):
    g = torch.Generator().manual_seed(1)
    num_blocks, t = 6, 11
    caches = [torch.randn(num_blocks, bs, hkv, d, generator=g).to(DEVICE) for _ in range(2)]
    key = torch.randn(t, hkv, d, generator=g).to(DEVICE)
    value = torch.randn(t, hkv, d, generator=g).to(DEVICE)
    slots = torch.randperm(num_blocks * bs, generator=g)[:t]
    slots[[2, 7]] = -1
    slots = slots.to(DEVICE)
    want_k, want_v = caches[0].clone(), caches[1].clone()
    reference.store_kv(key, value, want_k, want_v, slots)
    triton_backend.store_kv(key, value, caches[0], caches[1], slots)
    assert torch.equal(caches[0], want_k) and torch.equal(caches[1], want_v)


def test_store_kv_strided_key_and_cast():
    """Non-contiguous keys (a transposed view) and a cast to a bf16 cache."""
    g = torch.Generator().manual_seed(2)
    key = torch.randn(4, 9, 32, generator=g).transpose(0, 1).to(DEVICE)  # [9, 4, 32], strided
    value = torch.randn(9, 4, 32, generator=g).to(DEVICE)
    k_cache = torch.zeros(3, 16, 4, 32, dtype=torch.bfloat16, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.tensor([0, 5, 17, -1, 33, 40, 41, 2, 47], device=DEVICE)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    reference.store_kv(key, value, want_k, want_v, slots)
    triton_backend.store_kv(key, value, k_cache, v_cache, slots)
    # Compiled Triton rounds fp32->bf16 to nearest like torch; the interpreter may truncate (1 ulp).
    tol = dict(rtol=0, atol=0) if DEVICE == "cuda" else dict(rtol=2**-7, atol=1e-6)
    torch.testing.assert_close(k_cache, want_k, **tol)
    torch.testing.assert_close(v_cache, want_v, **tol)
    assert torch.equal(k_cache != 0, want_k != 0)  # the same slots written


# --- attention: decode, prefill, mixed ----------------------------------------------------------


@pytest.mark.parametrize(
    "heads,kv_heads,block_size",
    [(4, 2, 16), (4, 4, 32), (8, 1, 16), (6, 2, 16)],  # GQA, MHA, MQA, non-power-of-two group
)
def test_decode_ragged(heads, kv_heads, block_size):
    kv_lens = [1, 17, 40, 64, 33]  # 1-token sequence, lengths ending mid-block and on a block edge
    q, k, v, meta = make_problem([1] * 5, kv_lens, heads=heads, kv_heads=kv_heads, block_size=block_size)
    check(q, k, v, meta)


@pytest.mark.parametrize("merge", ["in the attention launch", "in a second launch: capture", "in a second launch: many"])
@pytest.mark.parametrize("splits", [2, 3])
def test_decode_split_kv(splits, merge, monkeypatch):
    """Split partials merged by the last split of each row group (eager launches), or by `_reduce_kernel` (launches
    captured in a CUDA graph, more splits than the attention launch merges); the arrival counters are back at zero."""
    if merge.endswith("capture"):
        monkeypatch.setattr(triton_attention, "_stream_key", lambda device: None)
    elif merge.endswith("many"):
        monkeypatch.setattr(triton_attention, "_plans", {})  # plans of earlier calls took the constant's value
        monkeypatch.setattr(triton_attention, "MAX_MERGED_SPLITS", 1)
        monkeypatch.setattr(triton_attention, "_arrival_counts", lambda stream, needed: pytest.fail("counters asked for"))
    q, k, v, meta = make_problem([1, 1, 1], [150, 7, 96], heads=8, kv_heads=2, block_size=16, seed=3)
    want = reference.paged_attention(q, k, v, scale=0.1, **meta)
    got = triton_attention.paged_attention(q, k, v, scale=0.1, **meta, num_splits=splits,
                                           config=Config(16, 16, 4, 1))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    assert all(int(c.abs().sum()) == 0 for c in triton_attention._counts.values())


def test_layers_of_a_step_share_one_plan(monkeypatch):
    """Calls alike in shapes and host ints (the layers of a step) reuse the first one's launch plan and still
    attend their own queries and caches; a longer context (the next step) plans again."""
    monkeypatch.setattr(triton_attention, "_plans", {})
    layers = [make_problem([1, 1], [40, 23], heads=4, kv_heads=2, seed=s) for s in (1, 2)]
    for q, k, v, meta in layers:
        check(q, k, v, meta)
    assert len(triton_attention._plans) == 1
    q, k, v, meta = layers[0]
    check(q, k, v, {**meta, "context_lens": meta["context_lens"] - 1, "max_context_len": 39})
    assert len(triton_attention._plans) == 2


def test_split_partials_are_kept_per_stream_except_under_capture(monkeypatch):
    """Split scratch is allocated once per stream and reused by later calls (decode layers one after another); a
    call under graph capture (no stream key) or one needing more than the kept size gets scratch of its own."""
    partials = triton_attention._split_partials
    monkeypatch.setattr(triton_attention, "_partials", {})
    stream = (torch.device("cpu"), 0)
    o1, lse1 = partials(stream, torch.device("cpu"), (3, 8, 2), 64)
    o2, lse2 = partials(stream, torch.device("cpu"), (1, 8, 4), 32)
    assert o1.shape == (3, 8, 2, 64) and lse1.shape == (3, 8, 2) and o2.shape == (1, 8, 4, 32)
    assert o1.data_ptr() == o2.data_ptr() and partials(stream, torch.device("cpu"), (1, 8, 4), 32)[0] is o2
    assert lse1.data_ptr() >= o1.data_ptr() + o1.numel() * 4  # the two views do not overlap
    captured, _ = partials(None, torch.device("cpu"), (3, 8, 2), 64)
    assert captured.data_ptr() != o1.data_ptr()
    q, k, v, meta = make_problem([1, 1, 1], [150, 7, 96], heads=8, kv_heads=2, block_size=16, seed=3)
    for _ in range(2):  # two calls on one stream's kept scratch: both right
        torch.testing.assert_close(triton_attention.paged_attention(q, k, v, scale=0.1, **meta, num_splits=3),
                                   reference.paged_attention(q, k, v, scale=0.1, **meta), atol=2e-5, rtol=2e-5)
    assert triton_attention._stream_key(q.device) in triton_attention._partials
    monkeypatch.setattr(triton_attention, "_MAX_KEPT_PARTIALS", 100)
    big, _ = partials(stream, torch.device("cpu"), (3, 8, 2), 64)
    assert big.data_ptr() != o1.data_ptr() and triton_attention._partials[stream][0].data_ptr() == o1.data_ptr()


def test_split_heuristic_used_for_long_context():
    """The default heuristic splits a long single-sequence decode (4 pretend SMs in the interpreter)."""
    assert triton_attention.choose_num_splits(2, 4096, 64, 4, 2.0) == 4
    assert triton_attention.choose_num_splits(1, 256, 64, 132, 2.0) == 2  # >= 2 key tiles per split
    assert triton_attention.choose_num_splits(512, 4096, 64, 132, 2.0) == 1
    assert triton_attention.choose_num_splits(256, 2048, 128, 132, 2.0) == 1  # one program per SM already
    assert triton_attention.choose_num_splits(100, 8192, 128, 132, 2.0) == 2  # at most 2 per SM
    assert triton_attention.choose_num_splits(64, 8192, 128, 132, 2.0) == 4  # 5 would need a second wave
    q, k, v, meta = make_problem([1], [300], heads=4, kv_heads=1, block_size=16, seed=4)
    check(q, k, v, meta, scale=0.2)


def test_decode_tile_refinement():
    """Decode tiles by grid: two key tiles in flight (num_stages 5) for a one-wave grid at head_dim 64 and always
    at head_dim 128 (64-key tiles); 256-key tiles for long ranges on a grid of 2-4 waves at head_dim 64."""
    refine = triton_attention.refine_decode_tiles
    cfg = triton_attention.choose_config(64, 4, 1)
    assert (cfg.block_n, cfg.num_stages) == (128, 3)
    two = refine(cfg, 64, 2048, 1, 256, 132)  # batch 32, 2k: 256 programs, two per SM
    assert (two.block_n, two.num_stages) == (128, 5)
    assert refine(cfg, 64, 8192, 4, 64, 132).num_stages == 5  # batch 8 in 4 splits
    assert refine(cfg, 64, 2048, 1, 512, 132) == cfg  # batch 64: more programs than two per SM
    assert refine(cfg, 64, 8192, 1, 512, 132).block_n == 256  # batch 64, 8k: long ranges, under four waves
    assert refine(cfg, 64, 8192, 1, 1024, 132) == cfg  # batch 128: many waves
    d128 = refine(triton_attention.choose_config(128, 4, 1), 128, 8192, 1, 256, 132)
    assert (d128.block_n, d128.num_stages) == (64, 5)
    wide = triton_attention.choose_config(256, 4, 1)
    assert refine(wide, 256, 8192, 1, 256, 132) == wide
    prefill = triton_attention.choose_config(64, 4, 512)
    assert refine(prefill, 64, 8192, 1, 8, 132) == prefill
    assert refine(cfg, 64, 2048, 1, 256, 132, element_size=4) == cfg  # fp32: the shared memory of two tiles
    # a 256-key tile over a ragged batch (compiled: checked on the H200 by bench/kernel_bench.py --tune)
    q, k, v, meta = make_problem([1, 1], [600, 77], heads=8, kv_heads=2, head_dim=64, seed=14)
    want = reference.paged_attention(q, k, v, scale=0.1, **meta)
    got = triton_attention.paged_attention(q, k, v, scale=0.1, **meta, config=Config(16, 256, 4, 3), num_splits=2)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_prefill_tiles_for_step_kv():
    """Prompt steps reading their own K/V through TMA take the tiles tuned for it (H100 sweep)."""
    assert triton_attention.choose_config(128, 4, 2048, step_kv=True) == Config(64, 64, 4, 3)
    assert triton_attention.choose_config(128, 4, 8192, step_kv=True) == Config(128, 128, 8, 3)
    assert triton_attention.choose_config(128, 4, 2048) == Config(128, 64, 4, 3)  # from the pages
    assert triton_attention.choose_config(64, 4, 2048, step_kv=True) == Config(128, 64, 8, 3)


def test_prefill_ragged_gqa():
    q, k, v, meta = make_problem([5, 1, 23, 16], [5, 9, 40, 16], heads=4, kv_heads=2, block_size=16, seed=5)
    check(q, k, v, meta)


def test_mixed_prefill_and_decode_with_small_tiles():
    """Chunked prefill over cached context next to decode tokens; small tiles give several q tiles."""
    q, k, v, meta = make_problem([12, 1, 7, 1], [30, 18, 7, 49], heads=4, kv_heads=2, block_size=16, seed=6)
    want = reference.paged_attention(q, k, v, scale=0.125, **meta)
    for cfg, splits in [(Config(16, 16, 4, 1), 1), (Config(16, 16, 4, 1), 2), (None, None)]:
        got = triton_attention.paged_attention(q, k, v, scale=0.125, **meta, config=cfg, num_splits=splits)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("window", [None, 9])
def test_static_grid_matches_for_any_query_lengths(window):
    """The launch sized from shapes alone (for graphs of mixed steps): decodes, prompt chunks,
    empty padding sequences and padding tokens after the last sequence."""
    q_lens, kv_lens = [1, 37, 0, 5, 1, 0], [20, 60, 0, 5, 33, 0]
    q, k, v, meta = make_problem(q_lens, kv_lens, heads=8, kv_heads=2, seed=7)
    pad = torch.randn(6, *q.shape[1:], device=q.device, dtype=q.dtype)  # tokens no sequence owns
    meta = dict(meta, max_seqlen_q=None, max_context_len=64)
    want = reference.paged_attention(q, k, v, **meta, scale=0.125, sliding_window=window)
    got = triton_attention.paged_attention(torch.cat([q, pad]), k, v, **meta, scale=0.125, sliding_window=window,
                                           static_grid=True)
    torch.testing.assert_close(got[: q.shape[0]], want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("skip_decodes,want", [(False, [0, 1, 6, 6, 7, 8, 8]), (True, [0, 0, 5, 5, 6, 6, 6])])
def test_tile_map_gives_decodes_no_tile_when_they_launch_apart(skip_decodes, want):
    """A static-grid step's map from program to sequence: first tile of each sequence, then the count (tiles of 8
    queries); split from the decodes' launch, a one-query sequence owns no tile."""
    cu = torch.tensor([0, 1, 38, 38, 43, 44, 44], dtype=torch.int32, device=DEVICE)  # q_lens 1, 37, 0, 5, 1, 0
    tile_map = torch.full((7,), -1, dtype=torch.int32, device=DEVICE)
    triton_tile_map.tile_map_kernel[(1,)](cu, tile_map, 6, 8, SKIP_DECODES=skip_decodes, BLOCK=8)
    assert tile_map.tolist() == want


@pytest.mark.parametrize("window,softcap", [(5, None), (None, 2.0), (12, 5.0)])
def test_window_and_softcap(window, softcap):
    q, k, v, meta = make_problem([6, 1, 20], [22, 35, 20], heads=4, kv_heads=2, block_size=16, seed=7)
    check(q, k, v, meta, sliding_window=window, softcap=softcap)
    # the same with split-KV and small key tiles, so window edges fall inside and across tiles
    want = reference.paged_attention(q, k, v, scale=0.125, sliding_window=window, softcap=softcap, **meta)
    got = triton_attention.paged_attention(q, k, v, scale=0.125, sliding_window=window, softcap=softcap, **meta,
                                           config=Config(16, 16, 4, 1), num_splits=2)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_window_spanning_several_key_tiles():
    """A chunk of queries whose window starts mid-tile: leading masked, full and trailing masked tiles."""
    q, k, v, meta = make_problem([8, 19], [100, 90], heads=4, kv_heads=2, block_size=16, seed=13)
    for kv_start in (None, [0, 41]):
        meta["kv_start"] = None if kv_start is None else torch.tensor(kv_start, dtype=torch.int32, device=DEVICE)
        want = reference.paged_attention(q, k, v, scale=0.125, sliding_window=60, **meta)
        for splits in (1, 2):
            got = triton_attention.paged_attention(q, k, v, scale=0.125, sliding_window=60, **meta,
                                                   config=Config(16, 16, 4, 1), num_splits=splits)
            torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_kv_start_left_padding_and_fully_padded_row():
    """Left padding hides leading keys; a sequence whose every key is padding outputs zeros."""
    q, k, v, meta = make_problem([4, 4, 1], [20, 20, 9], starts=[3, 20, 8], heads=4, kv_heads=2, seed=8)
    out = check(q, k, v, meta)
    assert torch.count_nonzero(out[4:8]) == 0
    want = reference.paged_attention(q, k, v, scale=0.125, **meta)
    got = triton_attention.paged_attention(q, k, v, scale=0.125, **meta, config=Config(16, 16, 4, 1), num_splits=3)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("head_dim,block_size", [(80, 32), (32, 16)])
def test_padded_and_small_head_dims(head_dim, block_size):
    q, k, v, meta = make_problem([3, 1], [35, 50], heads=4, kv_heads=2, head_dim=head_dim,
                                 block_size=block_size, seed=9)
    check(q, k, v, meta)


def test_dense_block_size_and_missing_hints():
    """One block per sequence of arbitrary size (the dense fallback path), no launch hints."""
    q, k, v, meta = make_problem([7, 7], [7, 7], block_size=7, seed=10)
    meta.update(max_seqlen_q=None, max_context_len=None)
    check(q, k, v, meta)


def step_kv(k, v, meta):
    """The keys/values the step wrote: each sequence's last ``q_len`` positions, gathered from its pages."""
    cu, lens, tables = (meta[n].cpu() for n in ("cu_seqlens_q", "context_lens", "block_tables"))
    bs = k.shape[1]
    rows = []
    for i in range(len(lens)):
        q_len = int(cu[i + 1] - cu[i])
        pos = torch.arange(int(lens[i]) - q_len, int(lens[i]))
        rows.append(tables[i, pos // bs].long() * bs + pos % bs)
    slots = torch.cat(rows).to(k.device)
    return k.flatten(0, 1)[slots], v.flatten(0, 1)[slots]


@pytest.mark.parametrize("case", ["prefill", "prefill, default tiles", "chunked+decode", "window+kv_start",
                                  "softcap+split", "static_grid"])
def test_step_kv_read_directly(case):
    """Prompt steps given the step's own K/V read those keys through TMA descriptors (interpreted on CPU)
    and the earlier ones from the pages: the same result as the pages alone."""
    q_lens, kv_lens, extra, kw = [40, 23, 64], [40, 23, 64], {}, {}
    if case == "chunked+decode":
        q_lens, kv_lens = [1, 37, 1, 20], [50, 90, 17, 20]
    if case == "window+kv_start":
        q_lens, kv_lens, extra = [33, 40], [70, 40], {"sliding_window": 21}
    q, k, v, meta = make_problem(q_lens, kv_lens, heads=8, kv_heads=2, head_dim=32, seed=15)
    if case == "window+kv_start":
        meta["kv_start"] = torch.tensor([5, 3], dtype=torch.int32, device=DEVICE)
    if case == "softcap+split":
        extra, kw = {"softcap": 3.0}, {"num_splits": 2}
    if case == "static_grid":
        meta, kw = dict(meta, max_seqlen_q=None), {"static_grid": True}
    key, value = step_kv(k, v, meta)
    want = reference.paged_attention(q, k, v, scale=0.125, **meta, **extra)
    cfg = None if case == "prefill, default tiles" else Config(64, 16, 4, 1)
    assert triton_attention._reads_step_kv(key, value, q, 64 * 4)
    got = triton_attention.paged_attention(q, k, v, scale=0.125, **meta, **extra, **kw, config=cfg,
                                           key=key, value=value)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


class _FakeGluon:
    """Stands in for `gluon_prefill` on the CPU: counts its calls and answers with the reference."""

    BLOCK_M = 128

    def __init__(self):
        self.calls, self.tile_map, self.query = 0, None, None

    def prefill(self, query, k_cache, v_cache, key, value, cu_seqlens_q, context_lens, block_tables, scale,
                max_seqlen_q, out, tile_map=None):
        """The reference's rows; with a tile map only those of sequences that own tiles (decodes launch apart)."""
        self.calls, self.tile_map, self.query = self.calls + 1, tile_map, query
        want = reference.paged_attention(query, k_cache, v_cache, cu_seqlens_q=cu_seqlens_q,
                                         context_lens=context_lens, block_tables=block_tables, scale=scale)
        for s in range(len(context_lens)):
            if tile_map is None or tile_map[s + 1] > tile_map[s]:
                out[cu_seqlens_q[s]:cu_seqlens_q[s + 1]] = want[cu_seqlens_q[s]:cu_seqlens_q[s + 1]]
        return out


@pytest.mark.parametrize("case,gluon", [
    ("prompts", True), ("chunked prompts, page 128", True), ("bf16, page 8", True), ("no step K/V", False),
    ("fp32", False), ("head_dim 64", False), ("page 4", False), ("mostly decodes", False), ("a prompt past GLUON_MAX_SEQLEN_Q", False),
    ("window", False), ("softcap", False), ("kv_start", False), ("config", False), ("num_splits", False),
    ("static grid, decodes apart", True), ("strided query, copied", True),
    ("caches off 16-byte alignment", False), ("not on Hopper", False),
    ("HF_PAGED_GLUON=0", False)])
def test_prompt_steps_choose_the_gluon_kernel(case, gluon, monkeypatch):
    """On Hopper (stood in for here) a prompt step at head_dim 128 in fp16/bf16 goes to the Gluon kernel, unless it
    needs what that kernel does not do or is mostly decodes; the others keep the Triton launches. A static grid's
    decodes take the Triton decode launch, the rest the Gluon kernel through a tile map. Either way the result is
    the reference's."""
    fake = _FakeGluon()
    monkeypatch.setattr(triton_attention, "_gluon_prefill", lambda device: None if case == "not on Hopper" else fake)
    monkeypatch.setattr(triton_attention, "_plans", {})
    q_lens, kv_lens, page, dtype, d, extra = [130, 200], [130, 200], 16, torch.float16, 128, {}
    if case == "chunked prompts, page 128":
        q_lens, kv_lens, page = [230, 200, 1], [300, 200, 400], 128
    if case == "bf16, page 8":
        dtype, page = torch.bfloat16, 8
    if case == "fp32":
        dtype = torch.float32
    if case == "head_dim 64":
        d = 64
    if case == "page 4":
        page = 4
    if case in ("mostly decodes", "static grid, decodes apart"):
        q_lens, kv_lens = [200, 1, 1, 1], [200, 50, 60, 70]
    q, k, v, meta = make_problem(q_lens, kv_lens, heads=8, kv_heads=2, head_dim=d, block_size=page, dtype=dtype,
                                 seed=21)
    key, value = step_kv(k, v, meta)
    if case == "no step K/V":
        key = value = None
    if case == "HF_PAGED_GLUON=0":
        monkeypatch.setenv("HF_PAGED_GLUON", "0")
    if case == "a prompt past GLUON_MAX_SEQLEN_Q":
        monkeypatch.setattr(triton_attention, "GLUON_MAX_SEQLEN_Q", 199)
    extra = {"window": {"sliding_window": 50}, "softcap": {"softcap": 20.0}, "config": {"config": Config(64, 16, 4, 1)},
             "num_splits": {"num_splits": 1}, "static grid, decodes apart": {"static_grid": True}}.get(case, {})
    if case == "kv_start":
        meta["kv_start"] = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    if case == "strided query, copied":
        q = torch.cat([q, q], dim=-1)[..., :d]
    if case == "caches off 16-byte alignment":
        k, v = (torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].view_as(t).copy_(t) for t in (k, v))
    want = reference.paged_attention(q.float(), k.float(), v.float(), scale=0.1, **meta,
                                     **{n: x for n, x in extra.items() if n in ("sliding_window", "softcap")})
    got = triton_attention.paged_attention(q, k, v, scale=0.1, **meta, **extra, key=key, value=value)
    assert fake.calls == int(gluon)
    if "static" in case:
        assert fake.tile_map.tolist() == [0, 2, 2, 2, 2]  # 128-query tiles, none for the decodes
    if case == "strided query, copied":  # the kernel gets a query TMA can address
        assert fake.query.is_contiguous() and not q.is_contiguous()
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


def test_gluon_plans_are_not_reused_for_caches_off_alignment(monkeypatch):
    """Plans are cached by shapes and strides, not addresses: a step whose caches are not 16-byte aligned (TMA's
    need) gets a plan of its own, on the Triton launches, even after an aligned step of the same shapes."""
    fake = _FakeGluon()
    monkeypatch.setattr(triton_attention, "_gluon_prefill", lambda device: fake)
    monkeypatch.setattr(triton_attention, "_plans", {})
    q, k, v, meta = make_problem([130, 200], [130, 200], heads=8, kv_heads=2, head_dim=128, dtype=torch.float16)
    key, value = step_kv(k, v, meta)
    off = [torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].view_as(t).copy_(t) for t in (k, v)]
    want = reference.paged_attention(q.float(), k.float(), v.float(), scale=0.1, **meta)
    for caches, calls in ((k, v), 1), (off, 1):
        got = triton_attention.paged_attention(q, *caches, scale=0.1, **meta, key=key, value=value)
        assert fake.calls == calls
        torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


def _step_slots(meta, block_size):
    """Each sequence's slots for its last ``q_len`` positions (where this step's keys go)."""
    cu, lens, tables = (meta[n].cpu() for n in ("cu_seqlens_q", "context_lens", "block_tables"))
    rows = []
    for i in range(len(lens)):
        pos = torch.arange(int(lens[i]) - int(cu[i + 1] - cu[i]), int(lens[i]))
        rows.append(tables[i, pos // block_size].long() * block_size + pos % block_size)
    return torch.cat(rows)


@pytest.mark.parametrize("case", ["unsplit", "splits merged in the launch", "splits merged apart", "window+kv_start",
                                  "padding slot", "prompt: store_kv", "strided value: store_kv"])
def test_step_keys_handed_over_are_stored_first(case, monkeypatch):
    """Given ``slot_mapping``, the call stores the step's keys before attending: inside the attention launch for
    one query per sequence (the program holding each sequence's last key writes it; no `store_kv` launch), by
    `store_kv` otherwise. Caches and output as `store_kv` followed by the reference."""
    fused = not case.endswith("store_kv")
    q_lens = [4, 1, 3] if case.startswith("prompt") else [1, 1, 1]
    q, k, v, meta = make_problem(q_lens, [150, 7, 96], heads=8, kv_heads=2, block_size=16, seed=21)
    extra, kw = {}, {}
    if case.startswith("splits"):
        kw = dict(num_splits=3, config=Config(16, 16, 4, 1))
    if case == "splits merged apart":
        monkeypatch.setattr(triton_attention, "_stream_key", lambda device: None)
    if case == "window+kv_start":
        extra, kw = dict(sliding_window=40), dict(num_splits=2, config=Config(16, 16, 4, 1))
        meta["kv_start"] = torch.tensor([3, 0, 90], dtype=torch.int32, device=DEVICE)
    g = torch.Generator().manual_seed(5)
    key = torch.randn(q.shape[0], 2, 64, generator=g).to(DEVICE)
    value = torch.randn(q.shape[0], 2, 64, generator=g).to(DEVICE)
    if case.startswith("strided"):
        value = value.transpose(0, 1).contiguous().transpose(0, 1)
    slots = _step_slots(meta, 16).to(DEVICE)
    if case == "padding slot":
        slots[1] = -1
    k_want, v_want = k.clone(), v.clone()
    reference.store_kv(key, value, k_want, v_want, slots)
    want = reference.paged_attention(q, k_want, v_want, scale=0.1, **meta, **extra)
    stored = []
    real_store = triton_attention.store_kv
    monkeypatch.setattr(triton_attention, "store_kv", lambda *a: stored.append(1) or real_store(*a))
    got = triton_attention.paged_attention(q, k, v, scale=0.1, **meta, **extra, **kw, key=key, value=value,
                                           slot_mapping=slots)
    assert stored == ([] if fused else [1])
    torch.testing.assert_close(k, k_want, atol=0, rtol=0)
    torch.testing.assert_close(v, v_want, atol=0, rtol=0)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_step_kv_layouts():
    """Strided or unaligned step K/V are copied into a layout TMA reads; decode-like steps and head dims
    that are not a power of two use the pages."""
    q, k, v, meta = make_problem([40, 23], [40, 30], heads=8, kv_heads=2, head_dim=32, seed=16)
    key, value = step_kv(k, v, meta)
    reads = triton_attention._reads_step_kv
    assert not reads(key, value, q, 16)  # decode-like: one key or two per sequence
    q80, k80, v80, meta80 = make_problem([40], [40], heads=4, kv_heads=2, head_dim=80, block_size=32, seed=17)
    assert not reads(*step_kv(k80, v80, meta80), q80, 256)
    want = reference.paged_attention(q, k, v, scale=0.125, **meta)
    strided = key.transpose(0, 1).contiguous().transpose(0, 1)  # [T, Hkv, D] over [Hkv, T, D] memory
    unaligned = torch.empty(value.numel() + 1, dtype=value.dtype, device=value.device)[1:].view(value.shape)
    unaligned.copy_(value)
    assert reads(strided, unaligned, q, 256)
    got = triton_attention.paged_attention(q, k, v, scale=0.125, **meta, config=Config(64, 16, 4, 1), key=strided,
                                           value=unaligned)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_unsupported_inputs_raise():
    q, k, v, meta = make_problem([1], [5])
    with pytest.raises(ValueError):
        triton_attention.paged_attention(q.half(), k, v, scale=1.0, **meta)  # mixed dtypes
    with pytest.raises(NotImplementedError):
        triton_attention.paged_attention(q.double(), k.double(), v.double(), scale=1.0, **meta)
    with pytest.raises(ValueError):
        triton_attention.paged_attention(q[:, :3], k, v, scale=1.0, **meta)  # 3 heads over 2 KV heads
    big = torch.zeros(1, 2, 300)
    with pytest.raises(NotImplementedError):
        triton_attention.paged_attention(big, torch.zeros(1, 16, 2, 300), torch.zeros(1, 16, 2, 300),
                                         scale=1.0, **meta)
    with pytest.raises(ValueError, match="pass both"):  # where to store, but nothing to store
        triton_attention.paged_attention(q, k, v, scale=1.0, **meta, slot_mapping=torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="do not match key"):  # a step's keys of the wrong shape
        triton_attention.paged_attention(q, k, v, scale=1.0, **meta, key=torch.zeros(1, 3, 64),
                                         value=torch.zeros(1, 3, 64), slot_mapping=torch.zeros(1, dtype=torch.long))


def test_hook_offers_backend_only_for_cuda():
    assert triton_backend.hf_paged_kernel_backend(device=torch.device("cpu"), dtype=torch.float32) is None
    assert triton_backend.hf_paged_kernel_backend(device=torch.device("cuda"), dtype=torch.float64) is None
    offered = triton_backend.hf_paged_kernel_backend(device=torch.device("cuda"), dtype=torch.bfloat16)
    assert offered is triton_backend and offered.name == "triton"


# --- GPU: real shapes, half precision -----------------------------------------------------------


def _rel_err(got, want):
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


GPU_CASES = [  # (dtype, head_dim, heads, kv_heads, block_size, extra)
    (torch.bfloat16, 128, 32, 8, 16, {}),
    (torch.bfloat16, 64, 32, 8, 32, {}),
    (torch.bfloat16, 256, 8, 4, 16, {"softcap": 30.0}),
    (torch.bfloat16, 96, 12, 12, 64, {}),
    (torch.bfloat16, 128, 16, 1, 16, {"sliding_window": 256}),
    (torch.float16, 128, 32, 8, 16, {"sliding_window": 300, "softcap": 20.0}),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,head_dim,heads,kv_heads,block_size,extra", GPU_CASES)
def test_gpu_decode_and_prefill(dtype, head_dim, heads, kv_heads, block_size, extra):
    """Decode (split-KV) and mixed prefill/decode batches at real sizes against the fp32 reference."""
    for q_lens, kv_lens in [([1] * 8, [1, 100, 513, 2048, 4000, 17, 64, 1500]),
                            ([300, 1, 64, 1, 700], [300, 900, 1000, 33, 700])]:
        q, k, v, meta = make_problem(q_lens, kv_lens, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                                     block_size=block_size, dtype=dtype, seed=head_dim)
        want = reference.paged_attention(q.float(), k.float(), v.float(), scale=head_dim**-0.5, **meta, **extra)
        key, value = step_kv(k, v, meta)
        for step in ({}, {"key": key, "value": value}):  # pages only; the step's K/V through TMA (SM90+)
            got = triton_backend.paged_attention(q, k, v, scale=head_dim**-0.5, **meta, **extra, **step)
            assert torch.isfinite(got).all()
            assert _rel_err(got, want) < 1e-2, (q_lens, extra, list(step))


@pytest.mark.gpu
def test_gpu_fp32_exact():
    q, k, v, meta = make_problem([1, 5, 40], [700, 5, 90], heads=8, kv_heads=2, head_dim=64, seed=11)
    check(q, k, v, meta, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_gpu_step_kv_cuda_graph():
    """A mixed step reading its own K/V through TMA captures into a graph (static grid) and replays."""
    q, k, v, meta = make_problem([300, 1, 200, 1], [300, 900, 1000, 33], heads=32, kv_heads=8, head_dim=128,
                                 dtype=torch.bfloat16, seed=18)
    key, value = step_kv(k, v, meta)
    meta = dict(meta, max_seqlen_q=None, max_context_len=1024)
    fn = lambda: triton_backend.paged_attention(q, k, v, scale=0.088, **meta, static_grid=True,  # noqa: E731
                                                key=key, value=value)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    want = reference.paged_attention(q.float(), k.float(), v.float(), scale=0.088, **dict(meta, max_context_len=None))
    assert _rel_err(out, want) < 1e-2


@pytest.mark.gpu
def test_gpu_decode_cuda_graph():
    """A decode launch (split-KV) captures into a CUDA graph and replays with new lengths."""
    q, k, v, meta = make_problem([1] * 4, [3000, 50, 1024, 7], heads=32, kv_heads=8, head_dim=128,
                                 dtype=torch.bfloat16, seed=12)
    meta["max_context_len"] = 4096
    fn = lambda: triton_backend.paged_attention(q, k, v, scale=0.088, **meta)  # noqa: E731
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        fn()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    meta["context_lens"].copy_(torch.tensor([3001, 49, 1000, 8], device="cuda", dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    meta["max_context_len"] = None  # the reference sizes itself from the lengths
    want = reference.paged_attention(q.float(), k.float(), v.float(), scale=0.088, **meta)
    assert _rel_err(out, want) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim,kv_lens", [(64, [1, 100, 513, 2048, 4000, 17, 64, 1500]), (128, [30000]),
                                              (128, [700] * 64)])
def test_gpu_decode_stores_the_step_keys_in_its_launch(head_dim, kv_lens):
    """The decode launch that stores its step's keys (split or not, the splits running at once) leaves the caches
    as `store_kv` does and attends over the new keys; bit-equal caches, output as the reference's."""
    q, k, v, meta = make_problem([1] * len(kv_lens), kv_lens, heads=32, kv_heads=8, head_dim=head_dim,
                                 dtype=torch.bfloat16, seed=head_dim)
    key, value = (torch.randn(len(kv_lens), 8, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    slots = _step_slots(meta, 16).cuda()
    k_want, v_want = k.clone(), v.clone()
    reference.store_kv(key, value, k_want, v_want, slots)
    want = reference.paged_attention(q.float(), k_want.float(), v_want.float(), scale=0.1, **meta)
    for _ in range(3):  # repeated calls: the counters and the stores stay consistent
        got = triton_backend.paged_attention(q, k, v, scale=0.1, **meta, key=key, value=value, slot_mapping=slots)
        assert torch.equal(k, k_want) and torch.equal(v, v_want)
        assert _rel_err(got, want) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,heads,kv_heads,page", [(torch.bfloat16, 32, 8, 16), (torch.float16, 32, 8, 128),
                                                       (torch.bfloat16, 16, 1, 256), (torch.bfloat16, 8, 8, 8)])
def test_gpu_gluon_prefill(dtype, heads, kv_heads, page, monkeypatch):
    """Hopper prompt steps at head_dim 128 (the Gluon kernel, counted): fresh prompts, chunks after earlier keys
    in the pages (prefixes not a multiple of a tile or a page), decodes among them, and a batch of one 4k prompt,
    each launched by the longest prompt and from shapes alone (a static grid); against the fp32 reference."""
    module = triton_attention._gluon_prefill(torch.device("cuda"))
    if module is None:
        pytest.skip("the Gluon kernel runs on Hopper with Triton " + " / ".join(triton_attention.GLUON_TRITON_VERSIONS))
    calls = []
    monkeypatch.setattr(module, "prefill", lambda *a, _run=module.prefill: calls.append(1) or _run(*a))
    for q_lens, kv_lens in [([700, 129, 1000], [700, 129, 1000]), ([300, 64, 700, 1], [1000, 64, 900, 517]),
                            ([4096], [4096]), ([128, 255], [300, 1200])]:
        q, k, v, meta = make_problem(q_lens, kv_lens, heads=heads, kv_heads=kv_heads, head_dim=128, block_size=page,
                                     dtype=dtype, seed=len(q_lens))
        key, value = step_kv(k, v, meta)
        want = reference.paged_attention(q.float(), k.float(), v.float(), scale=0.088, **meta)
        for grid in ({}, {"static_grid": True, "max_seqlen_q": None}):  # decodes launch apart in a static grid
            got = triton_backend.paged_attention(q, k, v, scale=0.088, **{**meta, **grid}, key=key, value=value)
            assert _rel_err(got, want) < 1e-2, (q_lens, kv_lens, grid)
    assert len(calls) == 8


@pytest.mark.gpu
def test_gpu_gluon_prefill_compiles_once_for_every_step_shape():
    """Engine steps differ in sequence count, tiles, block-table width and where their metadata sits in the step's
    upload: the Gluon kernel compiles once (eager) and once (static grid) for all of them, not while serving."""
    module = triton_attention._gluon_prefill(torch.device("cuda"))
    if module is None:
        pytest.skip("the Gluon kernel runs on Hopper with Triton " + " / ".join(triton_attention.GLUON_TRITON_VERSIONS))

    def offset(t):  # 4-byte aligned, as a tensor inside the engine's one metadata buffer may be
        return torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].view_as(t).copy_(t)

    compiled = module._prefill_kernel.device_caches[torch.cuda.current_device()][0]
    for step, (q_lens, kv_lens) in enumerate([([256], [256]), ([128, 128], [128, 300]), ([200] * 16, [200] * 16),
                                              ([130] * 17, [130 + 7 * i for i in range(17)]), ([2048], [2048])]):
        q, k, v, meta = make_problem(q_lens, kv_lens, heads=32, kv_heads=8, head_dim=128, dtype=torch.bfloat16)
        meta.update({n: offset(meta[n]) for n in ("cu_seqlens_q", "context_lens")})
        key, value = step_kv(k, v, meta)
        want = reference.paged_attention(q.float(), k.float(), v.float(), scale=0.088, **meta)
        for grid in ({}, {"static_grid": True, "max_seqlen_q": None}):
            got = triton_backend.paged_attention(q, k, v, scale=0.088, **{**meta, **grid}, key=key, value=value)
            assert _rel_err(got, want) < 1e-2, (q_lens, grid)
        if step == 0:
            variants = len(compiled)
    assert len(compiled) == variants
