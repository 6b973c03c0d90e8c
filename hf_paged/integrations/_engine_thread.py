"""`EngineThread`: one background thread owns an `Engine`; callers from any thread or event loop stream from it.

The engine is not thread-safe and batches best when every concurrent request is in it at once, so
integrations whose callers arrive independently (Inspect's concurrent samples, ``llm`` calls) hand
their requests to this thread: it adds whatever arrived, runs one engine step, routes each update
to its request's callback, and sleeps when nothing is left to do.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator

from ..engine import Engine, RequestUpdate, SamplingParams

__all__ = ["EngineThread"]

logger = logging.getLogger(__name__)

Callback = Callable[[RequestUpdate], None]


class EngineThread:
    """Drives ``engine`` from a daemon thread; `stream` / `astream` add a request and yield its updates."""

    def __init__(self, engine: Engine, name: str = "hf-paged-engine") -> None:
        self.engine = engine
        self._cond = threading.Condition()
        self._incoming: list[tuple[str, object, SamplingParams, Callback]] = []
        self._aborts: list[str] = []
        self._callbacks: dict[str, Callback] = {}
        self._ids = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, prompt, params: SamplingParams, callback: Callback) -> str:
        """Queue a request (token ids or text); ``callback`` gets its updates on the engine thread."""
        with self._cond:
            self._ids += 1
            request_id = f"{self._thread.name}-{self._ids}"
            self._incoming.append((request_id, prompt, params, callback))
            self._cond.notify()
        return request_id

    def abort(self, request_id: str) -> None:
        with self._cond:
            self._aborts.append(request_id)
            self._cond.notify()

    def stream(self, prompt, params: SamplingParams) -> Iterator[RequestUpdate]:
        """Updates of one request, ending with the finished one; closing the iterator aborts it."""
        updates: queue.Queue[RequestUpdate] = queue.Queue()
        request_id = self.submit(prompt, params, updates.put)
        done = False
        try:
            while not done:
                update = updates.get()
                done = update.finished
                yield update
        finally:
            if not done:
                self.abort(request_id)

    async def astream(self, prompt, params: SamplingParams) -> AsyncIterator[RequestUpdate]:
        """`stream` for asyncio: awaits updates without blocking the event loop."""
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[RequestUpdate] = asyncio.Queue()
        request_id = self.submit(prompt, params, lambda u: loop.call_soon_threadsafe(updates.put_nowait, u))
        done = False
        try:
            while not done:
                update = await updates.get()
                done = update.finished
                yield update
        finally:
            if not done:
                self.abort(request_id)

    async def agenerate(self, prompt, params: SamplingParams):
        """The finished `GenerationOutput` of one request, awaited."""
        async for update in self.astream(prompt, params):
            if update.finished:
                return update.output
        raise RuntimeError("engine stream ended without an output")  # pragma: no cover

    # -- the thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while not self._incoming and not self._aborts and not engine.has_unfinished():
                    self._cond.wait()
                incoming, self._incoming = self._incoming, []
                aborts, self._aborts = self._aborts, []
            for request_id, prompt, params, callback in incoming:
                self._callbacks[request_id] = callback
                engine.add_request(prompt, params, request_id=request_id)
            for request_id in aborts:
                engine.abort(request_id)
            try:
                updates = engine.step()
            except Exception:  # the engine reports request errors itself; this is a bug
                logger.exception("engine step raised")
                continue
            for update in updates:
                callback = self._callbacks.get(update.request_id)
                if update.finished:
                    self._callbacks.pop(update.request_id, None)
                if callback is not None:
                    try:
                        callback(update)
                    except Exception:
                        logger.exception("callback of %s failed", update.request_id)
