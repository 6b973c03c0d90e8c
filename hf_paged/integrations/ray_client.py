"""`DataParallelClient`: Ray engine replicas behind one `EngineClient` (``hf-paged serve --data-parallel-size N``).

The server talks to every engine through an `EngineClient` (``submit`` / ``abort`` / sinks /
shutdown); this one forwards each request to a `ReplicaRouter` (least reserved work, prefix
affinity, replay on a replica's death) and runs the router's streams on an asyncio loop of its
own thread, where the callbacks are called.

Example::

    client = DataParallelClient("path/to/model", 2, engine_kwargs=dict(max_num_seqs=256))
    out = client.generate(["Hello"], SamplingParams(max_new_tokens=16))[0]
    client.shutdown()
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

from ..engine import GenerationOutput, RequestUpdate, SamplingParams
from ..engine.client import SHUTTING_DOWN, Callback, EngineClient, EngineDeadError, WaitingRequests, error_update
from ..engine.input_processor import Prompt
from .ray import ReplicaRouter

__all__ = ["DataParallelClient", "ReplicaPoolState"]

logger = logging.getLogger(__name__)


@dataclass
class ReplicaPoolState:
    """The replicas' KV pools added up, as the server's metrics read them (`EngineStateLike`)."""

    num_blocks: int
    num_blocks_used: int
    num_blocks_free: int
    prefix_hit_rate: float = 0.0
    preemptions: int = 0


class DataParallelClient(EngineClient):
    """An `EngineClient` over ``num_replicas`` engines in Ray actors (one GPU each where Ray has them).

    Args:
        model_path: the model every replica loads.
        num_replicas: engines.
        max_waiting: requests without a first token at most (``QueueFullError`` beyond).
        **router_kwargs: `ReplicaRouter` arguments (``engine_kwargs``, ``model_kwargs``, ``tokenizer``...).

    After construction (which returns once every replica is built) ``vocab_size``,
    ``capacity_tokens`` (the smallest replica's pool: a request runs on one replica),
    ``max_model_len`` and ``block_size`` describe the engines; ``state`` their pools, as last reported.
    """

    def __init__(self, model_path: str, num_replicas: int, *, max_waiting: int | None = None,
                 **router_kwargs) -> None:
        self._sinks: list = []
        self.error: str | None = None
        self._accepting = True
        self._lock = threading.Lock()
        self._tasks: dict[str, Future] = {}
        self._waiting = WaitingRequests(max_waiting)
        self._ids = itertools.count()
        self.router = ReplicaRouter(model_path, num_replicas, **router_kwargs)
        infos = self.router.infos
        self.vocab_size = infos[0]["vocab_size"]
        self.capacity_tokens = min(i["capacity_tokens"] for i in infos)
        self.max_model_len = infos[0]["max_model_len"]
        self.block_size = infos[0]["block_size"]
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="hf-paged-dp-router", daemon=True)
        self._thread.start()

    # -- any thread -------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """Whether new requests are taken (a replica lives and no shutdown began)."""
        return self._accepting and bool(self.router.table.alive())

    @property
    def state(self) -> ReplicaPoolState:
        total, free = self.router.table.pool_totals()  # every update reads it: no per-replica dicts
        return ReplicaPoolState(total, total - free, free)

    def submit(self, prompt: Prompt, params: SamplingParams | dict | None, callback: Callback, *,
               request_id: str | None = None, stream_text: bool | None = None) -> str:
        """Queue a request on the router; ``callback`` gets its updates on the router's thread."""
        with self._lock:
            if not self.alive:
                raise EngineDeadError(self.error or SHUTTING_DOWN)
            self._waiting.check_room()
            request_id = request_id or f"dp-client-{next(self._ids)}"
            if request_id in self._tasks:
                duplicate = True
            else:
                duplicate = False
                self._waiting.add(request_id)
                self._tasks[request_id] = asyncio.run_coroutine_threadsafe(
                    self._serve(request_id, prompt, params, callback, stream_text), self._loop)
        if duplicate:
            callback(error_update(request_id, f"request_id {request_id!r} is already in use"))
        return request_id

    def abort(self, request_id: str) -> None:
        """Abort a request (no-op when it already finished); it ends with ``finish_reason="abort"``."""
        with self._lock:
            self._waiting.discard(request_id)
            task = self._tasks.get(request_id)
        if task is not None:
            task.cancel()

    def request_shutdown(self, drain_timeout: float = 0.0) -> None:
        """Refuse new requests; those in flight run up to ``drain_timeout`` s, then are aborted."""
        with self._lock:
            if not self._accepting:
                return
            self._accepting = False
        self._loop.call_soon_threadsafe(self._loop.call_later, max(0.0, drain_timeout), self._abort_all)

    def shutdown(self, drain_timeout: float = 0.0, join_timeout: float = 30.0) -> None:
        """`request_shutdown`, wait (bounded) for what is in flight, then stop the replicas. Idempotent."""
        self.request_shutdown(drain_timeout)
        if not self._thread.is_alive():
            return
        deadline = time.monotonic() + max(0.0, drain_timeout) + join_timeout
        with self._lock:
            tasks = list(self._tasks.values())
        for task in tasks:
            try:
                task.result(timeout=max(0.0, deadline - time.monotonic()))
            except BaseException:  # cancelled, failed or late: its callback has the reason
                pass
        self.router.shutdown(join_timeout)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(join_timeout)

    # -- the router's thread ------------------------------------------------------------------------

    def _abort_all(self) -> None:
        with self._lock:  # submit() adds tasks from other threads
            tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()

    async def _serve(self, request_id: str, prompt: Prompt, params, callback: Callback,
                     stream_text: bool | None) -> None:
        try:
            async for update in self.router.stream(prompt, params, request_id, stream_text=stream_text):
                if update.new_token_ids or update.finished:
                    self._waiting.discard(request_id)
                self._deliver(callback, update)
        except asyncio.CancelledError:
            self._deliver(callback, RequestUpdate(request_id, 0, [], finish_reason="abort",
                                                  output=GenerationOutput(request_id, None, [])))
        except Exception as e:  # a bad request or every replica gone: this request's error, not the client's
            logger.warning("data-parallel request %s failed: %s", request_id, e)
            self._deliver(callback, error_update(request_id, f"{type(e).__name__}: {e}"))
        finally:
            self._waiting.discard(request_id)
            with self._lock:
                self._tasks.pop(request_id, None)
            if not self.router.table.alive():
                self.error = "every engine replica died"

    def _deliver(self, callback: Callback, update: RequestUpdate) -> None:
        try:
            callback(update)
        except Exception:  # a consumer's failure must not end the request's stream for the others
            logger.exception("update callback failed")
        if self._sinks:
            state = self.state
            for sink in self._sinks:
                sink(state, [update])
