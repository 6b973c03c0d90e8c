"""Online serving benchmark for any OpenAI-compatible server (in the manner of ``vllm bench serve``).

Sends a seeded synthetic chat dataset as streaming requests (Poisson arrivals at ``--request-rate``,
at most ``--max-concurrency`` in flight) and measures TTFT, TPOT, ITL and end-to-end latency.

    hf-paged serve --demo --port 8000 &  python bench/serve.py --base-url http://127.0.0.1:8000
    python bench/serve.py --launch "hf-paged serve --demo --port {port}" --num-prompts 200 --max-concurrency 32
    python bench/serve.py --base-url http://127.0.0.1:8000 --server-label transformers --model MODEL_ID

``transformers serve`` answers 422 to fields it does not know (``ignore_eos``: leave the flag off) and
lists every cached model in ``/v1/models`` (pass ``--model``). Output tokens come from the ``usage`` of
the last chunk (``stream_options.include_usage``), else one per content chunk; TTFT is the first
content chunk, ITL the gaps between content chunks, TPOT = (e2e - TTFT) / (output tokens - 1).

Writes ``bench/results/serve-<gpu>-<date>.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import random
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

_TOPICS = ("the water cycle", "a paged attention cache", "how a house is built", "the history of the world",
           "why the sky looks blue", "batch scheduling", "how people learn a new language", "the earth and the sun",
           "a small animal that lives near water", "how a token stream is made", "good work habits", "light and sound")
_TASKS = ("Explain {t} in simple words.", "Write a short story about {t}.", "Give three facts about {t}.",
          "What is the most important thing to know about {t}?", "Write a poem about {t}.",
          "Summarize {t} for a child.", "List the steps to understand {t}.", "Compare {t} with {u}.",
          "Why do people care about {t}? Answer in {n} sentences.", "Tell me how {t} changed over time.")
_FILLER = ("the old man went home after a long day of work and read a little before he slept.",
           "many people think that light and water are the most important things on earth.",
           "each block in the cache can hold a number of tokens from one stream.",
           "she said that the house was very large and had a big picture on every side.",
           "we can help them build a new place to live if we follow the plan.")


def make_prompts(n: int, seed: int) -> list[str]:
    """``n`` varied user messages: a task template, sometimes after 0-12 sentences of context."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        t, u = rng.sample(_TOPICS, 2)
        task = rng.choice(_TASKS).format(t=t, u=u, n=rng.randint(2, 6))
        context = " ".join(rng.choice(_FILLER) for _ in range(rng.choice((0, 0, 1, 2, 4, 8, 12))))
        prompts.append(f"{context}\n\n{task}".strip() if context else task)
    return prompts


def poisson_delays(n: int, rate: float, seed: int) -> list[float]:
    """Seconds to wait before each of ``n`` requests: exponential gaps of mean 1/rate (0 for rate=inf)."""
    if math.isinf(rate):
        return [0.0] * n
    rng = np.random.default_rng(seed)
    return rng.exponential(1.0 / rate, size=n).tolist()


def summarize(values_ms: list[float]) -> dict[str, float | None]:
    """``{mean, p50, p99}`` of a list in ms (None for an empty list)."""
    if not values_ms:
        return {"mean": None, "p50": None, "p99": None}
    a = np.asarray(values_ms, dtype=np.float64)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99))}


@dataclass
class Result:
    ok: bool = False
    error: str | None = None
    ttft: float | None = None  # seconds
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    chunks: int = 0
    prompt_tokens: int | None = None
    output_tokens: int = 0

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


async def one_request(client: httpx.AsyncClient, url: str, payload: dict, timeout: float) -> Result:
    """One streaming request; reads SSE ``data:`` lines until ``[DONE]`` (or, for servers that send none,
    until the stream closes after a choice reported its ``finish_reason``)."""
    r = Result()
    start = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", url, json=payload, timeout=timeout) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                r.error = f"HTTP {resp.status_code}: {body[:300]}"
                return r
            done = finished = False
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    r.error = f"stream error: {json.dumps(chunk['error'])[:300]}"
                    return r
                if chunk.get("usage"):
                    r.prompt_tokens = chunk["usage"].get("prompt_tokens")
                    r.output_tokens = chunk["usage"].get("completion_tokens") or 0
                for choice in chunk.get("choices") or []:
                    finished = finished or bool(choice.get("finish_reason"))
                    text = (choice.get("delta") or {}).get("content") if "delta" in choice else choice.get("text")
                    if text:
                        now = time.perf_counter()
                        if last is None:
                            r.ttft = now - start
                        else:
                            r.itl.append(now - last)
                        last = now
                        r.chunks += 1
            if not done and not finished:
                r.error = "stream ended without [DONE] or a finish_reason"
                return r
    except Exception as e:  # noqa: BLE001  any failure is recorded, never raised
        r.error = f"{type(e).__name__}: {e}"
        return r
    r.e2e = time.perf_counter() - start
    r.output_tokens = r.output_tokens or r.chunks
    r.ok = r.ttft is not None or r.output_tokens == 0
    if not r.ok:
        r.error = "no content and no usage"
    return r


def offline_throughput(model_dir: str, prompts: list[str], max_tokens: int, ignore_eos: bool) -> dict:
    """The prompts, chat-templated, through `hf_paged.Engine.generate` once warmed up: output tokens per second."""
    import gc

    import torch

    from hf_paged import SamplingParams
    from hf_paged.engine.core_process import load_engine
    from hf_paged.engine.input_processor import render_chat

    engine = load_engine(model_dir)  # what `hf-paged serve DIR` builds
    ids = [render_chat(engine.tokenizer, [{"role": "user", "content": p}]) for p in prompts]  # as the server does
    params = SamplingParams(max_new_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos)
    engine.generate(ids[:64], params)  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = engine.generate(ids, params)
    elapsed = time.perf_counter() - start
    tokens = sum(len(s.token_ids) for o in outputs for s in o.samples)
    engine.close()
    del engine
    gc.collect()
    return {"model": model_dir, "requests": len(ids), "output_tokens": tokens, "duration_s": elapsed,
            "output_throughput": tokens / elapsed, "engine_warmup_note": "Engine built and warmed up before timing"}


async def run_benchmark(base_url: str, model: str, prompts: list[str], *, endpoint: str = "chat",
                        request_rate: float = math.inf, max_concurrency: int | None = None,
                        max_tokens: int = 128, ignore_eos: bool = False, api_key: str | None = None,
                        timeout: float = 600.0, deadline: float = 3600.0, seed: int = 0,
                        include_usage: bool = True, start_at: float | None = None) -> tuple[list[Result], float]:
    """Send every prompt; returns (per-request results, benchmark duration in seconds).

    ``start_at``: a `time.monotonic()` instant to begin at (several client processes start together).
    """
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    url = base_url.rstrip("/") + path
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    delays = poisson_delays(len(prompts), request_rate, seed)
    conns = max_concurrency or len(prompts)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=conns, max_keepalive_connections=conns)

    def payload(prompt: str) -> dict:
        body: dict = {"model": model, "max_tokens": max_tokens, "stream": True, "temperature": 0.0}
        body.update({"messages": [{"role": "user", "content": prompt}]} if endpoint == "chat" else {"prompt": prompt})
        if include_usage:
            body["stream_options"] = {"include_usage": True}
        if ignore_eos:
            body["ignore_eos"] = True
        return body

    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout) as client:
        async def limited(prompt: str) -> Result:
            if sem is None:
                return await one_request(client, url, payload(prompt), timeout)
            async with sem:
                return await one_request(client, url, payload(prompt), timeout)

        if start_at is not None:
            await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        start = time.monotonic()
        tasks = []
        for prompt, delay in zip(prompts, delays):
            if delay:
                await asyncio.sleep(delay)
            if time.monotonic() - start > deadline:
                break
            tasks.append(asyncio.create_task(limited(prompt)))
        remaining = max(0.0, deadline - (time.monotonic() - start))
        finished, pending = await asyncio.wait(tasks, timeout=remaining) if tasks else (set(), set())
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        duration = time.monotonic() - (start if start_at is None else min(start, start_at))
    late = Result(error=f"overall deadline {deadline:g}s passed")
    results = [t.result() if t in finished else late for t in tasks]
    results += [late] * (len(prompts) - len(tasks))
    return results, duration


def _client_process(prompts: list[str], kwargs: dict) -> tuple[list[Result], float, float]:
    """One of ``--num-clients`` processes: its share of the prompts; (results, duration, CPU seconds)."""
    cpu = time.process_time()
    results, duration = asyncio.run(run_benchmark(prompts=prompts, **kwargs))
    return results, duration, time.process_time() - cpu


def run_clients(num_clients: int, prompts: list[str], *, max_concurrency: int | None, request_rate: float,
                seed: int, **kwargs) -> tuple[list[Result], float, list[float]]:
    """`run_benchmark` over ``num_clients`` processes that start together, each sending every
    ``num_clients``-th prompt at its share of the concurrency and rate (one Python client tops out near
    ~25k streamed tokens/s). Returns (results in prompt order, duration, each process's CPU seconds)."""
    import concurrent.futures
    import multiprocessing

    shards = [prompts[i::num_clients] for i in range(num_clients)]
    start_at = time.monotonic() + 1.0  # after every process has started
    jobs = [dict(kwargs, max_concurrency=max_concurrency and math.ceil(max_concurrency / num_clients),
                 request_rate=request_rate / num_clients, seed=seed + i, start_at=start_at)
            for i in range(num_clients)]
    # fork: the children have this module as loaded (a spawned child would have to import it by name, and
    # the tests load it from its path); nothing here has touched CUDA yet (--offline runs after).
    with concurrent.futures.ProcessPoolExecutor(num_clients, mp_context=multiprocessing.get_context("fork")) as ex:
        outs = list(ex.map(_client_process, shards, jobs))
    results: list[Result] = [None] * len(prompts)  # type: ignore[list-item]
    for i, (shard_results, _, _) in enumerate(outs):
        results[i::num_clients] = shard_results
    return results, max(d for _, d, _ in outs), [c for _, _, c in outs]


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    slos = {}
    for item in items or []:
        key, _, ms = item.partition(":")
        if key not in ("ttft", "tpot", "e2e") or not ms:
            raise ValueError(f"bad --goodput item {item!r} (want ttft:MS, tpot:MS or e2e:MS)")
        slos[key] = float(ms)
    return slos


def report(results: list[Result], duration: float, slos: dict[str, float] | None = None) -> dict:
    ok = [r for r in results if r.ok]
    ms = lambda xs: [x * 1000 for x in xs if x is not None]
    out_tokens = sum(r.output_tokens for r in ok)
    rep = {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": out_tokens / duration if duration else 0.0,
        "total_input_tokens": sum(r.prompt_tokens or 0 for r in ok), "total_output_tokens": out_tokens,
        "input_tokens_known": all(r.prompt_tokens is not None for r in ok),
        "ttft_ms": summarize(ms(r.ttft for r in ok)), "tpot_ms": summarize(ms(r.tpot for r in ok)),
        "itl_ms": summarize(ms(x for r in ok for x in r.itl)), "e2e_ms": summarize(ms(r.e2e for r in ok)),
        "errors": list(dict.fromkeys(r.error for r in results if r.error))[:5],
    }
    if slos:
        def good(r: Result) -> bool:  # a one-token reply has no TPOT: that SLO holds vacuously
            vals = {"ttft": r.ttft, "tpot": r.tpot, "e2e": r.e2e}
            return all(vals[k] * 1000 <= limit if vals[k] is not None else k == "tpot"
                       for k, limit in slos.items())
        n_good = sum(good(r) for r in ok)
        rep["goodput"] = {"slos_ms": slos, "good_requests": n_good, "requests_per_s": n_good / duration}
    return rep


def gpu_name() -> str:
    with contextlib.suppress(Exception):
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    return "cpu"


def versions() -> dict[str, str]:
    v = {"python": platform.python_version(), "httpx": httpx.__version__}
    for mod in ("torch", "transformers", "hf_paged"):
        with contextlib.suppress(Exception):
            v[mod] = getattr(__import__(mod), "__version__", "unknown")
    return v


def print_table(res: dict) -> None:
    rows = [("Server", res["server"]), ("Model", res["model"]), ("Completed / failed", f"{res['completed']} / {res['failed']}"),
            ("Duration (s)", f"{res['duration_s']:.2f}"), ("Request throughput (req/s)", f"{res['request_throughput']:.2f}"),
            ("Output throughput (tok/s)", f"{res['output_throughput']:.2f}"),
            ("Total input / output tokens", f"{res['total_input_tokens']} / {res['total_output_tokens']}")]
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        s = res[key]
        fmt = lambda x: "-" if x is None else f"{x:.2f}"
        rows.append((f"{key[:-3].upper()} ms mean/p50/p99", f"{fmt(s['mean'])} / {fmt(s['p50'])} / {fmt(s['p99'])}"))
    if "goodput" in res:
        rows.append(("Goodput (req/s)", f"{res['goodput']['requests_per_s']:.2f} ({res['goodput']['good_requests']} good)"))
    if "server_process_cpu_ms_per_output_token" in res:
        rows.append(("Server process CPU ms/token", f"{res['server_process_cpu_ms_per_output_token']:.3f}"))
        rows.append(("Server processes busy (CPU/wall)",
                     " ".join(f"{p['busy']:.2f}{' (GPU)' if p['gpu'] else ''}"
                              for p in res["server_processes"] if p["busy"] >= 0.01)))
    if "client_busy" in res:
        rows.append(("Benchmark client busy (CPU/wall)", " ".join(f"{b:.2f}" for b in res["client_busy"])))
    if "offline" in res:
        rows.append(("Offline engine (tok/s)", f"{res['offline']['output_throughput']:.2f} (server: "
                     f"{100 * res['output_throughput_over_offline']:.0f}%)"))
    width = max(len(k) for k, _ in rows)
    print("=" * (width + 30))
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print("=" * (width + 30))


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) process ``pid`` has used, from /proc (Linux); ``None`` elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux: parents read from /proc/*/stat; only ``pid`` elsewhere)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            children.setdefault(int(stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(int(stat.parent.name))
    pids, i = [pid], 0
    while i < len(pids):
        pids += children.get(pids[i], [])
        i += 1
    return pids


def gpu_pids() -> set[int]:
    """Processes holding a CUDA context (the engine process, TP ranks), from ``nvidia-smi``; empty without it."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout
        return {int(line) for line in out.split() if line.strip().isdigit()}
    return set()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_health(base_url: str, proc: subprocess.Popen | None, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the launched server exited with code {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(base_url + "/health", timeout=5).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"{base_url}/health did not answer 200 within {timeout:g}s")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--launch", default=None, help='server command to start, e.g. "hf-paged serve --demo --port {port}"')
    p.add_argument("--launch-timeout", type=float, default=900.0, help="seconds to wait for the launched /health")
    p.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
    p.add_argument("--model", default=None, help="model name to send (default: first id of GET /v1/models)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--request-rate", type=float, default=math.inf, help="requests/s, Poisson arrivals (inf: all at once)")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--num-clients", type=int, default=1,
                   help="client processes sharing the prompts, concurrency and rate (one Python process saturates "
                        "near ~25k streamed tokens/s: see client_busy in the results)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--ignore-eos", action="store_true", help="send ignore_eos: true (not every server accepts it)")
    p.add_argument("--no-usage", action="store_true", help="don't send stream_options.include_usage; count chunks")
    p.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS", help="SLOs, e.g. ttft:500 tpot:50")
    p.add_argument("--server-label", default="hf-paged", help="recorded as `server` (hf-paged, transformers, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout (s)")
    p.add_argument("--deadline", type=float, default=3600.0, help="overall deadline for the requests (s)")
    p.add_argument("--offline", default=None, metavar="MODEL_DIR",
                   help="after the run, the same chats through hf_paged's offline Engine in this process (greedy, "
                        "--max-tokens): records its output tok/s and the server's share of it. Takes the GPU's free "
                        "memory: use it with --launch (the server is stopped first) or a server on another GPU")
    p.add_argument("--server-pid", type=int, default=None,
                   help="pid of the server under --base-url: its processes' CPU time is recorded (as with --launch)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    slos = parse_goodput(args.goodput)

    proc = None
    base_url = args.base_url.rstrip("/")
    if args.launch:
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen(shlex.split(args.launch.format(port=port)))
    try:
        if proc is not None:
            wait_health(base_url, proc, args.launch_timeout)
        model = args.model
        if model is None:
            headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
            model = httpx.get(base_url + "/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
        prompts = make_prompts(args.num_prompts, args.seed)
        server_pid = proc.pid if proc is not None else args.server_pid
        tree = process_tree(server_pid) if server_pid is not None else []
        cpu_before = {pid: process_cpu_s(pid) for pid in tree}
        bench_kwargs = dict(base_url=base_url, model=model, endpoint=args.endpoint, max_tokens=args.max_tokens,
                            ignore_eos=args.ignore_eos, api_key=args.api_key, timeout=args.timeout,
                            deadline=args.deadline, include_usage=not args.no_usage)
        if args.num_clients > 1:
            results, duration, client_cpu = run_clients(
                args.num_clients, prompts, max_concurrency=args.max_concurrency, request_rate=args.request_rate,
                seed=args.seed, **bench_kwargs)
        else:
            cpu = time.process_time()
            results, duration = asyncio.run(run_benchmark(
                prompts=prompts, max_concurrency=args.max_concurrency, request_rate=args.request_rate,
                seed=args.seed, **bench_kwargs))
            client_cpu = [time.process_time() - cpu]
        cpu_after = {pid: process_cpu_s(pid) for pid in tree}
        on_gpu = gpu_pids()
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    offline = offline_throughput(args.offline, prompts, args.max_tokens, args.ignore_eos) if args.offline else None
    gpu, date = gpu_name(), _dt.date.today().isoformat()
    res = {"gpu": gpu, "date": date, "server": args.server_label, "model": model, "base_url": base_url,
           "endpoint": args.endpoint, "num_prompts": args.num_prompts, "max_concurrency": args.max_concurrency,
           "request_rate": "inf" if math.isinf(args.request_rate) else args.request_rate,
           "max_tokens": args.max_tokens, "ignore_eos": args.ignore_eos, "seed": args.seed,
           **report(results, duration, slos), "versions": versions()}
    used = {pid: cpu_after[pid] - cpu_before[pid] for pid in tree
            if cpu_before.get(pid) is not None and cpu_after.get(pid) is not None}
    if server_pid in used and res["total_output_tokens"]:
        # The launched process only: with --engine-process its front end (the engine process is a child
        # and not counted); in a thread, front end and engine loop together. What a front end costs per token.
        res["server_process_cpu_s"] = used[server_pid]
        res["server_process_cpu_ms_per_output_token"] = 1e3 * used[server_pid] / res["total_output_tokens"]
        # Every process of the server (front ends, engine process, TP ranks, and multiprocessing's
        # helpers): a busy fraction near 1.0 is a process that saturates its core.
        res["server_processes"] = [{"pid": pid, "gpu": pid in on_gpu, "cpu_s": round(cpu, 3),
                                    "busy": round(cpu / duration, 3)} for pid, cpu in used.items()]
    # This benchmark's own processes: near 1.0 they, not the server, may be what limits the run.
    res["num_clients"] = args.num_clients
    res["client_busy"] = [round(cpu / duration, 3) for cpu in client_cpu]
    if offline is not None:
        res["offline"] = offline
        res["output_throughput_over_offline"] = res["output_throughput"] / offline["output_throughput"]
    out = Path(args.out or Path(__file__).parent / "results" / f"serve-{gpu.replace(' ', '_')}-{date}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")
    print_table(res)
    return res


if __name__ == "__main__":
    res = main()
    sys.exit(0 if res["completed"] else 1)
