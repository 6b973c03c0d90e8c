"""`EngineClient`: what every client of an engine offers on top of `submit` and `abort`.

`AsyncEngine` (the engine in a thread of this process) and `EngineProcessClient` (the engine in a
process of its own) implement `submit` / `abort`; streaming, awaiting and batch generation are
written once, here, on top of them.
"""

from __future__ import annotations

import asyncio
import queue
from contextlib import aclosing
from collections.abc import AsyncIterator, Callable, Iterator, Sequence as SequenceABC

from .input_processor import Prompt, per_prompt
from .outputs import GenerationOutput, RequestUpdate
from .sampling_params import SamplingParams

__all__ = ["SHUTTING_DOWN", "Callback", "EngineClient", "EngineDeadError", "QueueFullError", "WaitingRequests",
           "error_update"]

# The error of a request that arrived after shutdown began.
SHUTTING_DOWN = "the engine is shutting down"

Callback = Callable[[RequestUpdate], None]


class EngineDeadError(RuntimeError):
    """The engine does not take requests: it was shut down, or it failed (the message says why)."""


class QueueFullError(RuntimeError):
    """More requests wait for their first token than ``max_waiting`` allows."""


class WaitingRequests:
    """The requests a client accepted that have no token yet, at most ``limit`` (``None``: unbounded).

    Each client keeps one and changes it under its own lock. A request stops waiting at its first token
    or its end, or when it is aborted: its slot frees then, not when the engine gets to the abort (a
    server that refuses one prompt of several aborts the others, and the next request must get in).
    """

    __slots__ = ("limit", "_ids")

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self._ids: set[str] = set()

    def __len__(self) -> int:
        return len(self._ids)

    def check_room(self) -> None:
        """Raise `QueueFullError` when ``limit`` requests already wait."""
        if self.limit is not None and len(self._ids) >= self.limit:
            raise QueueFullError(f"too many waiting requests ({len(self._ids)} waiting, at most {self.limit})")

    def add(self, request_id: str) -> None:
        self._ids.add(request_id)

    def discard(self, request_id: str) -> None:
        self._ids.discard(request_id)

    def ends(self, update: RequestUpdate) -> bool:
        """Whether ``update`` ends the waiting of a request still counted here."""
        return update.request_id in self._ids and bool(update.new_token_ids or update.finished)


def error_update(request_id: str, message: str) -> RequestUpdate:
    """The one update of a request that ends with ``message`` before (or instead of) any step."""
    return RequestUpdate(request_id, 0, [], finish_reason="error",
                         output=GenerationOutput(request_id, None, [], error=message))


class EngineClient:
    """Streaming and batch helpers over a client's ``submit`` and ``abort``; subclasses keep ``_sinks`` and
    ``_waiting``."""

    _sinks: list
    _waiting: WaitingRequests

    @property
    def num_waiting(self) -> int:
        """Requests submitted that have no token yet."""
        return len(self._waiting)

    @property
    def max_waiting(self) -> int | None:
        """Requests allowed to wait for their first token (`QueueFullError` beyond; ``None``: unbounded)."""
        return self._waiting.limit

    @max_waiting.setter
    def max_waiting(self, limit: int | None) -> None:
        self._waiting.limit = limit

    def submit(self, prompt: Prompt, params: SamplingParams | dict | None, callback: Callback, *,
               request_id: str | None = None, stream_text: bool | None = None) -> str:
        """Queue a request; ``callback`` gets its updates (on the client's thread). Returns its id."""
        raise NotImplementedError

    def abort(self, request_id: str) -> None:
        """Abort a request (no-op when it already finished); it ends with ``finish_reason="abort"``."""
        raise NotImplementedError

    def add_sink(self, sink: Callable[[object, list[RequestUpdate]], None]) -> None:
        """Call ``sink(state, updates)`` after every step, on the client's thread (the server's metrics).

        ``state`` is the `Engine` itself (`AsyncEngine`) or its latest `EngineState` (`EngineProcessClient`);
        `MetricsSink.publish` reads either.
        """
        self._sinks.append(sink)

    def shutdown(self, drain_timeout: float = 0.0, join_timeout: float = 30.0) -> None:
        """Stop taking requests, let those in flight run up to ``drain_timeout`` s, free the engine."""
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def stream(self, prompt: Prompt, params: SamplingParams | dict | None = None, *,
               stream_text: bool | None = None) -> Iterator[RequestUpdate]:
        """Updates of one request, ending with the finished one; closing the iterator aborts it."""
        updates: queue.SimpleQueue[RequestUpdate] = queue.SimpleQueue()
        request_id = self.submit(prompt, params, updates.put, stream_text=stream_text)
        done = False
        try:
            while not done:
                update = updates.get()
                done = update.finished
                yield update
        finally:
            if not done:
                self.abort(request_id)

    async def astream_batches(self, prompt: Prompt, params: SamplingParams | dict | None = None, *,
                              request_id: str | None = None, stream_text: bool | None = None
                              ) -> AsyncIterator[list[RequestUpdate]]:
        """`astream` in batches: each item holds every update that arrived since the previous one, so
        a consumer that lags (a slow client, a remote hop per item) takes what queued up at once."""
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[RequestUpdate] = asyncio.Queue()
        request_id = self.submit(prompt, params, lambda u: loop.call_soon_threadsafe(updates.put_nowait, u),
                                 request_id=request_id, stream_text=stream_text)
        done = False
        try:
            while not done:
                batch = [await updates.get()]
                while not updates.empty():
                    batch.append(updates.get_nowait())
                done = batch[-1].finished  # the finished update is a request's last
                yield batch
        finally:
            if not done:
                self.abort(request_id)

    async def astream(self, prompt: Prompt, params: SamplingParams | dict | None = None, *,
                      request_id: str | None = None, stream_text: bool | None = None) -> AsyncIterator[RequestUpdate]:
        """`stream` for asyncio: awaits updates without blocking the event loop."""
        batches = self.astream_batches(prompt, params, request_id=request_id, stream_text=stream_text)
        async with aclosing(batches):  # leaving early aborts the request at once, not at garbage collection
            async for batch in batches:
                for update in batch:
                    yield update

    async def agenerate(self, prompt: Prompt, params: SamplingParams | dict | None = None) -> GenerationOutput:
        """The finished `GenerationOutput` of one request, awaited."""
        async for update in self.astream(prompt, params):
            if update.finished:
                return update.output
        raise EngineDeadError("the request ended without an output")  # pragma: no cover

    def generate(self, prompts: SequenceABC[Prompt],
                 sampling_params: SamplingParams | dict | SequenceABC[SamplingParams | dict] | None = None
                 ) -> list[GenerationOutput]:
        """Run ``prompts`` (batched with whatever else is in flight); outputs in input order."""
        outputs: queue.SimpleQueue[GenerationOutput] = queue.SimpleQueue()

        def collect(update: RequestUpdate) -> None:
            if update.finished:
                outputs.put(update.output)

        ids = [self.submit(p, sp, collect) for p, sp in zip(prompts, per_prompt(sampling_params, len(prompts)))]
        results = {}
        while len(results) < len(ids):
            out = outputs.get()
            results[out.request_id] = out
        return [results[i] for i in ids]
