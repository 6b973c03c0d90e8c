"""The torch reference against plain dense attention with an explicit mask."""

import pytest
import torch

from hf_paged.kernels import reference


def _dense_oracle(q, k, v, scale, start, window, softcap):
    """q [Q,H,D], k/v [K,Hkv,D] of one sequence; the last Q keys are the queries' own."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, 1)
    v = v.repeat_interleave(groups, 1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    kv_len, q_len = k.shape[0], q.shape[0]
    qp = torch.arange(kv_len - q_len, kv_len)[:, None]
    kp = torch.arange(kv_len)[None]
    ok = (kp <= qp) & (kp >= start)
    if window:
        ok &= qp - kp < window
    s = s.masked_fill(~ok, float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(s, -1).nan_to_num(0.0), v)


@pytest.mark.parametrize("window,softcap", [(None, None), (4, None), (None, 0.5), (3, 2.0)])
def test_paged_matches_dense(window, softcap):
    torch.manual_seed(0)
    h, hkv, d, bs, nblocks = 4, 2, 8, 4, 32
    q_lens, kv_lens, starts = [3, 1, 5, 1], [7, 9, 5, 1], [0, 2, 1, 0]
    k_cache = torch.randn(nblocks, bs, hkv, d)
    v_cache = torch.randn(nblocks, bs, hkv, d)
    perm = torch.randperm(nblocks)
    tables = torch.zeros(len(kv_lens), 4, dtype=torch.int32)
    used = 0
    for i, n in enumerate(kv_lens):
        nb = -(-n // bs)
        tables[i, :nb] = perm[used : used + nb].int()
        used += nb
    q = torch.randn(sum(q_lens), h, d)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    out = reference.paged_attention(
        q, k_cache, v_cache, cu_seqlens_q=cu, context_lens=torch.tensor(kv_lens, dtype=torch.int32),
        block_tables=tables, scale=0.3, kv_start=torch.tensor(starts, dtype=torch.int32),
        sliding_window=window, softcap=softcap,
    )
    for i, (ql, kl) in enumerate(zip(q_lens, kv_lens)):
        blocks = tables[i, : -(-kl // bs)].long()
        k = k_cache[blocks].reshape(-1, hkv, d)[:kl]
        v = v_cache[blocks].reshape(-1, hkv, d)[:kl]
        want = _dense_oracle(q[cu[i] : cu[i + 1]], k, v, 0.3, starts[i], window, softcap)
        torch.testing.assert_close(out[cu[i] : cu[i + 1]], want)


def test_store_kv_writes_slots_and_skips_negative():
    k_cache = torch.zeros(3, 2, 1, 4)
    v_cache = torch.zeros(3, 2, 1, 4)
    key = torch.arange(12.0).view(3, 1, 4)
    reference.store_kv(key, -key, k_cache, v_cache, torch.tensor([5, -1, 0]))
    assert torch.equal(k_cache[2, 1, 0], key[0, 0]) and torch.equal(k_cache[0, 0, 0], key[2, 0])
    assert torch.equal(v_cache[2, 1, 0], -key[0, 0])
    assert k_cache.count_nonzero() == 7  # two rows written, one of them holding a zero
