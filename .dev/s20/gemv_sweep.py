"""GEMV vs cuBLAS at the 8B shape's per-rank linear shapes (TP=1, TP=2), M=1 and 8; weights rotated past L2."""
import itertools, json, math, statistics, sys, time
import torch, torch.nn.functional as F, triton
from hf_paged.kernels.triton_gemv import gemv, GemvConfig, choose_gemv_config

dev = torch.device("cuda")
props = torch.cuda.get_device_properties(dev)
SHAPES = {  # name: (N, K)
    "tp1.qkv": (6144, 4096), "tp1.o": (4096, 4096), "tp1.gate_up": (28672, 4096), "tp1.down": (4096, 14336),
    "tp1.lm_head": (128256, 4096),
    "tp2.qkv": (3072, 4096), "tp2.o": (4096, 2048), "tp2.gate_up": (14336, 4096), "tp2.down": (4096, 7168),
    "tp2.lm_head": (64128, 4096),
}
# copy bandwidth
a = torch.empty(1 << 30, dtype=torch.uint8, device=dev); b = torch.empty_like(a)
for _ in range(3): b.copy_(a)
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(10): b.copy_(a)
torch.cuda.synchronize(); copy_bw = 2 * 10 * a.numel() / (time.perf_counter() - t)
del a, b

def time_graph(fn, ws, x, reps=10):
    fn(x, ws[0]); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for w in ws:
            fn(x, w)
    g.replay(); torch.cuda.synchronize()
    times = []
    for _ in range(5):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(reps): g.replay()
        e.record(); e.synchronize()
        times.append(s.elapsed_time(e) * 1e3 / reps / len(ws))
    del g
    return statistics.median(times)

CONFIGS = [GemvConfig(*c) for c in itertools.product((16, 32, 64), (128, 256, 512), (4, 8), (3, 4, 6))]
res = {"gpu": props.name, "sms": props.multi_processor_count, "copy_tb_s": copy_bw / 1e12,
       "torch": torch.__version__, "triton": triton.__version__, "date": time.strftime("%Y-%m-%d"), "shapes": {}}
print(f"{props.name} copy {copy_bw/1e12:.2f} TB/s", flush=True)
for name, (n, k) in SHAPES.items():
    nbytes = n * k * 2
    ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) / 64 for _ in range(max(2, math.ceil(400e6 / nbytes)))]
    for m in (1, 8):
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        ref = F.linear(x.float(), ws[0].float())
        cublas = time_graph(lambda x, w: F.linear(x, w), ws, x)
        heur = choose_gemv_config(n, k, props.multi_processor_count)
        cands = CONFIGS if m == 1 else list(dict.fromkeys([heur] + top))
        rows = {}
        for c in cands:
            try:
                y = gemv(x, ws[0], None, c)
            except triton.runtime.errors.OutOfResources:
                continue
            err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
            if err > 2e-2:
                print("BAD", name, m, c, err); continue
            rows[c] = time_graph(lambda x, w, c=c: gemv(x, w, None, c), ws, x)
        best = min(rows, key=rows.get)
        h = rows.get(heur) or time_graph(lambda x, w: gemv(x, w, None, heur), ws, x)
        ent = res["shapes"].setdefault(name, {"n": n, "k": k, "mb": nbytes / 1e6})
        ent[f"m{m}"] = {"cublas_us": cublas, "heuristic": list(heur), "heuristic_us": h, "best": list(best),
                        "best_us": rows[best], "cublas_tb_s": nbytes / cublas / 1e6, "best_tb_s": nbytes / rows[best] / 1e6,
                        "heuristic_tb_s": nbytes / h / 1e6}
        if m == 1:
            top = sorted(rows, key=rows.get)[:6]
            ent["m1_top"] = [list(c) for c in top]
            ent["m1_all"] = {str(list(c)): v for c, v in rows.items()}
        print(f"{name:12s} m{m} {nbytes/1e6:7.1f}MB cublas {cublas:7.2f}us ({nbytes/cublas/1e6:.2f}TB/s) "
              f"heur {h:7.2f} ({nbytes/h/1e6:.2f}) best {rows[best]:7.2f} ({nbytes/rows[best]/1e6:.2f}) {list(best)}", flush=True)
    del ws
    torch.cuda.empty_cache()
    import os; os.makedirs(os.environ.get("OUT", "/tmp"), exist_ok=True)
    json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "gemv-sweep.json"), "w"), indent=1)
print("\n| shape | MB | cuBLAS m1 | gemv heur m1 | gemv best m1 | cuBLAS m8 | gemv heur m8 |")
for name, e in res["shapes"].items():
    print(f"| {name} | {e['mb']:.0f} | {e['m1']['cublas_us']:.1f} | {e['m1']['heuristic_us']:.1f} | {e['m1']['best_us']:.1f} {e['m1']['best']} | {e['m8']['cublas_us']:.1f} | {e['m8']['heuristic_us']:.1f} |")
