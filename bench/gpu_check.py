"""All GPU correctness checks of the Triton backend in one process; exits non-zero on any failure.

1. Kernels against the fp32 torch reference at real shapes (bf16/fp16 inputs, fresh random data).
2. End to end in bf16: a random 8-layer Llama built twice ("sdpa" and "paged", same weights):
   plain forward logits, and greedy ``generate`` (32 new tokens) on several prompts, where the paged
   tokens must equal sdpa's; where they do not, the divergence is also judged by teacher forcing sdpa
   on the paged tokens (a near-tie in sdpa's own logits is bf16 noise, anything else is a bug).

    PYTHONPATH=. python bench/gpu_check.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

import hf_paged  # noqa: F401  registers "paged"
from hf_paged.cuda_graphs import capture_graph
from hf_paged.kernels import get_backend, reference, triton_backend

RESULTS: list[dict] = []


def record(name: str, ok: bool, required: bool = True, **info) -> None:
    """A failed check with ``required=False`` prints WARN and does not fail the run."""
    RESULTS.append(dict(check=name, ok=bool(ok), required=required, **info))
    extra = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())
    print(f"{'PASS' if ok else 'FAIL' if required else 'WARN'} {name} {extra}", flush=True)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()


def random_paged(q_lens, kv_lens, heads, kv_heads, head_dim, block_size, dtype, starts=None):
    """Random queries and caches; block tables are shuffled, non-contiguous ids; poison in unused blocks."""
    need = [-(-n // block_size) for n in kv_lens]
    num_blocks = sum(need) + 8
    perm = torch.randperm(num_blocks, device="cuda")
    width = max(need)
    tables = torch.zeros(len(kv_lens), width, dtype=torch.int32, device="cuda")
    used = 0
    for i, n in enumerate(need):
        tables[i, :n] = perm[used : used + n].int()
        tables[i, n:] = tables[i, 0]  # unused entries name an owned block (the reference reads them)
        used += n
    k = torch.randn(num_blocks, block_size, kv_heads, head_dim, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    for spare in perm[used:].tolist():  # blocks no sequence owns: NaN, so reading one shows
        k[spare] = float("nan")
        v[spare] = float("nan")
    q = torch.randn(sum(q_lens), heads, head_dim, device="cuda", dtype=dtype)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    meta = dict(cu_seqlens_q=cu, context_lens=torch.tensor(kv_lens, dtype=torch.int32, device="cuda"),
                block_tables=tables, max_seqlen_q=max(q_lens), max_context_len=max(kv_lens),
                kv_start=None if starts is None else torch.tensor(starts, dtype=torch.int32, device="cuda"))
    return q, k, v, meta


def check_kernels() -> None:
    torch.manual_seed(0)
    # store_kv: exact copy into random slots, -1 skipped
    for hkv, d, bs in [(8, 128, 16), (4, 64, 32), (2, 80, 64)]:
        t, nb = 4096, 1024
        kc, vc = (torch.randn(nb, bs, hkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        key, val = (torch.randn(t, hkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        slots = torch.randperm(nb * bs, device="cuda")[:t]
        slots[::7] = -1
        wk, wv = kc.clone(), vc.clone()
        reference.store_kv(key, val, wk, wv, slots)
        triton_backend.store_kv(key, val, kc, vc, slots)
        record(f"store_kv hkv={hkv} d={d} bs={bs}", torch.equal(kc, wk) and torch.equal(vc, wv))

    cases = [  # name, q_lens, kv_lens, heads, kv_heads, head_dim, block, dtype, extra, starts
        ("decode 8B b64", [1] * 64, torch.randint(1, 8192, (64,)).tolist(), 32, 8, 128, 16, torch.bfloat16, {}, None),
        ("decode 1B b4 32k", [1] * 4, [32768, 100, 20000, 9], 32, 8, 64, 16, torch.bfloat16, {}, None),
        ("decode MQA d256 softcap", [1] * 16, torch.randint(1, 3000, (16,)).tolist(), 16, 1, 256, 16,
         torch.bfloat16, {"softcap": 50.0}, None),
        ("spec-decode q=4 window", [4] * 8, torch.randint(4, 5000, (8,)).tolist(), 32, 8, 128, 32,
         torch.bfloat16, {"sliding_window": 1024}, None),
        ("prefill 2x2k", [2048, 2048], [2048, 2048], 32, 8, 128, 16, torch.bfloat16, {}, None),
        ("chunked prefill + decode mix", [512, 1, 1, 300, 1], [4096, 700, 9000, 300, 64], 32, 8, 128, 16,
         torch.bfloat16, {}, None),
        ("prefill left-padded (kv_start)", [600, 600, 600], [600, 600, 600], 16, 4, 64, 16, torch.bfloat16, {},
         [0, 137, 600]),
        ("prefill d96 window softcap fp16", [700, 33], [1200, 33], 12, 4, 96, 64, torch.float16,
         {"sliding_window": 256, "softcap": 30.0}, None),
        ("prefill d80 block32", [257, 1], [300, 1000], 20, 4, 80, 32, torch.bfloat16, {}, None),
        ("prefill MHA d256", [1024], [1024], 8, 8, 256, 16, torch.bfloat16, {}, None),
    ]
    for name, ql, kl, h, hkv, d, bs, dtype, extra, starts in cases:
        q, k, v, meta = random_paged(ql, kl, h, hkv, d, bs, dtype, starts)
        want = reference.paged_attention(q.float(), k.float(), v.float(), scale=d**-0.5, **meta, **extra)
        got = triton_backend.paged_attention(q, k, v, scale=d**-0.5, **meta, **extra)
        err = rel_err(got, want)
        record(f"attention {name}", torch.isfinite(got).all().item() and err < 1e-2, rel_err=err)
    # fp32 reaches fp32 accuracy (ieee dots)
    q, k, v, meta = random_paged([1, 200, 1], [3000, 500, 17], 16, 4, 128, 16, torch.float32)
    err = rel_err(triton_backend.paged_attention(q, k, v, scale=0.1, **meta),
                  reference.paged_attention(q, k, v, scale=0.1, **meta))
    record("attention fp32", err < 1e-5, rel_err=err)
    check_cuda_graph()


def check_cuda_graph() -> None:
    """Capture a split-KV decode step, then replay with other context lengths: no host sync needed."""
    q, k, v, meta = random_paged([1] * 8, [3000] * 8, 32, 8, 128, 16, torch.bfloat16)
    meta["max_context_len"] = 3000
    graph, out = capture_graph(None, lambda: triton_backend.paged_attention(q, k, v, scale=0.088, **meta))
    meta["context_lens"].copy_(torch.randint(1, 3001, (8,), device="cuda", dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    err = rel_err(out, reference.paged_attention(q.float(), k.float(), v.float(), scale=0.088,
                                                 **{**meta, "max_context_len": None}))
    record("cuda graph capture/replay (decode split-KV)", err < 1e-2, rel_err=err)


def build_models():
    from transformers import AutoModelForCausalLM, LlamaConfig

    def config():
        return LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                           num_attention_heads=16, num_key_value_heads=4, head_dim=64,
                           max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0)

    torch.manual_seed(0)
    sdpa = AutoModelForCausalLM.from_config(config(), attn_implementation="sdpa", dtype=torch.bfloat16)
    paged = AutoModelForCausalLM.from_config(config(), attn_implementation="paged", dtype=torch.bfloat16)
    paged.load_state_dict(sdpa.state_dict())
    return sdpa.cuda().eval(), paged.cuda().eval()


@torch.inference_mode()
def check_end_to_end() -> None:
    sdpa, paged = build_models()
    assert get_backend(torch.device("cuda"), torch.bfloat16).name == "triton"
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 32000, (4, 300), generator=g).cuda()
    a, b = sdpa(ids).logits.float(), paged(ids).logits.float()
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    err = rel_err(b, a)
    record("e2e forward logits (dense path)", err < 2e-2 and agree > 0.97, rel_err=err, argmax_agree=agree)

    prompts = [torch.randint(3, 32000, (1, n), generator=g).cuda() for n in (5, 37, 128, 600, 1500)]
    identical, explained, worst_gap = 0, 0, 0.0
    for i, prompt in enumerate(prompts):
        kw = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False)
        want = sdpa.generate(prompt, **kw)
        got = paged.generate(prompt, **kw, return_dict_in_generate=True, output_logits=True)
        steps = torch.stack(got.logits, 1).float()[0]  # [32, V] the paged model's own step logits
        got = got.sequences
        n = prompt.shape[1]
        same = torch.equal(got[:, n : n + 32], want[:, n : n + 32])
        # Teacher-force sdpa on the paged tokens: the logits of every step must match, and each paged
        # token must be sdpa's argmax or within a bf16-noise margin of it.
        forced = sdpa(got).logits[0, n - 1 : n + 31].float()
        err = rel_err(steps, forced)
        tok = got[0, n : n + 32]
        gap = (forced.max(-1).values - forced.gather(-1, tok[:, None])[:, 0]).max().item()
        scale = forced.std().item()
        tie_ok = gap <= 0.05 * scale
        identical += same
        explained += (same or tie_ok) and err < 3e-2
        worst_gap = max(worst_gap, gap / scale)
        print(f"  prompt {i} len {n}: identical={same} step-logit rel_err={err:.3g} "
              f"max gap to sdpa argmax={gap:.3g} (logit std {scale:.3g})", flush=True)
    all_explained = explained == len(prompts)
    # Strict token identity is reported; where every difference is a near-tie it only warns, since
    # bf16 noise flips such ties (the control below shows the torch reference backend does too).
    record(f"e2e greedy generate 32 tokens identical ({identical}/{len(prompts)} prompts)",
           identical == len(prompts), required=not all_explained, identical=identical)
    record("e2e greedy generate: every paged token is sdpa's argmax up to bf16 near-ties (teacher-forced)",
           all_explained, explained=explained, worst_gap_over_std=worst_gap)
    if identical < len(prompts):  # control: the same comparison with the torch reference backend
        os.environ["HF_PAGED_BACKEND"] = "reference"
        get_backend.cache_clear()
        same_ref = sum(
            torch.equal(paged.generate(p, **kw)[:, p.shape[1]:], sdpa.generate(p, **kw)[:, p.shape[1]:])
            for p in prompts
        )
        del os.environ["HF_PAGED_BACKEND"]
        get_backend.cache_clear()
        print(f"  control: reference backend identical on {same_ref}/{len(prompts)} prompts", flush=True)

    # left-padded batch through generate (PagedCache, kv_start) against sdpa
    lens = [40, 300, 7, 128]
    width = max(lens)
    ids = torch.zeros(len(lens), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lens):
        ids[r, width - n :] = torch.randint(3, 32000, (n,), generator=g)
        mask[r, width - n :] = 1
    ids, mask = ids.cuda(), mask.cuda()
    kw = dict(attention_mask=mask, max_new_tokens=32, min_new_tokens=32, do_sample=False)
    want = sdpa.generate(ids, **kw)
    got = paged.generate(ids, **kw)
    rows = (got[:, width:] == want[:, width:]).all(-1).sum().item()
    # teacher-force sdpa on the paged tokens, as above
    full_mask = torch.cat([mask, torch.ones_like(got[:, width:])], 1)
    forced = sdpa(got, attention_mask=full_mask).logits[:, width - 1 : width + 31].float()
    tok = got[:, width : width + 32]
    gap = (forced.max(-1).values - forced.gather(-1, tok[..., None])[..., 0]).max().item()
    tie_ok = gap <= 0.05 * forced.std().item()
    record(f"e2e left-padded batch generate identical rows ({rows}/{len(lens)})", rows == len(lens),
           required=not tie_ok)
    record("e2e left-padded batch: paged tokens are sdpa's argmax up to near-ties (teacher-forced)", tie_ok,
           gap_over_std=gap / forced.std().item())


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None, help="also write gpu_check.json here")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    start = time.time()
    for stage in (check_kernels, check_end_to_end):
        try:
            stage()
        except Exception as exc:  # a crash is a failure of that stage, not of the whole report
            import traceback

            traceback.print_exc()
            record(f"{stage.__name__} raised {type(exc).__name__}: {exc}", False)
    failed = [r for r in RESULTS if not r["ok"] and r["required"]]
    print(f"gpu_check: {len(RESULTS) - len(failed)}/{len(RESULTS)} passed (required) in {time.time() - start:.0f}s", flush=True)
    if args.out:
        with open(f"{args.out}/gpu_check.json", "w") as f:
            json.dump(RESULTS, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
