"""Tensor parallelism on Transformers' own sharding (``tp_plan``) and torch.distributed.

hf_paged adds no parallel engine of its own. A model loaded with ``tp_plan="auto"`` (or
``distributed_config=DistributedConfig(tp_plan="auto")``) under ``torchrun`` is sharded by
Transformers: each rank's attention layers compute ``num_attention_heads // N`` query heads and
``num_key_value_heads // N`` KV heads, and the LM head gathers the full logits on every rank. On
top of that:

* `PagedCache` (``model.generate``) and `Engine` size their pools from the per-rank KV heads, so
  each rank's pool holds only its own heads.
* Every rank runs the same deterministic `Engine` (scheduler, block manager, prefix cache) over
  identical inputs, so block tables and batches come out identical without being sent around; the
  pool size is agreed (minimum over ranks) when the engine is built. Only what is random is
  decided once: rank 0 samples and broadcasts the chosen tokens
  (`hf_paged.engine.tensor_parallel.BroadcastSampler`).
* `start_tensor_parallel_engine` launches the ranks itself (torch.multiprocessing): the calling
  process is rank 0 and gets a `DriverEngine`; ranks ``1..N-1`` replay the requests it forwards.

Why replicate the scheduler rather than broadcast its decisions: the scheduler's inputs are small
(requests, aborts, sampled tokens) while its outputs are large (block tables, slot mappings,
positions every step); replaying is deterministic because nothing in scheduling reads clocks,
memory or randomness once the pool size is agreed, and it keeps the engine a single code path
for one rank and for N. Its contract: every rank must see the same requests in the same order
(SPMD scripts do; `DriverEngine` forwards them) and build its engine with the same arguments.

SPMD use (every rank runs the same script)::

    torchrun --nproc-per-node 2 script.py

    model = hf_paged.distributed.load_tensor_parallel_model(path)    # checks, then tp_plan="auto"
    out = model.generate(ids, max_new_tokens=32)                      # PagedCache of local heads
    outs = hf_paged.generate_batch(model, prompts, params)            # same outputs on every rank

Driver use (one process, e.g. a server)::

    with hf_paged.distributed.start_tensor_parallel_engine(path, 2, num_blocks=1024) as engine:
        outs = engine.generate(prompts, params)                      # an Engine, plus N-1 workers
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing
import multiprocessing.util
import os
import queue
import socket
import threading
import time
from typing import Any

import torch
import torch.distributed as dist

from .cache.geometry import check_tensor_parallel
from .engine.engine import Engine
from .engine.gc_pauses import quiet_gc
from .loader import load_causal_lm, load_tokenizer
from .tp_all_reduce import DEFAULT_MAX_BYTES, row_parallel_all_reduce

__all__ = [
    "DriverEngine",
    "check_tensor_parallel",
    "load_tensor_parallel_model",
    "run_worker",
    "start_tensor_parallel_engine",
]

logger = logging.getLogger(__name__)


# -- loading a sharded model ---------------------------------------------------------------------


def load_tensor_parallel_model(model_path: str, tp_size: int | None = None, *,
                               symmetric_max_bytes: int = DEFAULT_MAX_BYTES,
                               lamport_max_bytes: int | None = None, **from_pretrained_kwargs):
    """`hf_paged.loader.load_causal_lm` of ``model_path`` sharded by Transformers (``tp_plan="auto"``).

    Call it on every rank (under ``torchrun``, or after ``init_process_group``). ``tp_size``
    defaults to the world size. The config is checked first (`check_tensor_parallel`), so a model
    that cannot be sharded fails with a clear message instead of a shape error inside a layer.
    ``from_pretrained_kwargs`` take ``dtype`` as the loader does (``"auto"``: the checkpoint's).
    On NCCL, row-parallel layers sum messages of up to ``symmetric_max_bytes`` over symmetric
    memory (`hf_paged.tp_all_reduce`: one-shot or two-shot by size; 0: NCCL's all-reduce for all), bf16/fp16
    ones of up to ``lamport_max_bytes`` without a barrier (None: ``LAMPORT_MAX_BYTES`` on two ranks, less on
    more; 0: never).

    Example:
        >>> model = load_tensor_parallel_model("path/to/model", dtype="bfloat16")  # doctest: +SKIP
    """
    from transformers import AutoConfig, DistributedConfig

    if tp_size is None:
        tp_size = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    trust = from_pretrained_kwargs.get("trust_remote_code", False)
    check_tensor_parallel(AutoConfig.from_pretrained(model_path, trust_remote_code=trust), tp_size)
    if tp_size <= 1:
        return load_causal_lm(model_path, **from_pretrained_kwargs)
    from_pretrained_kwargs["distributed_config"] = DistributedConfig(tp_plan="auto", tp_size=tp_size)
    with row_parallel_all_reduce(symmetric_max_bytes, lamport_max_bytes):
        return load_causal_lm(model_path, **from_pretrained_kwargs)


# -- rank 0 as the driver of N-1 worker ranks -----------------------------------------------------


class _QueueChannel:
    """Driver -> worker messages over torch.multiprocessing queues (one per worker).

    Queues, not collectives: an idle server may send nothing for hours, which a blocking
    collective would turn into a timeout.
    """

    def __init__(self, queues) -> None:
        self.queues = queues

    def send(self, message) -> None:
        for q in self.queues:
            q.put(message)


class DriverEngine(Engine):
    """The `Engine` of rank 0 when ranks ``1..N-1`` run `run_worker`: a drop-in `Engine`.

    Every `add_request`/`abort`/`reset_prefix_cache` is recorded and, at the next `step`, sent to the workers before
    the step runs; the workers replay them on their own engines and step in lockstep (their
    forwards join this rank's collectives). Outputs are produced here only. `close` (or ``with``)
    frees this rank's pool and stops the workers; `shutdown` stops the workers only.
    """

    def __init__(self, model: torch.nn.Module, *, channel, processes=(), owns_process_group: bool = False, **kwargs):
        super().__init__(model, **kwargs)
        self._channel = channel
        self._processes = list(processes)
        self._owns_process_group = owns_process_group
        self._ops: list[tuple] = []
        self._workers_stopped = False

    def add_request(self, prompt, sampling_params=None, request_id: str | None = None, **kwargs) -> str:
        request_id = super().add_request(prompt, sampling_params, request_id, **kwargs)
        self._ops.append(("add", prompt, sampling_params, request_id))  # outputs (and their text) are rank 0's
        return request_id

    def abort(self, request_id: str) -> bool:
        aborted = super().abort(request_id)
        if aborted:
            self._ops.append(("abort", request_id))
        return aborted

    def reset_prefix_cache(self) -> None:
        super().reset_prefix_cache()
        self._ops.append(("reset_prefix_cache",))  # the ranks' block managers must stay identical

    def step(self):
        if self._workers_stopped:
            raise RuntimeError("this tensor-parallel engine was shut down")
        # A dead rank would leave this one waiting in its next collective until the group's timeout.
        for rank, p in enumerate(self._processes, start=1):
            if not p.is_alive():
                raise RuntimeError(f"tensor-parallel rank {rank} (pid {p.pid}) exited with code {p.exitcode}; "
                                   "this engine cannot continue")
        ops, self._ops = self._ops, []
        self._channel.send(("step", ops))
        return super().step()

    def shutdown(self, timeout: float = 20.0) -> None:
        """Stop the worker ranks (idempotent) and tear down the process group this engine created.

        Bounded: workers still alive ``timeout`` seconds after being told to stop are terminated, then
        killed, so a server's shutdown never waits on a stuck rank.
        """
        if self._workers_stopped:
            return
        self._workers_stopped = True
        self._channel.send(("stop",))
        deadline = time.monotonic() + timeout
        # Every rank leaves the group at once: NCCL's teardown waits for its peers, so joining the
        # workers first would leave them waiting for this rank until the join timed out.
        if self._owns_process_group and dist.is_initialized():
            _leave_process_group(max(deadline - time.monotonic(), 1.0))
        for p in self._processes:
            p.join(max(deadline - time.monotonic(), 0.0))
        for p in self._processes:
            if p.is_alive():
                logger.warning("tensor-parallel worker pid %s did not stop in %.0f s; terminating it", p.pid, timeout)
                p.terminate()
                p.join(5)
                if p.is_alive():
                    p.kill()
                    p.join(5)

    def close(self) -> None:
        """Abort what is in flight, free this rank's KV pool and graphs, and stop the worker ranks
        (idempotent; what the server does at exit)."""
        super().close()
        self.shutdown()

    def __enter__(self) -> DriverEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_worker(engine: Engine, receive) -> None:
    """Worker rank loop: replay the driver's requests and aborts, step in lockstep until told to stop.

    ``receive()`` returns the driver's next message (blocking).
    """
    with quiet_gc():
        while True:
            message = receive()
            if message[0] == "stop":
                return
            for op in message[1]:
                if op[0] == "add":
                    Engine.add_request(engine, op[1], op[2], op[3])
                elif op[0] == "abort":
                    Engine.abort(engine, op[1])
                else:
                    Engine.reset_prefix_cache(engine)
            engine.step()  # its updates are dropped: only the driver reports


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_rank(rank: int, world_size: int, port: int, backend: str | None, timeout_s: float) -> None:
    os.environ.setdefault("LOCAL_RANK", str(rank))  # Transformers binds its accelerator from LOCAL_RANK
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    device_id = None
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device_id = torch.device("cuda", rank)
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=device_id,
    )


def _load_rank(model_path, tp_size, tokenizer, model_kwargs):
    model_kwargs = model_kwargs or {}
    model = load_tensor_parallel_model(model_path, tp_size, **model_kwargs)
    trust = model_kwargs.get("trust_remote_code", False)
    return model, load_tokenizer(tokenizer, model_path, trust_remote_code=trust)


def _leave_process_group(timeout: float) -> bool:
    """``destroy_process_group`` with a bound: a peer that died must not keep this rank from exiting."""
    leaving = threading.Thread(target=dist.destroy_process_group, name="hf-paged-tp-teardown", daemon=True)
    leaving.start()
    leaving.join(timeout)
    if leaving.is_alive():
        logger.warning("the tensor-parallel process group did not shut down in %.0f s", timeout)
    return not leaving.is_alive()


def _receive_while_driver_lives(inbox, poll_s: float = 1.0):
    """The driver's next message; ``("stop",)`` once the driver process is gone (killed, crashed), so
    that no worker outlives it holding a GPU."""
    driver = multiprocessing.parent_process()
    while True:
        try:
            return inbox.get(timeout=poll_s)
        except queue.Empty:
            if driver is not None and not driver.is_alive():
                logger.warning("tensor-parallel driver exited; worker pid %s stops", os.getpid())
                return ("stop",)


def _worker_main(rank, world_size, port, backend, timeout_s, model_path, tokenizer, model_kwargs, engine_kwargs,
                 inbox, ready):
    try:
        _init_rank(rank, world_size, port, backend, timeout_s)
        model, tok = _load_rank(model_path, world_size, tokenizer, model_kwargs)
        engine = Engine(model, tokenizer=tok, **engine_kwargs)
        ready.put((rank, None))
    except BaseException as e:  # reported to the driver, which raises it
        ready.put((rank, f"{type(e).__name__}: {e}"))
        raise
    run_worker(engine, lambda: _receive_while_driver_lives(inbox))
    # Graphs first: they hold the communicator's captured collectives, which NCCL's teardown waits on.
    engine.close()
    left = _leave_process_group(15.0)
    # os._exit skips the interpreter's teardown of CUDA/NCCL state, which could block the exit, and with it
    # multiprocessing's exit finalizers: run those, or the locks this rank made (tqdm's, when the checkpoint
    # loaded) stay registered and the resource tracker reports them leaked at shutdown.
    multiprocessing.util._run_finalizers(0)
    os._exit(0 if left else 1)


def start_tensor_parallel_engine(
    model_path: str,
    tensor_parallel_size: int,
    *,
    tokenizer: bool | str | Any = True,
    backend: str | None = None,
    model_kwargs: dict | None = None,
    timeout_s: float = 600.0,
    **engine_kwargs,
) -> DriverEngine:
    """Launch a tensor-parallel engine over ``tensor_parallel_size`` local ranks; returns rank 0's engine.

    The calling process becomes rank 0 (it joins a new process group and loads its shard);
    ranks ``1..N-1`` are spawned with torch.multiprocessing, load theirs, and follow the returned
    `DriverEngine`. Use it like any `Engine` (``generate``, ``add_request``/``step``, ``stream``),
    e.g. hand it to the OpenAI server; call ``shutdown()`` when done.

    Args:
        model_path: a local directory or hub id, loaded with ``attn_implementation="paged"`` and
            ``tp_plan="auto"`` on every rank.
        tensor_parallel_size: ranks (GPUs; CPU processes with gloo when there is no CUDA).
        tokenizer: ``True`` loads ``model_path``'s tokenizer on every rank (the replicated engines
            need it for text prompts and stop strings), a path loads that one, ``None``/``False`` none.
            A tokenizer object is used on rank 0 only and the workers load ``model_path``'s.
        backend: torch.distributed backend (default ``nccl`` with CUDA, else ``gloo``).
        model_kwargs: extra ``from_pretrained`` arguments (e.g. ``dtype``).
        timeout_s: process-group timeout for collectives.
        **engine_kwargs: `Engine` arguments (``num_blocks``, ``max_num_seqs``, ...); identical on all ranks.
    """
    import torch.multiprocessing as mp
    from transformers import AutoConfig

    check_tensor_parallel(AutoConfig.from_pretrained(model_path), tensor_parallel_size)
    if dist.is_initialized():
        raise RuntimeError("start_tensor_parallel_engine starts its own process group; torch.distributed is already initialized")
    if backend is None and torch.cuda.is_available() and torch.cuda.device_count() < tensor_parallel_size:
        raise ValueError(
            f"tensor_parallel_size={tensor_parallel_size} needs as many GPUs, found {torch.cuda.device_count()}"
        )
    worker_tokenizer = tokenizer if isinstance(tokenizer, (bool, str)) or tokenizer is None else True
    ctx = mp.get_context("spawn")
    port = _free_port()
    ready = ctx.Queue()
    inboxes = [ctx.Queue() for _ in range(1, tensor_parallel_size)]
    processes = []
    for rank, inbox in zip(range(1, tensor_parallel_size), inboxes):
        p = ctx.Process(
            target=_worker_main,
            args=(rank, tensor_parallel_size, port, backend, timeout_s, model_path, worker_tokenizer,
                  model_kwargs, engine_kwargs, inbox, ready),
            daemon=True,
        )
        p.start()
        processes.append(p)
    channel = _QueueChannel(inboxes)
    try:
        _init_rank(0, tensor_parallel_size, port, backend, timeout_s)
        model, tok = _load_rank(model_path, tensor_parallel_size, tokenizer if worker_tokenizer is tokenizer else None,
                                model_kwargs)
        if worker_tokenizer is not tokenizer:
            tok = tokenizer
        engine = DriverEngine(model, channel=channel, processes=processes, owns_process_group=True,
                              tokenizer=tok, **engine_kwargs)
        for _ in processes:
            rank, error = ready.get(timeout=timeout_s)
            if error is not None:
                raise RuntimeError(f"tensor-parallel rank {rank} failed to start: {error}")
    except BaseException:
        channel.send(("stop",))
        for p in processes:
            p.join(5)
            if p.is_alive():
                p.terminate()
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    return engine
