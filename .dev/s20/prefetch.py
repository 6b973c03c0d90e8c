"""Does an L2 prefetch of the next matmul's weight, issued during a latency-bound kernel, shorten the matmul?
Graph per 'layer': [busy-wait W us on 1 program (+ P programs issuing cp.async.bulk.prefetch.L2 of the first
FRAC of every weight row)] then F.linear(x, weight). Weights rotate past L2 (32 layers)."""
import json, os, statistics
import torch, torch.nn.functional as F, triton, triton.language as tl

@triton.jit
def _now():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)

@triton.jit
def _wait_prefetch(w_ptr, sink_ptr, wait_ns, rows, row_bytes_pf, stride_row_bytes, PREFETCH: tl.constexpr, CHUNK: tl.constexpr):
    pid = tl.program_id(0)
    if pid == 0:
        t0 = _now()
        t = t0
        while t - t0 < wait_ns:
            t = _now()
        tl.store(sink_ptr, (t - t0).to(tl.int32))
    elif PREFETCH:
        # contiguous: the first row_bytes_pf bytes of the weight, CHUNK bytes per instruction
        nprog = tl.num_programs(0) - 1
        base = w_ptr.to(tl.pointer_type(tl.int8))
        total = row_bytes_pf // CHUNK
        for start in range((pid - 1) * 32, total, nprog * 32):
            idx = tl.minimum(start + tl.arange(0, 32), total - 1)
            p = base + idx.to(tl.int64) * CHUNK
            if CHUNK == 16384:
                tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], 16384; mov.u32 $0, 0;",
                                          "=r,l", [p], dtype=tl.int32, is_pure=False, pack=1)
            else:
                tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], 65536; mov.u32 $0, 0;",
                                          "=r,l", [p], dtype=tl.int32, is_pure=False, pack=1)

dev = torch.device("cuda")
sink = torch.zeros(1, dtype=torch.int32, device=dev)
def run(n, k, m, wait_us, frac, progs, chunk=16384, layers=32):
    ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) for _ in range(layers)]
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    row_bytes = k * 2
    pf = int(n * row_bytes * frac) // chunk * chunk
    def body():
        for w in ws:
            _wait_prefetch[(1 + (progs if frac > 0 else 0),)](w, sink, int(wait_us * 1000), n, pf, row_bytes,
                                                            PREFETCH=frac > 0 and pf > 0, CHUNK=chunk, num_warps=1)
            F.linear(x, w)
    body(); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        body()
    g.replay(); torch.cuda.synchronize()
    ts = []
    for _ in range(7):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(10): g.replay()
        e.record(); e.synchronize(); ts.append(s.elapsed_time(e) * 1e3 / 10 / layers)
    del ws
    return statistics.median(ts)

rows = []
for name, (n, k) in {"tp2.gate_up": (14336, 4096), "tp2.qkv": (3072, 4096), "tp2.o": (4096, 2048), "tp2.down": (4096, 7168), "tp1.o": (4096, 4096)}.items():
    for wait in (0, 5, 10):
        base = run(n, k, 1, wait, 0, 0)
        line = f"{name:12s} wait {wait:2d}us: none {base:6.2f}"
        rec = dict(shape=name, wait_us=wait, none_us=base)
        for frac, progs, chunk in ((0.1, 8, 16384), (0.25, 8, 16384), (0.25, 8, 65536), (0.5, 32, 65536), (1.0, 32, 65536)):
            t = run(n, k, 1, wait, frac, progs, chunk)
            line += f" | f{frac} p{progs} c{chunk//1024}k {t:6.2f}"
            rec[f"f{frac}_p{progs}_c{chunk}"] = t
        rows.append(rec); print(line, flush=True)
json.dump({"gpu": torch.cuda.get_device_name(), "rows": rows}, open(os.path.join(os.environ.get("OUT", "/tmp"), "prefetch.json"), "w"), indent=1)
