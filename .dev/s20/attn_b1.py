"""Batch-1 decode attention latency as the engine's decode graphs run it (hint = graph max context)."""
import json, os, statistics, time
import torch
from hf_paged.kernels.triton_attention import paged_attention
from hf_paged.kernels import reference

dev = torch.device("cuda")
LAYERS, BS = 32, 16

def setup(hq, hkv, d, ctx):
    nblk = -(-ctx // BS)
    caches = [(torch.randn(nblk + 1, BS, hkv, d, device=dev, dtype=torch.bfloat16),
               torch.randn(nblk + 1, BS, hkv, d, device=dev, dtype=torch.bfloat16)) for _ in range(LAYERS)]
    q = torch.randn(1, hq, d, device=dev, dtype=torch.bfloat16)
    bt = torch.arange(1, nblk + 1, device=dev, dtype=torch.int32)[None]
    bt = torch.cat([bt, torch.zeros(1, 8192 // BS - nblk, device=dev, dtype=torch.int32)], 1)
    cu = torch.tensor([0, 1], device=dev, dtype=torch.int32)
    cl = torch.tensor([ctx], device=dev, dtype=torch.int32)
    return caches, q, bt, cu, cl

def timed(fn):
    fn(); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay(); torch.cuda.synchronize()
    ts = []
    for _ in range(7):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(20): g.replay()
        e.record(); e.synchronize(); ts.append(s.elapsed_time(e) * 1e3 / 20 / LAYERS)
    return statistics.median(ts)

rows = []
for hq, hkv in ((32, 8), (16, 4)):
    for ctx in (576, 2048, 8192):
        caches, q, bt, cu, cl = setup(hq, hkv, 128, ctx)
        ref = reference.paged_attention(q, *caches[0], cu_seqlens_q=cu, context_lens=cl, block_tables=bt, scale=0.088)
        for hint in (8192, ctx):
            for splits in (None, 1, 2, 4, 8, 16, 32):
                if splits is not None and hint != 8192:
                    continue
                kw = dict(cu_seqlens_q=cu, context_lens=cl, block_tables=bt, scale=0.088, max_seqlen_q=1,
                          max_context_len=hint, num_splits=splits)
                out = paged_attention(q, *caches[0], **kw)
                err = (out.float() - ref.float()).abs().max().item()
                us = timed(lambda: [paged_attention(q, k, v, **kw) for k, v in caches])
                rows.append(dict(hq=hq, hkv=hkv, ctx=ctx, hint=hint, splits=splits, us=us, err=err))
                print(f"h{hq}/{hkv} ctx {ctx:5d} hint {hint:5d} splits {str(splits):4s} {us:6.2f} us  err {err:.3g}", flush=True)
json.dump({"gpu": torch.cuda.get_device_name(), "rows": rows}, open(os.path.join(os.environ.get("OUT", "/tmp"), "attn-b1.json"), "w"), indent=1)
