"""Offline throughput: hf_paged.generate_batch vs Transformers generate and Transformers' continuous batching.

One process, one GPU, a random-weight Llama-shaped model (1.2B by default), random token ids,
``ignore_eos``. Two workloads: ``uniform`` (512 in / 256 out) and ``mixed`` (in ~ U[16, 1024],
out ~ U[16, 512]). Output tokens per second are CUDA-synchronised wall clock after a warm-up;
baselines may run on a subset of the requests (``--baseline-requests``): tokens/s is a rate, so
the ratio stays fair, and the subset size is reported.

    python bench/throughput.py                      # full run on the GPU (1,000 requests each)
    python bench/throughput.py --quick              # 128 requests, baselines on 64
    python bench/throughput.py --tiny --quick       # tiny model, runs anywhere (CPU smoke test)
    python bench/throughput.py --profile --quick    # plus device busy per step kind and a profile
    python bench/throughput.py --model DIR --workloads chat --num-requests 1024   # a real model (SmolLM2)
    python bench/throughput.py --backends triton,fa4 --baselines none    # one engine per kernel backend
    python bench/throughput.py --head-dim 128 --baselines none           # 16 heads of 128 (Gluon prompt kernel)
    python bench/throughput.py --backends triton,fa4 --kernel-shares 300  # plus device time by kernel, per backend

Writes ``bench/results/throughput-<gpu>-<date>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import os
import platform
import random
import re
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hf_paged  # noqa: E402  registers "paged"
from hf_paged import Engine, SamplingParams  # noqa: E402
from hf_paged.cuda_graphs import MAX_MIXED_GRAPH_TOKENS  # noqa: E402
from hf_paged.engine.gc_pauses import quiet_gc  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

MODEL_1B = dict(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, head_dim=64, max_position_embeddings=4096, rope_theta=500000.0,
    tie_word_embeddings=False,
)
MODEL_TINY = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, tie_word_embeddings=False,
)


# -- setup ---------------------------------------------------------------------------------------------


def add_head_dim_arg(p: argparse.ArgumentParser) -> None:
    """``--head-dim`` for the benchmarks whose random-weight model `build_models` makes (see `model_shape`)."""
    p.add_argument("--head-dim", type=int, default=None,
                   help="random-weight model with this head dim (heads = hidden / head_dim, a quarter of them KV "
                        "heads), e.g. 128 for the Gluon prompt kernel on Hopper")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-requests", type=int, default=1000, help="requests per workload for hf_paged")
    p.add_argument("--baseline-requests", type=int, default=256, help="requests per workload for each baseline")
    p.add_argument("--workloads", default="uniform,mixed", help="comma list of: uniform, mixed")
    p.add_argument("--baselines", default="generate,hf_cb", help="comma list of: generate, hf_cb (or 'none')")
    p.add_argument("--hf-batch-size", type=int, default=64, help="static batch size of the model.generate baseline")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--memory-fraction", type=float, default=0.6, help="share of free GPU memory for hf_paged's KV pool")
    p.add_argument("--num-blocks", type=int, default=None, help="KV pool size in blocks (overrides --memory-fraction)")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--no-cuda-graphs", action="store_true", help="run decode steps eagerly")
    p.add_argument("--no-async-scheduling", action="store_true", help="wait for each step's tokens before the next")
    p.add_argument("--compile-model", action="store_true", help="Engine(compile_model=True): torch.compile the model")
    p.add_argument("--gc-baseline", action="store_true",
                   help="also run each workload with Python's default garbage collection in the engine loop "
                        "(hf_paged_default_gc; hf_paged freezes the heap and collects rarely: engine/gc_pauses.py)")
    p.add_argument("--sampling", action="store_true",
                   help="also run each workload with temperature 0.8 (hf_paged_temperature) and with temperature 0.8 "
                        "and top_p 0.95 (hf_paged_top_p): what sampling costs beside greedy decoding")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="128 requests per workload, baselines on 64")
    p.add_argument("--tiny", action="store_true", help="tiny model and 1/8 lengths (a smoke test, CPU-friendly)")
    p.add_argument("--model", default=None,
                   help="a real model directory (e.g. SmolLM2-135M-Instruct from hf_paged.demo_model_dir()) instead "
                        "of random weights; enables the 'chat' workload (its chat template, 256 tokens, ignore_eos)")
    p.add_argument("--profile", action="store_true", help="profile a few engine steps and print where time goes")
    p.add_argument("--profile-steps", type=int, default=6)
    add_head_dim_arg(p)
    p.add_argument("--backends", default=None,
                   help="comma list of kernel backends (e.g. triton,fa4): one engine each, in this process, results "
                        "as hf_paged_<name> (hf_paged: the first); default: the backend hf_paged chooses")
    p.add_argument("--kernel-shares", type=int, default=0, metavar="N",
                   help="after each engine's timed run, run its first N requests again under the CUDA profiler and "
                        "report device time by kernel (the attention kernels' share, the top kernels)")
    p.add_argument("--out", default=None, help="JSON path (default: bench/results/throughput-<gpu>-<date>.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.num_requests = min(args.num_requests, 128)
        args.baseline_requests = min(args.baseline_requests, 64)
    if args.tiny:
        args.dtype = "float32" if args.dtype == "bfloat16" and not torch.cuda.is_available() else args.dtype
        args.max_num_seqs = min(args.max_num_seqs, 64)
        args.max_num_batched_tokens = min(args.max_num_batched_tokens, 1024)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.kernel_shares and torch.device(args.device).type != "cuda":
        p.error("--kernel-shares profiles CUDA kernels: it needs a CUDA device")
    args.workloads = [w for w in args.workloads.split(",") if w]
    args.baselines = [] if args.baselines == "none" else [b for b in args.baselines.split(",") if b]
    args.backends = [b for b in (args.backends or "").split(",") if b]
    return args


def use_backend(name: str | None, device, dtype) -> str:
    """Make ``name`` the kernel backend engines built from now on use (``None``: hf_paged's choice); its name."""
    from hf_paged.kernels import get_backend

    if name:
        os.environ["HF_PAGED_BACKEND"] = name
    get_backend.cache_clear()
    return get_backend(device, dtype).name


def model_shape(args) -> dict:
    """The random-weight model's config: the 1.2B (or tiny) shape, with ``--head-dim`` if given."""
    shape = MODEL_TINY if args.tiny else MODEL_1B
    if args.head_dim:
        heads = shape["hidden_size"] // args.head_dim
        shape = dict(shape, head_dim=args.head_dim, num_attention_heads=heads, num_key_value_heads=max(1, heads // 4))
    return shape


def build_models(args):
    """(sdpa model, paged model): separate modules and configs sharing one set of weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if args.model:
        from hf_paged.loader import load_causal_lm

        paged = load_causal_lm(args.model, dtype=args.dtype).to(args.device)
        sdpa = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype),
                                                    attn_implementation="sdpa").to(args.device).eval()
        for m in (sdpa, paged):  # every request runs to its max_new_tokens in every system
            m.generation_config.eos_token_id = None
        return sdpa, paged, sum(p.numel() for p in sdpa.parameters())
    shape = model_shape(args)
    dtype = getattr(torch, args.dtype)
    # No EOS: every request runs to its max_new_tokens in every system.
    common = dict(shape, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        sdpa = AutoModelForCausalLM.from_config(LlamaConfig(**common), attn_implementation="sdpa", dtype=dtype).eval()
        paged = AutoModelForCausalLM.from_config(LlamaConfig(**common), attn_implementation="paged", dtype=dtype).eval()
    paged.load_state_dict(sdpa.state_dict(), assign=True)
    for m in (sdpa, paged):
        m.generation_config.eos_token_id = None
        m.generation_config.pad_token_id = 0
    n_params = sum(p.numel() for p in sdpa.parameters())
    return sdpa, paged, n_params


def make_workload(name: str, n: int, vocab: int, seed: int, scale: float, tokenizer=None) -> list[tuple[list[int], int]]:
    """``n`` (prompt ids, max_new_tokens) pairs."""
    rng = random.Random(f"{name}-{seed}")
    s = lambda x: max(1, int(x * scale))  # noqa: E731
    if name == "chat":  # bench/serve.py's synthetic chat messages through the model's chat template
        from serve import make_prompts

        from hf_paged.engine.input_processor import render_chat

        if tokenizer is None:
            raise SystemExit("the chat workload needs --model (a real model with a tokenizer)")
        return [(render_chat(tokenizer, [{"role": "user", "content": m}]), s(256)) for m in make_prompts(n, seed)]
    out = []
    for _ in range(n):
        if name == "uniform":
            n_in, n_out = s(512), s(256)
        elif name == "mixed":
            n_in, n_out = rng.randint(s(16), s(1024)), rng.randint(s(16), s(512))
        else:
            raise SystemExit(f"unknown workload {name!r}")
        out.append(([rng.randrange(3, vocab) for _ in range(n_in)], n_out))
    return out


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def reset_memory(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(device) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.max_memory_allocated() / 2**30


# -- systems -------------------------------------------------------------------------------------------


def run_hf_generate(model, requests, args) -> dict:
    """Transformers ``model.generate``: static left-padded batches, greedy, each batch runs to its longest output."""

    def run(reqs):
        useful = 0
        for i in range(0, len(reqs), args.hf_batch_size):
            batch = reqs[i : i + args.hf_batch_size]
            width = max(len(p) for p, _ in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, (p, _) in enumerate(batch):
                ids[row, width - len(p):] = torch.tensor(p)
                mask[row, width - len(p):] = 1
            max_new = max(n for _, n in batch)
            with torch.inference_mode():
                out = model.generate(
                    input_ids=ids.to(args.device), attention_mask=mask.to(args.device), max_new_tokens=max_new,
                    min_new_tokens=max_new, do_sample=False, pad_token_id=0,
                )
            assert out.shape[1] == width + max_new
            # Tokens past a request's own max_new_tokens are waste, not output.
            useful += sum(n for _, n in batch)
        return useful

    run(requests[: min(len(requests), 2)])  # warm-up
    reset_memory(args.device)
    sync(args.device)
    t0 = time.perf_counter()
    tokens = run(requests)
    sync(args.device)
    elapsed = time.perf_counter() - t0
    return dict(requests=len(requests), output_tokens=tokens, elapsed_s=elapsed, output_tok_per_s=tokens / elapsed,
                peak_memory_gib=peak_memory_gib(args.device),
                note=f"static batches of {args.hf_batch_size}, left padded; each batch generates its longest output")


def run_hf_continuous_batching(model, requests, args) -> dict:
    """Transformers' own continuous batching (``generation/continuous_batching``), per-request max_new_tokens."""
    from transformers import GenerationConfig

    gen_config = GenerationConfig(
        max_new_tokens=max(n for _, n in requests), do_sample=False, eos_token_id=None, pad_token_id=0,
    )
    hints = None
    with contextlib.suppress(Exception):
        from transformers.generation.continuous_batching.utils import WorkloadHints

        hints = WorkloadHints(
            max_prompt_length=max(len(p) for p, _ in requests),
            max_generated_length=max(n for _, n in requests),
            num_requests=len(requests),
        )

    def run(reqs, manager) -> int:
        ids = [manager.add_request(p, max_new_tokens=n) for p, n in reqs]
        pending, tokens = set(i for i in ids if i is not None), 0
        if len(pending) != len(reqs):
            raise RuntimeError("the continuous batching manager dropped requests")
        deadline = time.perf_counter() + 3600
        while pending:
            result = manager.get_result(timeout=1)
            if result is None:
                if not manager.is_running():
                    raise RuntimeError("Transformers' continuous batching thread stopped")
                if time.perf_counter() > deadline:
                    raise TimeoutError("continuous batching did not finish within an hour")
                continue
            if result.is_finished() and result.request_id in pending:
                if result.error:
                    raise RuntimeError(f"request {result.request_id} failed: {result.error}")
                pending.discard(result.request_id)
                tokens += len(result.generated_tokens)
        return tokens

    kwargs = dict(generation_config=gen_config, block=True, timeout=30)
    if hints is not None:
        kwargs["workload_hints"] = hints
    reset_memory(args.device)
    with model.continuous_batching_context_manager(**kwargs) as manager:
        run(requests[: min(len(requests), 8)], manager)  # warm-up inside the same manager
        sync(args.device)
        t0 = time.perf_counter()
        tokens = run(requests, manager)
        sync(args.device)
        elapsed = time.perf_counter() - t0
    return dict(requests=len(requests), output_tokens=tokens, elapsed_s=elapsed, output_tok_per_s=tokens / elapsed,
                peak_memory_gib=peak_memory_gib(args.device),
                note="ContinuousBatchingManager.add_request(max_new_tokens=per request), default config + workload hints")


def make_engine(model, args) -> Engine:
    return Engine(
        model,
        num_blocks=args.num_blocks,
        block_size=args.block_size,
        memory_fraction=None if args.num_blocks else (args.memory_fraction if torch.device(args.device).type == "cuda" else None),
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=not args.no_prefix_caching,
        cuda_graphs=not args.no_cuda_graphs,
        async_scheduling=False if args.no_async_scheduling else None,
        compile_model=args.compile_model,
    )


# --sampling: the draws a chat server typically asks for, beside greedy decoding.
_SAMPLED = {"temperature": {"temperature": 0.8}, "top_p": {"temperature": 0.8, "top_p": 0.95}}


def _params(n_out: int, sampled: str | None = None) -> SamplingParams:
    return SamplingParams(max_new_tokens=n_out, ignore_eos=True, **_SAMPLED.get(sampled, {"temperature": 0.0}))


def run_hf_paged(engine: Engine, requests, args, sampled: str | None = None) -> dict:
    prompts = [p for p, _ in requests]
    params = [_params(n, sampled) for _, n in requests]
    # Warm-up: Triton compiles/tunes for prefill and decode shapes; distinct random prompts so the
    # timed run gets no prefix-cache help from it.
    t_warm = time.perf_counter()
    warm = make_workload("uniform", 8, engine.vocab_size, args.seed + 1000, 0.05 if args.tiny else 0.25)
    engine.generate([p for p, _ in warm], [_params(n) for _, n in warm])
    engine.reset_prefix_cache()
    sync(args.device)
    first_requests_s = time.perf_counter() - t_warm  # anything the engine's own warm-up missed compiles here
    if torch.device(args.device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    engine.reset_stats()
    pauses = _GcPauses()
    gc.callbacks.append(pauses)
    t0 = time.perf_counter()
    try:
        with _StepClock(engine) as clock:
            outs = engine.generate(prompts, params, progress=sys.stderr.isatty())
            sync(args.device)
    finally:
        gc.callbacks.remove(pauses)
    elapsed = time.perf_counter() - t0
    errors = [o.error for o in outs if o.error]
    if errors:
        raise RuntimeError(f"{len(errors)} hf_paged requests failed, first: {errors[0]}")
    tokens = sum(len(o.token_ids) for o in outs)
    expected = sum(n for _, n in requests)
    if tokens != expected:
        raise RuntimeError(f"hf_paged produced {tokens} tokens, expected {expected}")
    st = engine.stats()
    per_block = engine.kv_pool.nbytes / engine.kv_pool.num_blocks
    ttft = sorted(o.time_to_first_token for o in outs if o.time_to_first_token is not None)
    return dict(
        requests=len(requests), output_tokens=tokens, elapsed_s=elapsed, output_tok_per_s=tokens / elapsed,
        peak_memory_gib=peak_memory_gib(args.device),
        kv_pool_gib=engine.kv_pool.nbytes / 2**30, kv_blocks=engine.kv_pool.num_blocks,
        kv_peak_blocks_used=st.peak_blocks_used, kv_peak_used_gib=st.peak_blocks_used * per_block / 2**30,
        kv_waste=st.kv_waste, preemptions=st.preemptions, prefix_hit_rate=st.prefix_hit_rate, steps=st.steps,
        median_ttft_s=ttft[len(ttft) // 2] if ttft else None,
        engine_warmup_s=engine.warmup_s, first_requests_s=first_requests_s,
        gc_pause_s=pauses.seconds, gc_collections=pauses.collections, **clock.summary(t0 + elapsed),
    )


class _StepClock:
    """Times the steps of a run: each step's period runs from its launch to the next step's (or the run's end),
    device time included under async scheduling. The slowest one exposes work the engine's warm-up left to the
    timed run (a recompile of the model's layers took 3.3 s of a 6.6 s TP=2 run on two H100s)."""

    def __init__(self, engine: Engine) -> None:
        self._runner = engine.runner
        self._starts: list[float] = []
        self._tokens: list[int] = []

    def __enter__(self) -> "_StepClock":
        execute = self._runner.execute

        def timed(out, *args, **kwargs):
            self._starts.append(time.perf_counter())
            self._tokens.append(out.num_batched_tokens)
            return execute(out, *args, **kwargs)

        self._runner.execute = timed  # an instance attribute over the method, removed on exit
        return self

    def __exit__(self, *exc) -> None:
        del self._runner.execute

    def summary(self, end: float) -> dict:
        periods = [b - a for a, b in zip(self._starts, self._starts[1:] + [end])]
        if not periods:
            return {}
        slowest = max(range(len(periods)), key=periods.__getitem__)
        return dict(median_step_ms=1e3 * sorted(periods)[len(periods) // 2], slowest_step_ms=1e3 * periods[slowest],
                    slowest_step_index=slowest, slowest_step_tokens=self._tokens[slowest])


class _GcPauses:
    """A `gc.callbacks` entry that adds up the time of the collections and counts them per generation."""

    def __init__(self) -> None:
        self.seconds, self.collections, self._start = 0.0, [0, 0, 0], 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._start
            self.collections[info["generation"]] += 1


def run_default_gc(engine: Engine, requests, args) -> dict:
    """`run_hf_paged` with Python's default collection in the engine loop (the comparison for engine/gc_pauses.py)."""
    from hf_paged.engine import engine as engine_module

    quiet = engine_module.quiet_gc
    engine_module.quiet_gc = contextlib.nullcontext
    try:
        return run_hf_paged(engine, requests, args)
    finally:
        engine_module.quiet_gc = quiet


# -- profiling -----------------------------------------------------------------------------------------


def profile_engine(engine: Engine, requests, args) -> dict:
    """Profile a few engine steps in a steady state (decodes + prefill chunks) and summarise where time goes."""
    from torch.profiler import ProfilerActivity, profile, record_function

    def wrap(obj, name, label):
        fn = getattr(obj, name)
        setattr(obj, name, lambda *a, **k: _labelled(record_function, label, fn, *a, **k))

    # Instance attributes shadow the methods; deleting them afterwards restores the originals.
    wrapped = [(engine.scheduler, "schedule"), (engine.runner, "_pack"), (engine.scheduler, "update_from_output"),
               (engine.outputs, "updates"), (engine.runner.model, "forward"), (engine.sampler, "tokens")]
    labels = ["engine/schedule", "engine/prepare_inputs", "engine/update_from_output", "engine/output_processing",
              "engine/forward", "engine/sample"]
    for (obj, name), label in zip(wrapped, labels):
        wrap(obj, name, label)
    try:
        with quiet_gc():  # as in `Engine.generate`: a collection inside a window is not a step's cost
            return _profile_steps(engine, requests, args, profile, ProfilerActivity)
    finally:
        for obj, name in wrapped:
            delattr(obj, name)


def _profile_steps(engine: Engine, requests, args, profile, ProfilerActivity) -> dict:
    """Device-busy share per step kind (windows of consecutive steps of one kind, device activity
    only, so the profiler adds little host time), the syncs of one step of each kind, one op table.

    Busy is kernel time over the span from a window's first kernel to its last: each window starts
    from an idle device (a sync), so its first step's host work would otherwise count as idle time
    that serving never has (async scheduling launches a step while the one before runs). Prefill steps
    come in runs at the start and decodes in runs later; mixed steps come one at a time between decodes,
    so once the decodes have their windows, windows are one step long."""
    engine.reset_prefix_cache()  # the timed run cached these prompts: profile real prefills
    for p, n in requests:
        engine.add_request(p, _params(n))
    cuda = torch.device(args.device).type == "cuda"
    kind, schedule = classify_steps(engine)
    per_kind: dict[str, dict] = {}
    syncs: dict[str, list[str]] = {}
    table = None
    windows = 3  # per step kind

    def have(k: str) -> bool:
        return per_kind.get(k, {}).get("windows", 0) >= windows

    try:
        while engine.has_unfinished() and not (have("decode") and have("mixed")):  # prefill steps come first
            # A window of consecutive steps (so async scheduling overlaps as it does when serving),
            # counted for a kind when all its steps were of that kind.
            sync(args.device)
            kinds = set()
            steps = 1 if have("decode") else args.profile_steps
            with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                for _ in range(steps):
                    engine.step()
                    kinds.add(kind["now"])
                sync(args.device)
                wall = time.perf_counter() - t0
            if len(kinds) != 1:
                continue
            k = kinds.pop()
            entry = per_kind.setdefault(k, dict(windows=0, steps=0, wall_ms=0.0, span_ms=0.0, device_ms=0.0))
            if entry["windows"] >= windows:
                continue
            events = prof.key_averages()
            attr = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
            entry["windows"] += 1
            entry["steps"] += steps
            entry["wall_ms"] += wall * 1e3
            entry["device_ms"] += sum(getattr(e, attr, 0.0) or 0.0 for e in events) / 1e3 if cuda else 0.0
            entry["span_ms"] += device_span_ms(prof) if cuda else 0.0
            if cuda and "top_kernels" not in entry:  # where one window's device time went, by kernel
                top = sorted(events, key=lambda e: getattr(e, attr, 0.0) or 0.0, reverse=True)[:12]
                entry["top_kernels"] = [dict(name=e.key[:90], device_ms=(getattr(e, attr, 0.0) or 0.0) / 1e3,
                                             calls=e.count) for e in top]
                entry["top_kernels_steps"] = steps  # one window's: not the kind's total step count
            if cuda and k not in syncs and engine.has_unfinished():
                syncs[k] = _syncs_of_one_step(engine)
            if cuda and table is None and k == "prefill":  # the next step: most likely a prefill step too
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    engine.step()
                    sync(args.device)
                table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15,
                                                  max_name_column_width=50)
    finally:
        engine.scheduler.schedule = schedule
    engine.abort_all()
    while engine.has_unfinished():
        engine.step()
    print(f"\n== profile: device busy per step kind (windows of {args.profile_steps} consecutive steps; mixed: one) ==")
    for k, e in per_kind.items():
        e["device_busy_pct"] = 100 * e["device_ms"] / e["span_ms"] if e["span_ms"] else None
        e["window_busy_pct"] = 100 * e["device_ms"] / e["wall_ms"] if e["wall_ms"] else None
        e["wall_ms_per_step"] = e["wall_ms"] / max(e["steps"], 1)
        e["syncs"] = syncs.get(k, [])
        print(f"  {k:7s} {e['steps']} steps, {e['wall_ms_per_step']:.2f} ms/step, device busy "
              f"{e['device_busy_pct'] or 0:.0f}% ({e['window_busy_pct'] or 0:.0f}% of the windows' wall time), "
              f"device->host syncs in a step: {len(e['syncs'])}")
        for w in e["syncs"][:5]:
            print("     ", w)
        if e.get("top_kernels"):
            print(f"    top kernels of one window ({e['top_kernels_steps']} steps):")
        for t in e.get("top_kernels", []):
            print(f"      {t['device_ms']:9.3f} ms {t['calls']:6d}x  {t['name']}")
    if table:
        print("host ops of the step after a prefill window (CPU time):")
        print(table)
    return per_kind


# Names of the attention kernels of the backends: ours (prompt, decode, split merge; the Gluon prompt kernel) and FA4's.
_ATTENTION_KERNELS = re.compile(r"^(_paged_attention_kernel|_reduce_kernel|_prefill_kernel)\b|FlashAttention")


def kernel_shares(engine: Engine, requests, args) -> dict:
    """Device time by kernel over a run of ``requests`` under the CUDA profiler (kernels replayed in CUDA graphs
    included): the total, the attention kernels' share, the top kernels. Not timed: the profiler slows the host."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    engine.reset_prefix_cache()  # the timed run cached these prompts: profile their prefills
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.generate([p for p, _ in requests], [_params(n) for _, n in requests])
        sync(args.device)
    engine.reset_prefix_cache()
    per_kernel: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            per_kernel[e.name] = per_kernel.get(e.name, 0.0) + e.time_range.elapsed_us() / 1e3
    total = sum(per_kernel.values())
    attention = {k: ms for k, ms in per_kernel.items() if _ATTENTION_KERNELS.search(k)}
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:10]
    print(f"    device time over {len(requests)} requests: {total:.0f} ms; attention kernels "
          f"{100 * sum(attention.values()) / total:.1f}% ("
          + ", ".join(f"{k[:40]} {ms:.0f} ms" for k, ms in sorted(attention.items(), key=lambda kv: -kv[1])) + ")")
    return dict(requests=len(requests), device_ms=total, attention_ms=attention,
                attention_share=sum(attention.values()) / total, top_kernels_ms=dict((k[:120], ms) for k, ms in top))


def device_span_ms(prof) -> float:
    """Milliseconds from the start of a profile's first device activity to the end of its last."""
    from torch.autograd import DeviceType

    ranges = [e.time_range for e in prof.events() if e.device_type == DeviceType.CUDA]
    return (max(r.end for r in ranges) - min(r.start for r in ranges)) / 1e3 if ranges else 0.0


def classify_steps(engine: Engine) -> tuple[dict, object]:
    """Make ``engine``'s scheduler record the kind of each step it schedules in ``kind["now"]`` ("decode": one
    token per sequence; "mixed": prompt tokens too, at most `MAX_MIXED_GRAPH_TOKENS` in all, a graph replay;
    "prefill": more) and its token count in ``kind["tokens"]``; returns that dict and the original method."""
    schedule = engine.scheduler.schedule
    kind = {"now": "mixed"}

    def schedule_and_classify():
        out = schedule()
        n = out.num_batched_tokens
        kind["now"] = "decode" if out.is_decode_only else "mixed" if n <= MAX_MIXED_GRAPH_TOKENS else "prefill"
        kind["tokens"] = n
        return out

    engine.scheduler.schedule = schedule_and_classify
    return kind, schedule


def _syncs_of_one_step(engine: Engine) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            engine.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # (torch warns once per process that the mode is a prototype: that notice is no sync.)
    return [str(w.message).splitlines()[0] for w in caught
            if not str(w.message).startswith("Synchronization debug mode is a prototype")]


def _labelled(record_function, label, fn, *a, **k):
    with record_function(label):
        return fn(*a, **k)


# -- main ----------------------------------------------------------------------------------------------


def versions() -> dict:
    import transformers

    v = dict(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
             hf_paged=hf_paged.__version__)
    with contextlib.suppress(Exception):
        import triton

        v["triton"] = triton.__version__
    with contextlib.suppress(Exception):
        root = Path(__file__).resolve().parents[1]
        v["git_commit"] = subprocess.check_output(["git", "-C", str(root), "rev-parse", "HEAD"], text=True).strip()
        # A copy of an uncommitted tree (the device tool's) keeps an older HEAD: say that the files differ from it.
        v["git_dirty"] = bool(subprocess.check_output(["git", "-C", str(root), "status", "--porcelain",
                                                        "--untracked-files=no"], text=True).strip())
    return v


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    sdpa, paged, n_params = build_models(args)
    tokenizer = None
    if args.model:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
    vocab = paged.config.vocab_size
    scale = 1 / 8 if args.tiny else 1.0
    dtype = getattr(torch, args.dtype)
    backends = [use_backend(name, device, dtype) for name in args.backends] or [use_backend(None, device, dtype)]
    backend = backends[0]
    print(f"device: {gpu} | model: {n_params / 1e9:.2f}B params, {args.dtype} | kernel backend(s): {backends}")
    print(f"versions: {versions()}")

    report = dict(date=_dt.datetime.now().isoformat(timespec="seconds"), gpu=gpu, device=str(device),
                  model=dict(params=n_params, dtype=args.dtype, path=args.model,
                             shape=None if args.model else model_shape(args)),
                  kernel_backend=backend, kernel_backends=backends, versions=versions(), args=dict(vars(args)),
                  note=(f"baselines run the first {args.baseline_requests} requests of each workload, hf_paged all "
                        f"{args.num_requests}; compare output tok/s (a rate), not times"),
                  workloads={})
    engine, engine_backend = None, None
    for index, name in enumerate(args.workloads):
        requests = make_workload(name, args.num_requests, vocab, args.seed, scale, tokenizer)
        subset = requests[: args.baseline_requests]
        print(f"\n== workload {name}: {len(requests)} requests (baselines on {len(subset)}), "
              f"{sum(len(p) for p, _ in requests)} prompt / {sum(n for _, n in requests)} output tokens ==")
        results: dict[str, dict] = {}
        for base in args.baselines:
            runner = {"generate": run_hf_generate, "hf_cb": run_hf_continuous_batching}.get(base)
            if runner is None:
                print(f"unknown baseline {base!r}, skipped")
                continue
            label = {"generate": "transformers_generate", "hf_cb": "transformers_continuous_batching"}[base]
            try:
                results[label] = runner(sdpa, subset, args)
            except Exception as e:  # report and go on: a baseline's API may differ across versions
                traceback.print_exc()
                results[label] = dict(error=f"{type(e).__name__}: {e}")
            _print_result(label, results[label])
        reset_memory(device)
        # One engine per backend, the last one kept for the next workload (so the order alternates).
        for kernel_backend in backends if index % 2 == 0 else backends[::-1]:
            if engine_backend != kernel_backend:
                if engine is not None:
                    engine.close()
                    engine = None
                    reset_memory(device)
                use_backend(kernel_backend if args.backends else None, device, dtype)
                engine, engine_backend = make_engine(paged, args), kernel_backend  # pool sized after the baselines
            label = "hf_paged" if len(backends) == 1 else f"hf_paged_{kernel_backend}"
            try:
                results[label] = dict(run_hf_paged(engine, requests, args), kernel_backend=kernel_backend)
            except Exception as e:
                traceback.print_exc()
                results[label] = dict(error=f"{type(e).__name__}: {e}")
            _print_result(label, results[label])
            if args.kernel_shares and "error" not in results[label]:
                results[label]["kernel_shares"] = kernel_shares(engine, requests[: args.kernel_shares], args)
        for sampled in _SAMPLED if args.sampling and engine is not None else ():
            label = f"hf_paged_{sampled}"
            results[label] = dict(run_hf_paged(engine, requests, args, sampled=sampled), kernel_backend=engine_backend)
            _print_result(label, results[label])
        if args.gc_baseline and engine is not None:
            results["hf_paged_default_gc"] = dict(run_default_gc(engine, requests, args), kernel_backend=engine_backend)
            _print_result("hf_paged_default_gc", results["hf_paged_default_gc"])
        if len(backends) > 1:
            results["hf_paged"] = results[f"hf_paged_{backend}"]
        ours = results["hf_paged"].get("output_tok_per_s")
        for label, r in results.items():
            if not label.startswith("hf_paged") and ours and r.get("output_tok_per_s"):
                r["hf_paged_speedup"] = ours / r["output_tok_per_s"]
                print(f"  hf_paged / {label}: {r['hf_paged_speedup']:.2f}x output tok/s")
        if args.profile and engine is not None:
            results["profile"] = profile_engine(engine, requests[: min(len(requests), args.max_num_seqs * 2)], args)
            results["profile_kernel_backend"] = engine_backend
        report["workloads"][name] = results

    out = Path(args.out) if args.out else RESULTS / (
        f"throughput-{''.join(c if c.isalnum() else '-' for c in gpu)}-{_dt.datetime.now():%Y%m%d-%H%M%S}"
        f"{'-tiny' if args.tiny else ''}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwrote {out}")
    failed = [f"{w}/{k}" for w, rs in report["workloads"].items() for k, r in rs.items() if k.startswith("hf_paged") and "error" in r]
    return 1 if failed else 0


def _print_result(label: str, r: dict) -> None:
    if "error" in r:
        print(f"  {label:34s} FAILED: {r['error']}")
        return
    mem = f"{r['peak_memory_gib']:.1f} GiB peak" if r.get("peak_memory_gib") is not None else "peak mem n/a"
    extra = ""
    if "kv_waste" in r:
        extra = (f" | KV pool {r['kv_pool_gib']:.1f} GiB, peak used {r['kv_peak_used_gib']:.2f} GiB, "
                 f"waste {100 * r['kv_waste']:.1f}%, preemptions {r['preemptions']}, prefix hits {100 * r['prefix_hit_rate']:.1f}%"
                 f" | engine warm-up {r['engine_warmup_s']:.1f} s, then 8 warm-up requests {r['first_requests_s']:.1f} s"
                 f" | GC pauses {r['gc_pause_s'] * 1e3:.0f} ms, collections per generation {r['gc_collections']}"
                 f" | steps: median {r['median_step_ms']:.1f} ms, slowest {r['slowest_step_ms']:.1f} ms"
                 f" (#{r['slowest_step_index']}, {r['slowest_step_tokens']} tokens)")
    print(f"  {label:34s} {r['output_tok_per_s']:10.1f} out tok/s  ({r['requests']} req, {r['output_tokens']} tok, "
          f"{r['elapsed_s']:.1f} s) | {mem}{extra}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
