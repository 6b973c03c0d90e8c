"""Data parallelism on Ray: N `Engine` replicas as Ray actors behind a KV-aware, prefix-aware router.

Ray does the distribution (placement, one GPU per replica, failure detection, streaming); hf_paged
adds only the routing policy:

* **Least work, where it fits.** A request reserves the blocks of ``len(prompt) + max_new_tokens``
  tokens per sample on its replica until it ends: that is its share of the replica's KV pool and a
  measure of the work it brings. It goes to the live replica with the fewest blocks reserved among
  those whose free blocks, estimated as ``min(last reported free blocks, pool size - reserved)``,
  hold it; when none does, to the one with the most free blocks (it queues there). Reservations
  count at once, so a burst (which arrives before any replica reports) is spread evenly; balancing
  work rather than free memory keeps replicas with unequal pools equally busy (measured on two
  H100s: "most free blocks" sent 213 of 256 requests to the replica with the larger pool).
* **Prefix affinity.** A prompt longer than one block would hit the prefix cache of the replica
  that already holds its first block, so the hash of its first full block remembers the replica
  that served it; the next prompt with that block goes there while that replica has room for it.
* **Streaming.** Each request is one Ray streaming-generator call into its replica's async actor;
  updates (new tokens, finish, output) come back as the replica's engine produces them.
* **Failures.** When a replica dies (crash, node loss, ``ray.kill``) every request in flight there
  is replayed, from its prompt and with the same parameters, on another live replica; nothing is
  lost. Tokens already streamed are not streamed again: as many of a replay's first tokens are
  skipped, and as many characters of its first ``text_delta``s, and only what comes after is forwarded. Greedy and seeded
  requests replay exactly (seeded draws do not depend on the batch), so the stream stays
  consistent; an unseeded sampled request is sampled afresh and its final ``output`` is the replay's.

Example::

    import ray
    from hf_paged.integrations.ray import ReplicaRouter, generate_batch_dp

    ray.init()
    outs = generate_batch_dp("path/to/model", prompts, SamplingParams(max_new_tokens=64), num_replicas=4)

    router = ReplicaRouter("path/to/model", num_replicas=4, engine_kwargs=dict(num_blocks=4096))
    async for update in router.stream("Hello", SamplingParams(max_new_tokens=32)):
        print(update.new_token_ids)
    router.shutdown()

Install with ``pip install 'hf-paged[ray]'``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..cache.geometry import cdiv, max_model_len
from ..engine import AsyncEngine, Engine, GenerationOutput, RequestUpdate, SamplingParams
from ..loader import load_model, load_tokenizer
from . import require

__all__ = ["EngineReplica", "ReplicaRouter", "RoutingTable", "generate_batch_dp"]

logger = logging.getLogger(__name__)


# -- the routing policy (plain Python, tested without Ray) ------------------------------------------


@dataclass
class _ReplicaState:
    num_blocks: int
    block_size: int
    reported_free: int
    reserved: int = 0
    in_flight: int = 0
    alive: bool = True
    served: int = 0

    @property
    def free_estimate(self) -> int:
        return min(self.reported_free, self.num_blocks - self.reserved)


@dataclass
class RoutingTable:
    """Which replica gets the next request (see the module docstring); no Ray in here.

    ``replicas`` holds each replica's ``(num_blocks, block_size)``.
    """

    replicas: list[tuple[int, int]]
    max_prefixes: int = 100_000
    _state: list[_ReplicaState] = field(init=False)
    _prefix_owner: OrderedDict = field(init=False, default_factory=OrderedDict)

    def __post_init__(self) -> None:
        self._state = [_ReplicaState(n, bs, n) for n, bs in self.replicas]

    def alive(self) -> list[int]:
        return [i for i, s in enumerate(self._state) if s.alive]

    def need(self, replica: int, num_prompt_tokens: int, params: SamplingParams) -> int:
        """Blocks a request holds on ``replica`` when every sample runs to ``max_new_tokens``."""
        bs = self._state[replica].block_size
        return params.n * cdiv(num_prompt_tokens + params.max_new_tokens, bs)

    def _prefix_key(self, replica: int, token_ids: Sequence[int] | None):
        bs = self._state[replica].block_size
        # Only a block before the one holding the prompt's last token enters the prefix cache.
        if token_ids is None or len(token_ids) <= bs:
            return None
        return hash(tuple(token_ids[:bs]))

    def choose(self, token_ids: Sequence[int] | None, num_prompt_tokens: int, params: SamplingParams,
               exclude: frozenset[int] = frozenset()) -> int:
        """The replica for a request (and reserve its blocks there); raises ``RuntimeError`` if none lives."""
        candidates = [i for i in self.alive() if i not in exclude] or self.alive()
        if not candidates:
            raise RuntimeError("no live replica left to serve the request")
        key = self._prefix_key(candidates[0], token_ids)
        owner = self._prefix_owner.get(key) if key is not None else None
        fits = [i for i in candidates if self._state[i].free_estimate >= self.need(i, num_prompt_tokens, params)]
        if owner in fits:
            choice = owner
        elif fits:
            choice = min(fits, key=lambda i: (self._state[i].reserved, -self._state[i].free_estimate, i))
        else:
            choice = max(candidates, key=lambda i: (self._state[i].free_estimate, -self._state[i].in_flight, -i))
        if key is not None:
            self._prefix_owner[key] = choice
            self._prefix_owner.move_to_end(key)
            while len(self._prefix_owner) > self.max_prefixes:
                self._prefix_owner.popitem(last=False)
        s = self._state[choice]
        s.reserved += self.need(choice, num_prompt_tokens, params)
        s.in_flight += 1
        s.served += 1
        return choice

    def release(self, replica: int, num_prompt_tokens: int, params: SamplingParams) -> None:
        s = self._state[replica]
        s.reserved -= self.need(replica, num_prompt_tokens, params)
        s.in_flight -= 1

    def report(self, replica: int, free_blocks: int) -> None:
        self._state[replica].reported_free = free_blocks

    def mark_dead(self, replica: int) -> None:
        self._state[replica].alive = False
        for key in [k for k, v in self._prefix_owner.items() if v == replica]:
            del self._prefix_owner[key]

    def pool_totals(self) -> tuple[int, int]:
        """KV blocks of the live replicas, and how many of them they last reported free."""
        live = [s for s in self._state if s.alive]
        return sum(s.num_blocks for s in live), sum(min(s.reported_free, s.num_blocks) for s in live)

    def snapshot(self) -> list[dict[str, Any]]:
        return [dict(vars(s), free_estimate=s.free_estimate) for s in self._state]


# -- the replica actor --------------------------------------------------------------------------------


class EngineReplica:
    """One `Engine` in a Ray actor (an async actor: many requests stream through it at once).

    The engine runs on the thread of its `AsyncEngine` and batches every request in flight.
    Used through `ReplicaRouter`, which creates it with ``ray.remote``.
    """

    def __init__(self, model_path: str, engine_kwargs: dict | None = None, model_kwargs: dict | None = None,
                 tokenizer: bool | str = True) -> None:
        model, tok = load_model(model_path, tokenizer=tokenizer, **(model_kwargs or {}))
        self.engine = Engine(model, tokenizer=tok, **(engine_kwargs or {}))
        self.client = AsyncEngine(self.engine, name=f"hf-paged-replica-{uuid.uuid4().hex[:8]}")

    async def shutdown(self, drain_timeout: float = 0.0) -> None:
        """Stop the engine (requests in flight end aborted after ``drain_timeout`` s) and free its KV pool."""
        await asyncio.to_thread(self.client.shutdown, drain_timeout)

    def info(self) -> dict[str, Any]:
        import os

        pool = self.engine.kv_pool
        gpu = str(torch.cuda.get_device_properties(pool.device).uuid) if pool.device.type == "cuda" else None
        return {"num_blocks": pool.num_blocks, "block_size": pool.block_size, "free_blocks": pool.blocks.num_free,
                "pid": os.getpid(), "device": str(pool.device), "gpu_uuid": gpu, "kv_pool_bytes": pool.nbytes,
                "vocab_size": self.engine.vocab_size, "capacity_tokens": self.engine.block_manager.capacity_tokens,
                "max_model_len": max_model_len(self.engine.model), "model_class": type(self.engine.model).__name__,
                "dtype": str(next(self.engine.model.parameters()).dtype)}

    def pool_stats(self) -> dict[str, int]:
        blocks = self.engine.kv_pool.blocks
        return {"num_blocks": blocks.num_blocks, "free_blocks": blocks.num_free, "used_blocks": blocks.num_used,
                "unfinished": int(self.engine.has_unfinished())}

    def engine_stats(self):
        return self.engine.stats()

    async def generate(self, prompt, params: SamplingParams, stream_text: bool | None = None,
                       final_only: bool = False):
        """Stream ``(updates, free blocks after them)`` for one request.

        Each item holds every update that was ready (one Ray object per batch, not per token: the
        hop costs more than a step); with ``final_only`` only the finished update is sent.
        """
        blocks = self.engine.kv_pool.blocks
        batches = self.client.astream_batches(prompt, params, stream_text=stream_text)
        async with aclosing(batches):
            async for batch in batches:
                if final_only and not batch[-1].finished:
                    continue
                yield (batch[-1:] if final_only else batch), blocks.num_free


# -- the router -------------------------------------------------------------------------------------


def _replica_died(error: BaseException) -> bool:
    import ray.exceptions as rex

    kinds = tuple(getattr(rex, n) for n in ("RayActorError", "ActorDiedError", "ActorUnavailableError",
                                            "WorkerCrashedError", "NodeDiedError") if hasattr(rex, n))
    return isinstance(error, kinds)


def _cancel(stream) -> None:
    try:
        require("ray", "ray").cancel(stream)
    except Exception:  # finished or dead already
        pass


class ReplicaRouter:
    """N `EngineReplica` actors and the routing policy over them; streams, survives replica deaths.

    Call ``ray.init(...)`` first (or it is called for you with defaults).

    Args:
        model_path: directory or hub id every replica loads (``attn_implementation="paged"``).
        num_replicas: how many engines.
        engine_kwargs: `Engine` arguments of every replica (``num_blocks``, ``max_num_seqs``...).
        model_kwargs: `hf_paged.loader.load_model` arguments (``device``, ``dtype``, ...; default: the
            replica's GPU, else the CPU, in the checkpoint's dtype).
        tokenizer: ``True``: ``model_path``'s tokenizer (here, for text prompts and prefix
            hashing, and in the replicas, for text outputs and stop strings); a path; or ``False``.
        num_gpus: GPUs per replica (default 1 when the Ray cluster has a GPU per replica, else 0).
        num_cpus: CPUs per replica (default 1).
        max_retries: replays of one request after replica deaths before it fails.
        actor_options: further ``.options(...)`` of the actors (``max_restarts``, ``runtime_env``...).
    """

    def __init__(
        self,
        model_path: str,
        num_replicas: int,
        *,
        engine_kwargs: dict | None = None,
        model_kwargs: dict | None = None,
        tokenizer: bool | str = True,
        num_gpus: float | None = None,
        num_cpus: float = 1,
        max_retries: int = 3,
        actor_options: dict | None = None,
    ) -> None:
        ray = require("ray", "ray")
        if not isinstance(num_replicas, int) or num_replicas < 1:
            raise ValueError(f"num_replicas must be a positive int, got {num_replicas!r}")
        if not ray.is_initialized():
            ray.init()
        if num_gpus is None:
            num_gpus = 1 if ray.cluster_resources().get("GPU", 0) >= num_replicas else 0
        self.model_path = model_path
        self.max_retries = max_retries
        self.tokenizer = load_tokenizer(tokenizer, model_path)
        actor = ray.remote(EngineReplica).options(num_gpus=num_gpus, num_cpus=num_cpus, **(actor_options or {}))
        self.replicas = [
            actor.remote(model_path, engine_kwargs, model_kwargs, tokenizer) for _ in range(num_replicas)
        ]
        #: Each replica's pool, device and model facts (`EngineReplica.info`), as built.
        self.infos = ray.get([r.info.remote() for r in self.replicas])
        self.table = RoutingTable([(i["num_blocks"], i["block_size"]) for i in self.infos])
        self._ids = itertools.count()
        # request id -> replicas it was sent to, in order (the latest 10,000 requests: a server runs for long)
        self.assignments: OrderedDict[str, list[int]] = OrderedDict()

    # -- requests ---------------------------------------------------------------------------------

    def _token_ids(self, prompt) -> list[int] | None:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                return None
            return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        return list(prompt) if isinstance(prompt, (list, tuple)) else None

    async def stream(self, prompt, sampling_params: SamplingParams | dict | None = None,
                     request_id: str | None = None, *, stream_text: bool | None = None) -> AsyncIterator[RequestUpdate]:
        """Updates of one request as its replica produces them; the last one carries ``output``.

        ``stream_text`` gives the updates ``text_delta``s (default: the replicas' ``engine_kwargs``);
        they add up to each sample's final text. A replica's death replays the request elsewhere
        (see the module docstring).
        """
        async with aclosing(self._updates(prompt, sampling_params, request_id, stream_text, False)) as updates:
            async for update in updates:
                yield update

    async def _updates(self, prompt, sampling_params, request_id: str | None, stream_text: bool | None,
                       final_only: bool) -> AsyncIterator[RequestUpdate]:
        params = SamplingParams.coerce(sampling_params)
        request_id = request_id or f"dp-{next(self._ids)}"
        token_ids = self._token_ids(prompt)
        # Token ids travel to the replica when known, so it hashes the very blocks the router did.
        payload = token_ids if token_ids is not None else prompt
        num_prompt_tokens = len(token_ids) if token_ids is not None else 0
        sent: dict[int, list[int]] = {}  # tokens forwarded so far, per sample
        sent_text: dict[int, int] = {}  # characters of text forwarded so far, per sample
        tried: list[int] = []
        self.assignments[request_id] = tried
        while len(self.assignments) > 10_000:
            self.assignments.popitem(last=False)
        while True:
            replica = self.table.choose(token_ids, num_prompt_tokens, params, exclude=frozenset(tried))
            tried.append(replica)
            replayed: dict[int, int] = {}  # tokens of this attempt, per sample
            replayed_text: dict[int, int] = {}  # characters of text of this attempt, per sample
            stream = self.replicas[replica].generate.remote(payload, params, stream_text, final_only)
            finished = False
            try:
                async for ref in stream:
                    batch, free_blocks = await ref
                    self.table.report(replica, free_blocks)
                    for update in batch:
                        update = self._dedupe(update, sent, replayed, sent_text, replayed_text)
                        update.request_id = request_id
                        if update.output is not None:
                            update.output = replace(update.output, request_id=request_id,
                                                    prompt=prompt if isinstance(prompt, str) else update.output.prompt)
                        if update.new_token_ids or update.text_delta or update.finish_reason or update.finished:
                            yield update
                        if update.finished:
                            finished = True
                            return
                raise RuntimeError(f"replica {replica} ended the stream of {request_id} without an output")
            except Exception as e:
                if not _replica_died(e):
                    raise
                self.table.mark_dead(replica)
                logger.warning("replica %d died with %s in flight (%s); replaying it", replica, request_id, e)
                if len(tried) > self.max_retries:
                    raise RuntimeError(f"{request_id} failed on {len(tried)} replicas") from e
            finally:
                self.table.release(replica, num_prompt_tokens, params)
                if not finished:
                    # The caller stopped listening (or the replica died): abort it there too.
                    _cancel(stream)

    @staticmethod
    def _dedupe(update: RequestUpdate, sent: dict[int, list[int]], replayed: dict[int, int],
                sent_text: dict[int, int], replayed_text: dict[int, int]) -> RequestUpdate:
        """Forward only the tokens, and the text, past what an earlier attempt already streamed for this sample.

        Text is counted apart from tokens: the engine holds text back around stop strings, so a
        delta need not cover the tokens of its update. The replay's text is that of the same tokens
        (greedy or seeded), so its first ``sent_text`` characters are those streamed already.
        """
        i = update.sample_index
        done_before = sent.setdefault(i, [])
        position = replayed.get(i, 0)
        replayed[i] = position + len(update.new_token_ids)
        skip = max(0, min(len(done_before) - position, len(update.new_token_ids)))
        delta = update.text_delta
        text_skip = 0
        if delta:
            text_position = replayed_text.get(i, 0)
            replayed_text[i] = text_position + len(delta)
            text_skip = max(0, min(sent_text.get(i, 0) - text_position, len(delta)))
        if skip or text_skip:
            update = replace(update, new_token_ids=update.new_token_ids[skip:],
                             text_delta=delta[text_skip:] if delta is not None else None)
        done_before.extend(update.new_token_ids)
        if update.text_delta:
            sent_text[i] = sent_text.get(i, 0) + len(update.text_delta)
        return update

    async def generate(self, prompt, sampling_params: SamplingParams | dict | None = None,
                       request_id: str | None = None) -> GenerationOutput:
        """The finished output of one request (its replica sends nothing before it)."""
        async with aclosing(self._updates(prompt, sampling_params, request_id, None, True)) as updates:
            async for update in updates:
                if update.finished:
                    return update.output
        raise RuntimeError("stream ended without an output")  # pragma: no cover

    async def generate_many(self, prompts: Sequence, sampling_params=None) -> list[GenerationOutput]:
        """Every prompt at once (fanned out over the replicas); outputs in input order."""
        per_prompt = _per_prompt(prompts, sampling_params)
        return list(await asyncio.gather(*(self.generate(p, sp) for p, sp in zip(prompts, per_prompt))))

    # -- inspection and teardown ------------------------------------------------------------------

    def pool_stats(self) -> list[dict[str, int] | None]:
        """Each replica's pool (``None`` for a dead one)."""
        ray = require("ray", "ray")
        out = []
        for i, r in enumerate(self.replicas):
            if not self.table._state[i].alive:
                out.append(None)
                continue
            try:
                out.append(ray.get(r.pool_stats.remote()))
            except Exception as e:
                if not _replica_died(e):
                    raise
                self.table.mark_dead(i)
                out.append(None)
        return out

    def shutdown(self, timeout: float = 30.0) -> None:
        """Let the live replicas close their engines (up to ``timeout`` s), then kill them."""
        ray = require("ray", "ray")
        closing = [r.shutdown.remote() for i, r in enumerate(self.replicas) if self.table._state[i].alive]
        if closing:
            ray.wait(closing, num_returns=len(closing), timeout=timeout)  # a dead one's error is ready too
        for r in self.replicas:
            try:
                ray.kill(r)
            except Exception:  # already gone
                pass
        self.replicas = []

    def __enter__(self) -> ReplicaRouter:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _per_prompt(prompts: Sequence, sampling_params) -> list:
    if isinstance(sampling_params, (list, tuple)):
        if len(sampling_params) != len(prompts):
            raise ValueError(f"sampling_params has {len(sampling_params)} entries for {len(prompts)} prompts")
        return list(sampling_params)
    return [sampling_params] * len(prompts)


def _run_coroutine(coro):
    """``asyncio.run`` that also works when the caller already runs an event loop (Jupyter)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def generate_batch_dp(
    model_path: str,
    prompts: Sequence,
    sampling_params: SamplingParams | dict | Sequence | None = None,
    *,
    num_replicas: int = 2,
    router: ReplicaRouter | None = None,
    **router_kwargs,
) -> list[GenerationOutput]:
    """`hf_paged.generate_batch` fanned out over ``num_replicas`` Ray actors; outputs in input order.

    Creates a `ReplicaRouter` (and kills its replicas at the end) unless ``router`` is given.
    ``router_kwargs`` go to `ReplicaRouter` (``engine_kwargs``, ``model_kwargs``, ``num_gpus``...).
    """
    own = router is None
    if own:
        router = ReplicaRouter(model_path, num_replicas, **router_kwargs)
    try:
        return _run_coroutine(router.generate_many(prompts, sampling_params))
    finally:
        if own:
            router.shutdown()
