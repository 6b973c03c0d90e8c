"""Scale-out: one GPU vs tensor parallel (TP=2, TP=4) vs data parallel (DP=2 Ray replicas).

A random-weight Llama of the 8B shape (bf16) is saved once as safetensors shards (``--build``);
each configuration then runs in a process of its own (an engine holds most of a GPU's memory):

* ``tp1``: one `Engine` on GPU 0;
* ``tp2`` / ``tp4``: `hf_paged.distributed.start_tensor_parallel_engine` over NCCL;
* ``dp2``: two `Engine` replicas as Ray actors behind `hf_paged.integrations.ray.ReplicaRouter`;
* ``parity``: greedy tokens of TP=2 against one GPU in fp32, on a small shape;
* ``tp1-eager``, ``tp2-eager``, ...: the same without CUDA graphs and async scheduling (how the
  engine ran under TP before both were enabled there);
* ``tp2-nccl``, ...: every all-reduce through NCCL (no symmetric memory, `hf_paged.tp_all_reduce`);
* ``tp2-barriers``, ...: no barrier-free all-reduce (``lamport_max_bytes=0``): the one-shot / two-shot kernels
  with their barriers sum what it would (the library's default up to ``LAMPORT_MAX_BYTES``, or
  ``--lamport-max-bytes``);
* ``tp1-unfused``, ...: q/k/v and gate/up as matmuls of their own (``Engine(fuse_projections=False)``; the
  default fuses each group into one).

Each engine configuration measures output tokens/s on the ``uniform`` (512 in / 128 out) and
``mixed`` (in ~ U[16, 1024], out ~ U[16, 256]) workloads after a warm-up, and the batch-1 decode
latency (ms per output token after the first, median of 3 requests of 128 in / ``--latency-tokens`` out).

    python bench/scale.py --build --model-dir /tmp/llama-8b                 # save the checkpoint
    python bench/scale.py --model-dir /tmp/llama-8b --configs tp1,tp2,dp2,parity
    python bench/scale.py --shape tiny --build --model-dir /tmp/tiny --configs tp1,tp2 --device cpu   # smoke test
    python bench/scale.py --model-dir /tmp/llama-8b --configs tp1,tp2 --workloads uniform --profile   # + top kernels

Writes ``bench/results/scale-<gpus>-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import (MODEL_TINY, RESULTS, device_span_ms, make_workload, profile_engine, run_hf_paged,  # noqa: E402
                        versions)

from hf_paged.tp_all_reduce import DEFAULT_MAX_BYTES  # noqa: E402

SHAPES = {
    "70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                num_attention_heads=64, num_key_value_heads=8, head_dim=128, max_position_embeddings=8192,
                rope_theta=500000.0, tie_word_embeddings=False),
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=8192,
               rope_theta=500000.0, tie_word_embeddings=False),
    # The fp32 parity check's model: small enough to build in seconds, sharded like the 8B one.
    "small": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=64, max_position_embeddings=4096,
                  tie_word_embeddings=False),
    "tiny": MODEL_TINY,
}
CONFIGS = ("tp1", "tp2", "tp4", "dp2", "parity")  # an engine configuration + "-eager": no graphs, synchronous steps


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True, help="the checkpoint (written by --build)")
    p.add_argument("--build", action="store_true", help="save a random-weight checkpoint of --shape to --model-dir")
    p.add_argument("--shape", default="8b", choices=sorted(SHAPES))
    p.add_argument("--draw-weights", action="store_true",
                   help="with --build: save the config only; each rank draws its weights when it loads (a 70B shape "
                        "then needs no 141 GB checkpoint)")
    p.add_argument("--configs", default="tp1,tp2,dp2,parity", help=f"comma list of: {', '.join(CONFIGS)}")
    p.add_argument("--workloads", default="uniform,mixed")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--latency-tokens", type=int, default=128, help="output tokens of each batch-1 latency request")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--memory-fraction", type=float, default=0.85)
    p.add_argument("--num-blocks", type=int, default=None)
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--no-async-scheduling", action="store_true")
    p.add_argument("--compile-model", action="store_true", help="Engine(compile_model=True) in every configuration")
    p.add_argument("--no-fuse-projections", action="store_true", help="Engine(fuse_projections=False)")
    p.add_argument("--profile", action="store_true",
                   help="engine configurations (rank 0 under TP): device busy and top kernels per step kind")
    p.add_argument("--profile-steps", type=int, default=6)
    p.add_argument("--symmetric-max-bytes", type=int, default=None,
                   help="TP: largest all-reduce taking symmetric memory (0: NCCL for all; default: the library's)")
    p.add_argument("--lamport-max-bytes", type=int, default=None,
                   help="TP: largest all-reduce taking the barrier-free kernel (default: the library's; "
                        "'-barriers' variants take 0)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu (TP over gloo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per configuration")
    p.add_argument("--out", default=None)
    p.add_argument("--logs", default=None, help="folder for each configuration's log, every rank's output in it "
                                                "(default: beside --model-dir); its path is printed")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return args


# -- the checkpoint ------------------------------------------------------------------------------------


def build_checkpoint(shape: dict, path: str, dtype: torch.dtype, device: str, seed: int = 0,
                     draw_weights: bool = False) -> float:
    """Save a random-weight Llama of ``shape`` to ``path`` (safetensors shards); returns seconds taken.

    With the serve extra, a word-level tokenizer covering the vocabulary is saved beside it, so that
    ``hf-paged serve`` loads the checkpoint.

    ``draw_weights``: save the config and one norm weight only; loading initialises every missing
    weight (Transformers' random init), on each rank's own shard under tensor parallelism.
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    started = time.perf_counter()
    try:
        from hf_paged.server.demo import build_demo_tokenizer
    except ImportError as e:  # the serve extra: only `hf-paged serve` on this checkpoint needs the tokenizer
        print(f"no tokenizer saved: {e}", flush=True)
    else:
        build_demo_tokenizer(shape["vocab_size"]).save_pretrained(path)
    config = LlamaConfig(**shape, bos_token_id=None, eos_token_id=None, pad_token_id=0, dtype=str(dtype).split(".")[1])
    if draw_weights:
        os.makedirs(path, exist_ok=True)
        config.save_pretrained(path)
        save_file({"model.norm.weight": torch.ones(shape["hidden_size"], dtype=dtype)},
                  os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return time.perf_counter() - started
    torch.manual_seed(seed)
    with torch.device(device):  # random init on the GPU: seconds, not minutes, for 8B
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = None
    model.save_pretrained(path, max_shard_size="4GB")
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the configurations that follow need this GPU's memory
    return time.perf_counter() - started


# -- one configuration (a child process) -----------------------------------------------------------------


def _engine_kwargs(args) -> dict:
    return dict(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                num_blocks=args.num_blocks,
                memory_fraction=None if args.num_blocks or args.device == "cpu" else args.memory_fraction,
                cuda_graphs=not args.no_cuda_graphs, async_scheduling=False if args.no_async_scheduling else None,
                compile_model=args.compile_model, fuse_projections=not args.no_fuse_projections)


def _workloads(args, vocab: int) -> dict:
    out = {}
    for name in args.workloads.split(","):
        requests = make_workload(name, args.num_requests, vocab, args.seed, 1.0)
        if name == "uniform":  # 512 in / 128 out, as the issue measured TP
            requests = [(p, 128) for p, _ in requests]
        else:
            requests = [(p, min(n, 256)) for p, n in requests]
        out[name] = requests
    return out


def _latency_prompts(vocab: int, n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed + 7)
    return [torch.randint(3, vocab, (128,), generator=g).tolist() for _ in range(n)]


def _greedy(n: int):
    from hf_paged import SamplingParams

    return SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)


def _measure_engine(engine, args) -> dict:
    """Throughput per workload, batch-1 decode latency, and greedy tokens of 8 prompts (for parity)."""
    ns = SimpleNamespace(seed=args.seed, tiny=args.shape == "tiny", device=args.device)
    result = {"engine_warmup_s": engine.warmup_s, "kv_blocks": engine.kv_pool.num_blocks,
              "async_scheduling": engine.async_scheduling, "workloads": {}}
    for name, requests in _workloads(args, engine.vocab_size).items():
        result["workloads"][name] = run_hf_paged(engine, requests, ns)
    prompts = _latency_prompts(engine.vocab_size, 8, args.seed)
    per_token = []
    for prompt in prompts[:3]:
        t0 = time.perf_counter()
        (out,) = engine.generate([prompt], _greedy(args.latency_tokens))
        elapsed = time.perf_counter() - t0
        per_token.append((elapsed - out.time_to_first_token) / (len(out.token_ids) - 1) * 1e3)
    result["batch1_ms_per_token"] = statistics.median(per_token)
    result["batch1_ms_per_token_all"] = per_token
    result["greedy_tokens"] = [o.token_ids for o in engine.generate(prompts, _greedy(32))]
    if args.profile:
        result["batch1_profile"] = _profile_batch1(engine, prompts[3], args.latency_tokens)
        first = next(iter(_workloads(args, engine.vocab_size).values()))
        result["profile"] = profile_engine(engine, first[: args.max_num_seqs], SimpleNamespace(
            device=args.device, profile_steps=args.profile_steps))
    return result


def run_child(args) -> dict:
    from hf_paged.loader import load_model

    started = time.perf_counter()
    kind = args.child
    dtype = getattr(torch, args.dtype)
    if kind == "tp1":
        from hf_paged import Engine

        model, _ = load_model(args.model_dir, dtype=dtype, device=args.device, tokenizer=False)
        load_s = time.perf_counter() - started
        with Engine(model, **_engine_kwargs(args)) as engine:
            return dict(load_s=load_s, **_measure_engine(engine, args))
    if kind.startswith("tp"):
        from hf_paged.distributed import start_tensor_parallel_engine

        size = int(kind[2:])
        model_kwargs = dict(dtype=dtype)
        if args.symmetric_max_bytes is not None:
            model_kwargs["symmetric_max_bytes"] = args.symmetric_max_bytes
        if args.lamport_max_bytes is not None:
            model_kwargs["lamport_max_bytes"] = args.lamport_max_bytes
        with start_tensor_parallel_engine(args.model_dir, size, tokenizer=False, model_kwargs=model_kwargs,
                                          **_engine_kwargs(args)) as engine:
            start_s = time.perf_counter() - started  # the ranks' loading and rank 0's engine warm-up
            return dict(load_s=start_s - engine.warmup_s, start_s=start_s, tensor_parallel_size=size,
                        **_measure_engine(engine, args))
    if kind == "dp2":
        return _run_data_parallel(args, 2, started)
    raise SystemExit(f"unknown configuration {kind!r}")


def _profile_batch1(engine, prompt: list[int], tokens: int) -> dict:
    """Where a batch-1 decode step's time goes (rank 0's device under TP): the decode steps of one
    request after its first tokens, device activity only (on CPU: the ops' own time), grouped by name."""
    from torch.profiler import ProfilerActivity, profile

    cuda = engine.kv_pool.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    engine.add_request(prompt, _greedy(tokens))
    for _ in range(3):  # the prompt step and the first decodes stay out of the window
        engine.step()
    sync()
    steps = 0
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
            steps += 1
        sync()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    device = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    own_us = {e.key: getattr(e, device if cuda else "self_cpu_time_total", 0.0) or 0.0 for e in events}
    top = sorted(events, key=lambda e: own_us[e.key], reverse=True)[:16]
    steps = max(steps, 1)
    result = dict(steps=steps, wall_ms_per_step=wall * 1e3 / steps, span_ms_per_step=device_span_ms(prof) / steps,
                  device_ms_per_step=sum(own_us.values()) / 1e3 / steps,
                  launches_per_step=sum(e.count for e in events) / steps,
                  top=[dict(name=e.key[:90], us_per_step=own_us[e.key] / steps, calls_per_step=e.count / steps)
                       for e in top])
    print(f"batch-1 decode: {result['wall_ms_per_step']:.3f} ms/step wall, device span {result['span_ms_per_step']:.3f}"
          f" ms, busy {result['device_ms_per_step']:.3f} ms in {result['launches_per_step']:.0f} kernels", flush=True)
    for t in result["top"]:
        print(f"  {t['us_per_step']:8.1f} us {t['calls_per_step']:6.1f}x  {t['name']}", flush=True)
    return result


def _run_data_parallel(args, replicas: int, started: float) -> dict:
    import ray

    from hf_paged.integrations.ray import ReplicaRouter, generate_batch_dp

    root = str(Path(__file__).resolve().parents[1])  # the replicas import this checkout's hf_paged
    path = os.pathsep.join([root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    ray.init(num_gpus=replicas if args.device == "cuda" else 0, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    router = ReplicaRouter(args.model_dir, replicas, engine_kwargs=_engine_kwargs(args), tokenizer=False,
                           model_kwargs=dict(dtype=getattr(torch, args.dtype), device=args.device))
    try:
        load_s = time.perf_counter() - started
        vocab = SHAPES[args.shape]["vocab_size"]
        warm = make_workload("uniform", 8 * replicas, vocab, args.seed + 1000, 0.25)
        generate_batch_dp(args.model_dir, [p for p, _ in warm], [_greedy(n) for _, n in warm], router=router)
        router.assignments.clear()
        infos = ray.get([r.info.remote() for r in router.replicas])
        result = {"load_s": load_s, "replicas": replicas, "replica_info": infos, "workloads": {},
                  "routing_after_warm_up": router.table.snapshot()}
        for name, requests in _workloads(args, vocab).items():
            t0 = time.perf_counter()
            outs = generate_batch_dp(args.model_dir, [p for p, _ in requests], [_greedy(n) for _, n in requests],
                                     router=router)
            elapsed = time.perf_counter() - t0
            errors = [o.error for o in outs if o.error]
            if errors:
                raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")
            tokens = sum(len(o.token_ids) for o in outs)
            if tokens != sum(n for _, n in requests):
                raise RuntimeError(f"DP produced {tokens} tokens, expected {sum(n for _, n in requests)}")
            served = [len([a for a in router.assignments.values() if a and a[-1] == r]) for r in range(replicas)]
            result["workloads"][name] = dict(requests=len(requests), output_tokens=tokens, elapsed_s=elapsed,
                                             output_tok_per_s=tokens / elapsed, requests_per_replica=served)
            router.assignments.clear()
        return result
    finally:
        router.shutdown()
        ray.shutdown()


def run_parity(args) -> dict:
    """fp32 greedy tokens of TP=2 (graphs and async scheduling as configured) against one GPU."""
    from hf_paged import Engine
    from hf_paged.distributed import start_tensor_parallel_engine
    from hf_paged.loader import load_model

    path = args.model_dir.rstrip("/") + "-parity-small"
    if not Path(path, "config.json").exists():
        build_checkpoint(SHAPES["small"], path, torch.float32, args.device, args.seed)
    vocab = SHAPES["small"]["vocab_size"]
    prompts = _latency_prompts(vocab, 16, args.seed + 1)
    # Few graph buckets: fp32 compiles its own kernels, and all of them would take minutes.
    kwargs = dict(_engine_kwargs(args), num_blocks=2048, memory_fraction=None, max_num_seqs=16,
                  max_num_batched_tokens=512)
    model, _ = load_model(path, dtype=torch.float32, device=args.device, tokenizer=False)
    with Engine(model, **kwargs) as engine:
        print(f"parity: one-GPU engine ready ({engine.warmup_s:.1f} s warm-up)", flush=True)
        one = [o.token_ids for o in engine.generate(prompts, _greedy(32))]
    del model
    print("parity: starting TP=2", flush=True)
    with start_tensor_parallel_engine(path, 2, tokenizer=False, model_kwargs=dict(dtype=torch.float32),
                                      **kwargs) as engine:
        two = [o.token_ids for o in engine.generate(prompts, _greedy(32))]
    return {"prompts": len(prompts), "identical": sum(a == b for a, b in zip(one, two)),
            "first_divergence": [_first_divergence(a, b) for a, b in zip(one, two)]}


def _first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


# -- the parent ------------------------------------------------------------------------------------------


def _spawn(args, config: str, out: Path, log: Path) -> dict:
    base, _, variant = config.partition("-")
    cmd = [sys.executable, __file__, "--child", base, "--child-out", str(out)]
    if variant == "eager":
        cmd += ["--no-cuda-graphs", "--no-async-scheduling"]
    elif variant == "nccl":
        cmd += ["--symmetric-max-bytes", "0"]
    elif variant == "unfused":
        cmd += ["--no-fuse-projections"]
    elif variant == "barriers":
        cmd += ["--lamport-max-bytes", "0"]
    for name, value in vars(args).items():
        if (variant, name) in (("nccl", "symmetric_max_bytes"), ("barriers", "lamport_max_bytes")):
            continue
        if name in ("child", "child_out", "build", "draw_weights", "configs", "out", "logs") or value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        cmd += [flag] if value is True else [flag, str(value)]
    started = time.perf_counter()
    print(f"{config}: log (all ranks) in {log}", flush=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the configuration's own ranks and Ray workers with it
            proc.wait()
            return {"error": f"timed out after {args.timeout} s; log tail:\n{log.read_text()[-3000:]}"}
    if proc.returncode != 0 or not out.exists():
        return {"error": f"exit {proc.returncode}: {log.read_text()[-3000:]}"}
    result = json.loads(out.read_text())
    result["process_s"] = time.perf_counter() - started
    return result


def _ratio(a, b):
    return a / b if a and b else None


def summarize(runs: dict, args) -> dict:
    def tok_s(config, workload):
        return runs.get(config, {}).get("workloads", {}).get(workload, {}).get("output_tok_per_s")

    def latency(config):
        return runs.get(config, {}).get("batch1_ms_per_token")

    summary = {
        # The headline fields: TP on the uniform workload, DP on the mixed one.
        "tp1_tok_s": tok_s("tp1", "uniform"),
        "tp2_tok_s": tok_s("tp2", "uniform"),
        "tp2_over_tp1": _ratio(tok_s("tp2", "uniform"), tok_s("tp1", "uniform")),
        "tp4_tok_s": tok_s("tp4", "uniform"),
        "tp4_mixed_tok_s": tok_s("tp4", "mixed"),
        "tp4_load_s": runs.get("tp4", {}).get("load_s"),  # the 70B shape's: loading, drawing its shards
        "tp4_batch1_ms_per_token": latency("tp4"),
        "tp4_over_tp1": _ratio(tok_s("tp4", "uniform"), tok_s("tp1", "uniform")),
        "tp4_batch1_latency_ratio": _ratio(latency("tp4"), latency("tp1")),
        "tp1_mixed_tok_s": tok_s("tp1", "mixed"),
        "tp2_mixed_tok_s": tok_s("tp2", "mixed"),
        "dp2_tok_s": tok_s("dp2", "mixed"),
        "dp2_over_one": _ratio(tok_s("dp2", "mixed"), tok_s("tp1", "mixed")),
        "dp2_uniform_tok_s": tok_s("dp2", "uniform"),
        "tp1_batch1_ms_per_token": latency("tp1"),
        "tp2_batch1_ms_per_token": latency("tp2"),
        "tp2_batch1_latency_ratio": _ratio(latency("tp2"), latency("tp1")),
    }
    one, two = runs.get("tp1", {}).get("greedy_tokens"), runs.get("tp2", {}).get("greedy_tokens")
    if one and two:
        summary[f"{args.dtype}_tp2_identical_greedy"] = f"{sum(a == b for a, b in zip(one, two))}/{len(one)}"
        summary[f"{args.dtype}_tp2_first_divergence"] = [_first_divergence(a, b) for a, b in zip(one, two)]
    # "-barriers" against the default: two ranks' sums are a + b on either path and the residual add and RMSNorm after
    # them the same kernel code, so their tokens must be the same. "-nccl": Inductor's add and norm, rounded its own
    # way, and four ranks may add in other orders (bf16): there the count says how far the tokens went apart.
    for tp, variant in itertools.product(("tp2", "tp4"), ("nccl", "barriers")):
        base, other = runs.get(tp, {}).get("greedy_tokens"), runs.get(f"{tp}-{variant}", {}).get("greedy_tokens")
        if base and other:
            same = sum(a == b for a, b in zip(base, other))
            summary[f"{tp}_{variant}_vs_{tp}_identical_greedy"] = f"{same}/{len(base)}"
            summary[f"{tp}_{variant}_tok_s"] = tok_s(f"{tp}-{variant}", "uniform")
            summary[f"{tp}_{variant}_batch1_ms_per_token"] = latency(f"{tp}-{variant}")
    if "parity" in runs:
        summary["fp32_tp2_identical_greedy"] = f"{runs['parity'].get('identical')}/{runs['parity'].get('prompts')}"
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        try:
            result = run_parity(args) if args.child == "parity" else run_child(args)
        except BaseException:
            traceback.print_exc()
            raise
        Path(args.child_out).write_text(json.dumps(result))
        return 0
    shape, dtype = SHAPES[args.shape], getattr(torch, args.dtype)
    build_s = None
    if args.build:
        build_s = build_checkpoint(shape, args.model_dir, dtype, args.device, args.seed, args.draw_weights)
        print(f"built {args.shape} checkpoint in {build_s:.1f} s at {args.model_dir}", flush=True)
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    gpu = torch.cuda.get_device_name(0) if gpus else "cpu"
    now = _dt.datetime.now(_dt.timezone.utc)
    out = Path(args.out) if args.out else RESULTS / f"scale-{gpus}x{gpu.replace(' ', '_')}-{now:%Y-%m-%d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = {}
    scratch = Path(args.model_dir).parent
    logs = Path(args.logs) if args.logs else scratch
    logs.mkdir(parents=True, exist_ok=True)
    for config in args.configs.split(","):
        base, _, variant = config.partition("-")
        if base not in CONFIGS or variant not in ("", "eager", "nccl", "unfused", "barriers"):
            raise SystemExit(f"unknown configuration {config!r} (choose from {', '.join(CONFIGS)}, "
                             "each maybe + '-eager', '-unfused' or, under TP, '-nccl' or '-barriers')")
        needed = {"tp2": 2, "tp4": 4, "dp2": 2, "parity": 2}.get(base, 1)
        if args.device == "cuda" and gpus < needed:
            runs[config] = {"error": f"needs {needed} GPUs, found {gpus}"}
        else:
            runs[config] = _spawn(args, config, scratch / f"scale-{config}-{os.getpid()}.json",
                                  logs / f"scale-{config}-{os.getpid()}.log")
        print(config, json.dumps({k: v for k, v in runs[config].items() if k != "greedy_tokens"})[:1500], flush=True)
        record = dict(
            date=now.strftime("%Y-%m-%d"), gpu=gpu, gpus=gpus, shape=args.shape, model_shape=shape, dtype=args.dtype,
            build_s=build_s, num_requests=args.num_requests, versions=versions(), engine_kwargs=_engine_kwargs(args),
            symmetric_max_bytes=DEFAULT_MAX_BYTES if args.symmetric_max_bytes is None else args.symmetric_max_bytes,
            # None: the library's default (8 MB on two ranks, 1.33 MB on four)
            lamport_max_bytes=args.lamport_max_bytes,
            **summarize(runs, args), runs=runs,
        )
        out.write_text(json.dumps(record, indent=1))  # after every configuration: a later one may not finish
    print(f"\nwrote {out}")
    rows = [("one GPU", "tp1"), ("TP=2", "tp2"), ("TP=2, NCCL only", "tp2-nccl"), ("TP=4", "tp4"), ("DP=2 (Ray)", "dp2"),
            ("one GPU, eager", "tp1-eager"), ("TP=2, eager", "tp2-eager"), ("one GPU, unfused", "tp1-unfused"),
            ("TP=2, unfused", "tp2-unfused"), ("TP=2, all-reduce barriers", "tp2-barriers"),
            ("TP=4, NCCL only", "tp4-nccl"), ("TP=4, all-reduce barriers", "tp4-barriers")]
    print(f"{'run':<16} {'uniform tok/s':>14} {'mixed tok/s':>12} {'batch-1 ms/tok':>15}")
    for label, key in rows:
        r = runs.get(key)
        if r is None:
            continue
        if "error" in r:
            print(f"{label:<16} error: {r['error'].splitlines()[-1] if r['error'] else ''}")
            continue
        w = r.get("workloads", {})
        cells = [w.get(n, {}).get("output_tok_per_s") for n in ("uniform", "mixed")] + [r.get("batch1_ms_per_token")]
        print(f"{label:<16} " + " ".join(f"{c:>{width},.1f}" if c else f"{'-':>{width}}"
                                          for c, width in zip(cells, (14, 12, 15))))
    print({k: record[k] for k in ("tp2_over_tp1", "tp4_over_tp1", "dp2_over_one", "tp2_batch1_latency_ratio",
                                  "tp4_batch1_latency_ratio")})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
