"""`AsyncEngine`: the one client of an `Engine` for every front end (server, integrations, Ray).

The engine is not thread-safe and batches best when every concurrent request is in it at once, so
one background thread owns it: callers from any thread or event loop `submit` and `abort` through a
command list that only that thread executes, and get each request's `RequestUpdate`s through a
callback (`stream` / `astream` / `generate` wrap that). Sinks (the server's metrics) see every
step's updates on the engine thread.

Error policy: a failing forward fails the requests of that step (the engine reports them with
``finish_reason="error"``) and the engine keeps serving the others. An exception escaping
`Engine.step` leaves the engine's state unknown: every request in flight then ends with an error
naming it, the engine stops, `error` says why, and new requests raise `EngineDeadError`.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable

from .client import (SHUTTING_DOWN, Callback, EngineClient, EngineDeadError, QueueFullError, WaitingRequests,
                     error_update)
from .engine import Engine
from .gc_pauses import quiet_gc
from .input_processor import Prompt
from .outputs import RequestUpdate
from .sampling_params import SamplingParams

__all__ = ["SHUTTING_DOWN", "AsyncEngine", "EngineDeadError", "QueueFullError"]

logger = logging.getLogger(__name__)

Sink = Callable[[Engine, list[RequestUpdate]], None]


class AsyncEngine(EngineClient):
    """Drives ``engine`` from a thread of its own; any thread or event loop submits and streams.

    Args:
        engine: the engine, used only by this client's thread from now on; `shutdown` closes it.
        max_waiting: requests allowed to wait for their first token; `submit` raises
            `QueueFullError` beyond it (``None``: unbounded).
        name: the thread's name, also the prefix of generated request ids.

    Example:
        >>> with AsyncEngine(Engine(model, tokenizer=tok)) as client:  # doctest: +SKIP
        ...     for update in client.stream("Hello", SamplingParams(max_new_tokens=8), stream_text=True):
        ...         print(update.text_delta, end="")
        ...     out = client.generate(["a", "b"], SamplingParams(max_new_tokens=8))
    """

    def __init__(self, engine: Engine, *, max_waiting: int | None = None, name: str = "hf-paged-engine") -> None:
        self.engine = engine
        self._name = name
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._commands: list[tuple] = []  # guarded by _cond
        self._accepting = True  # guarded by _cond
        self._stop_deadline: float | None = None  # guarded by _cond
        self._callbacks: dict[str, Callback] = {}  # engine thread only
        self._waiting = WaitingRequests(max_waiting)  # changed under _cond
        self._sinks: list[Sink] = []
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- any thread -------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """Whether new requests are taken (the thread runs and no shutdown began)."""
        return self._accepting and self._thread.is_alive()

    def submit(self, prompt: Prompt, params: SamplingParams | dict | None, callback: Callback, *,
               request_id: str | None = None, stream_text: bool | None = None) -> str:
        """Queue a request; ``callback`` gets its updates on the engine thread. Returns its id.

        Raises `EngineDeadError` when the engine is not running and `QueueFullError` when
        ``max_waiting`` requests already wait. A bad prompt or parameter is not raised: its one
        update has ``finish_reason="error"``.
        """
        with self._cond:
            if not self._accepting:
                raise EngineDeadError(self.error or SHUTTING_DOWN)
            self._waiting.check_room()
            request_id = request_id or f"{self._name}-{next(self._ids)}"
            self._waiting.add(request_id)
            self._commands.append(("add", request_id, prompt, params, stream_text, callback))
            self._cond.notify()
        return request_id

    def abort(self, request_id: str) -> None:
        """Abort a request (no-op when it already finished); it ends with ``finish_reason="abort"``."""
        with self._cond:
            self._waiting.discard(request_id)
            self._commands.append(("abort", request_id))
            self._cond.notify()

    def request_shutdown(self, drain_timeout: float = 0.0) -> None:
        """Begin shutting down without waiting: refuse new requests, let those in flight run up to
        ``drain_timeout`` seconds, then abort the rest (they end with ``finish_reason="abort"``)."""
        with self._cond:
            self._accepting = False
            deadline = time.monotonic() + max(0.0, drain_timeout)
            self._stop_deadline = deadline if self._stop_deadline is None else min(deadline, self._stop_deadline)
            self._cond.notify()

    def shutdown(self, drain_timeout: float = 0.0, join_timeout: float = 30.0) -> None:
        """`request_shutdown`, wait for the thread to end, and close the engine (frees its KV pool)."""
        self.request_shutdown(drain_timeout)
        self._thread.join(join_timeout)
        if self._thread.is_alive():
            logger.warning("engine thread %s did not stop within %.1f s", self._name, join_timeout)
        else:
            self.engine.close()

    # -- engine thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        try:
            with quiet_gc():
                while True:
                    with self._cond:
                        while not self._commands and not engine.has_unfinished() and self._stop_deadline is None:
                            self._cond.wait()
                        commands, self._commands = self._commands, []
                        deadline = self._stop_deadline
                    for command in commands:
                        self._execute(command)
                    if deadline is not None and (not engine.has_unfinished() or time.monotonic() >= deadline):
                        self._abort_all()
                        return
                    if engine.has_unfinished():
                        self._deliver(engine.step())
        except BaseException as e:  # noqa: BLE001  the engine's state is unknown: stop and say why
            logger.exception("engine thread %s failed", self._name)
            self._stop(f"the engine stopped after an internal error: {type(e).__name__}: {e}")

    def _execute(self, command: tuple) -> None:
        if command[0] == "abort":
            self.engine.abort(command[1])
            return
        _, request_id, prompt, params, stream_text, callback = command
        self._callbacks[request_id] = callback
        try:
            self.engine.add_request(prompt, params, request_id, stream_text=stream_text)
        except ValueError as e:  # a request id already in flight
            self._deliver([error_update(request_id, str(e))])

    def _deliver(self, updates: list[RequestUpdate]) -> None:
        for update in updates:
            if self._waiting.ends(update):
                with self._cond:
                    self._waiting.discard(update.request_id)
            callback = self._callbacks.pop(update.request_id) if update.finished else \
                self._callbacks.get(update.request_id)
            if callback is not None:
                try:
                    callback(update)
                except Exception:  # a consumer gone (closed event loop) must not stop the engine
                    logger.debug("dropped an update of %s: its consumer failed", update.request_id, exc_info=True)
        for sink in self._sinks:
            try:
                sink(self.engine, updates)
            except Exception:
                logger.exception("engine sink failed")

    def _abort_all(self) -> None:
        """Abort what is in flight and deliver the outcome; requests queued after the stop are refused."""
        for request_id in list(self._callbacks):
            self.engine.abort(request_id)
        while self.engine.has_unfinished():  # aborts are reported by the next step, without a forward
            self._deliver(self.engine.step())
        self._stop(SHUTTING_DOWN)

    def _stop(self, message: str) -> None:
        """Refuse new requests and end every request still known with ``message`` as its error."""
        with self._cond:
            self._accepting = False
            if message != SHUTTING_DOWN:
                self.error = message
            commands, self._commands = self._commands, []
        for command in commands:
            if command[0] == "add":
                self._callbacks[command[1]] = command[5]
        self._deliver([error_update(request_id, message) for request_id in list(self._callbacks)])
