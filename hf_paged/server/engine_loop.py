"""`EngineLoop`: the one thread that owns the `Engine`, fed by a command queue, feeding per-request sinks.

The engine is not thread-safe, so HTTP handlers never touch it: they `submit` and `abort` through a
thread-safe queue that only the loop thread executes, and receive `SampleDelta` / `RequestDone`
events through a sink callable (the server's sink hands them to the request's asyncio queue with
``loop.call_soon_threadsafe``). The thread steps the engine while any request is unfinished and
sleeps on the queue otherwise.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..engine import Engine, GenerationOutput, SamplingParams
from .detokenize import TextStream
from .metrics import ServerMetrics

__all__ = ["SHUTTING_DOWN", "EngineLoop", "QueueFullError", "RequestDone", "SampleDelta", "Submission"]

logger = logging.getLogger(__name__)

# The error of a request that arrived after shutdown began.
SHUTTING_DOWN = "the server is shutting down"

# How long an idle loop sleeps on the command queue before checking its state again.
_IDLE_POLL_S = 0.5


@dataclass
class SampleDelta:
    """New streamable text of sample ``index`` (only for requests submitted with ``stream=True``)."""

    index: int
    text: str


@dataclass
class RequestDone:
    """The request finished. ``tails``: per sample, the text still unsent of a streamed request."""

    output: GenerationOutput
    tails: dict[int, str] = field(default_factory=dict)


Event = SampleDelta | RequestDone
Sink = Callable[[Event], None]


@dataclass
class Submission:
    """One engine request: tokenized prompt, parameters and where its events go.

    ``holdback``: characters of streamed text kept back for stop strings (see `TextStream`).
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    sink: Sink
    stream: bool = False
    holdback: int = 0
    arrival: float = field(default_factory=time.monotonic)


class QueueFullError(RuntimeError):
    """More requests are waiting than ``max_waiting`` allows."""


@dataclass
class _Tracked:
    sub: Submission
    waiting: bool = True
    first_token_time: float | None = None
    last_token_time: float | None = None
    streams: dict[int, TextStream] = field(default_factory=dict)
    finished_samples: set[int] = field(default_factory=set)


class EngineLoop:
    """Runs ``engine`` in a background thread and serves requests from other threads.

    Args:
        engine: the engine, used by the loop thread only from `start` on.
        tokenizer: decodes streamed text.
        metrics: updated after every step (optional).
        max_waiting: requests allowed to wait for their first token; `submit` raises
            `QueueFullError` beyond it. ``None``: unbounded.
    """

    def __init__(
        self,
        engine: Engine,
        tokenizer,
        *,
        metrics: ServerMetrics | None = None,
        max_waiting: int | None = None,
    ) -> None:
        self._engine = engine
        self._tokenizer = tokenizer
        self._metrics = metrics
        self._max_waiting = max_waiting
        self._commands: queue.Queue[tuple] = queue.Queue()
        self._lock = threading.Lock()
        self._num_waiting = 0  # submitted, no first token yet (guarded by _lock)
        self._tracked: dict[str, _Tracked] = {}  # loop thread only
        self._num_running = 0  # loop thread only
        self._thread: threading.Thread | None = None
        self._stop_deadline: float | None = None
        self._stopping = False
        self._failed: BaseException | None = None
        self._last_preemptions = 0

    # -- any thread -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the loop thread (once)."""
        if self._thread is not None:
            raise RuntimeError("EngineLoop already started")
        self._publish()
        self._thread = threading.Thread(target=self._run, name="hf-paged-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """Whether the loop thread runs and accepts requests."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def num_waiting(self) -> int:
        with self._lock:
            return self._num_waiting

    def submit(self, submissions: list[Submission]) -> None:
        """Queue requests for the engine (all or none: raises `QueueFullError` if they do not fit)."""
        if not self.alive:
            raise RuntimeError("the engine loop is not running")
        with self._lock:
            if self._max_waiting is not None and self._num_waiting + len(submissions) > self._max_waiting:
                raise QueueFullError(
                    f"too many waiting requests ({self._num_waiting} waiting, at most {self._max_waiting})"
                )
            self._num_waiting += len(submissions)
        for sub in submissions:
            self._commands.put(("add", sub))
        if self._metrics is not None:
            self._metrics.requests_waiting.set(self.num_waiting)

    def abort(self, request_id: str) -> None:
        """Abort a request (no-op when it already finished); its blocks return to the pool."""
        self._commands.put(("abort", request_id))

    def request_stop(self, drain_timeout: float = 0.0) -> None:
        """Begin shutting down without waiting: refuse new requests, let in-flight ones run up to
        ``drain_timeout`` seconds, then abort the rest (their consumers get finish reason ``abort``)."""
        self._stopping = True  # `alive` turns False at once, so handlers answer 503 from now on
        self._commands.put(("stop", drain_timeout))

    def stop(self, drain_timeout: float = 0.0, join_timeout: float = 30.0) -> None:
        """`request_stop`, then wait for the loop thread to finish."""
        if self._thread is None:
            return
        self.request_stop(drain_timeout)
        self._thread.join(join_timeout)
        if self._thread.is_alive():
            logger.warning("engine loop did not stop within %.1f s", join_timeout)

    # -- loop thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        engine = self._engine
        try:
            while True:
                self._drain_commands(block=not engine.has_unfinished())
                if self._stop_deadline is not None and (
                    not engine.has_unfinished() or time.monotonic() >= self._stop_deadline
                ):
                    self._abort_all()
                    return
                if engine.has_unfinished():
                    self._step()
        except BaseException as e:  # keep the server answering: fail what is in flight
            logger.exception("engine loop crashed")
            self._failed = e
            self._stopping = True
            self._fail_all(f"engine loop crashed: {type(e).__name__}: {e}")
        finally:
            self._stopping = True
            try:
                self._publish()
            except Exception:  # an engine broken enough to crash the loop may not report either
                logger.debug("could not publish final metrics", exc_info=True)

    def _drain_commands(self, block: bool) -> None:
        try:
            cmd = self._commands.get(timeout=_IDLE_POLL_S) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._execute(cmd)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return

    def _execute(self, cmd: tuple) -> None:
        kind = cmd[0]
        if kind == "add":
            self._add(cmd[1])
        elif kind == "abort":
            if cmd[1] in self._tracked:
                self._engine.abort(cmd[1])
        elif kind == "stop":
            # Several stop requests: the earliest deadline wins.
            deadline = time.monotonic() + max(0.0, cmd[1])
            self._stop_deadline = deadline if self._stop_deadline is None else min(deadline, self._stop_deadline)

    def _add(self, sub: Submission) -> None:
        # Commands run in order: a request submitted before the stop command is in flight and
        # gets the drain time; only one that slipped in after it is refused.
        if self._stop_deadline is not None:
            self._reject(sub, SHUTTING_DOWN)
            return
        try:
            self._engine.add_request(sub.prompt_token_ids, sub.params, request_id=sub.request_id)
        except ValueError as e:
            self._reject(sub, str(e))
            return
        self._tracked[sub.request_id] = _Tracked(sub)
        if self._metrics is not None:
            self._metrics.prompt_tokens.inc(len(sub.prompt_token_ids))

    def _reject(self, sub: Submission, message: str) -> None:
        self._leave_waiting_count()
        output = GenerationOutput(sub.request_id, None, sub.prompt_token_ids, error=message)
        if self._metrics is not None:
            self._metrics.request_finished("error")
        _deliver(sub.sink, RequestDone(output))

    def _step(self) -> None:
        try:
            updates = self._engine.step()
        except Exception as e:
            # Engine.step handles model failures itself; anything reaching here leaves the engine's
            # state unknown, so fail every request rather than serve from it.
            logger.exception("engine step raised")
            raise RuntimeError(f"engine step raised {type(e).__name__}: {e}") from e
        now = time.monotonic()
        stepped: set[str] = set()
        for update in updates:
            tracked = self._tracked.get(update.request_id)
            if tracked is None:
                continue
            if update.new_token_ids:
                self._on_tokens(tracked, update.request_id in stepped, now, len(update.new_token_ids))
                stepped.add(update.request_id)
                if tracked.sub.stream and update.finish_reason is None:
                    # Text of a finishing sample comes from the final output instead: it is cut
                    # before a stop string, which this delta may contain.
                    stream = self._stream(tracked, update.sample_index)
                    text = stream.add(update.new_token_ids)
                    if text:
                        _deliver(tracked.sub.sink, SampleDelta(update.sample_index, text))
            if update.output is not None:
                self._finish(tracked, update.output, now)
        self._publish()

    def _on_tokens(self, tracked: _Tracked, seen_this_step: bool, now: float, count: int) -> None:
        if self._metrics is not None:
            self._metrics.generation_tokens.inc(count)
        if tracked.first_token_time is None:
            tracked.first_token_time = now
            if self._metrics is not None:
                self._metrics.ttft.observe(now - tracked.sub.arrival)
            self._leave_waiting(tracked)
            self._num_running += 1
        elif not seen_this_step and self._metrics is not None:
            # One observation per request and step, however many samples advanced.
            self._metrics.itl.observe(now - tracked.last_token_time)
        tracked.last_token_time = now

    def _stream(self, tracked: _Tracked, index: int) -> TextStream:
        stream = tracked.streams.get(index)
        if stream is None:
            stream = tracked.streams[index] = TextStream(self._tokenizer, tracked.sub.holdback)
        return stream

    def _finish(self, tracked: _Tracked, output: GenerationOutput, now: float) -> None:
        del self._tracked[output.request_id]
        if tracked.waiting:
            self._leave_waiting(tracked)
        else:
            self._num_running -= 1
        tails: dict[int, str] = {}
        if tracked.sub.stream:
            for sample in output.samples:
                tails[sample.index] = self._stream(tracked, sample.index).finish(sample.text or "")
        if self._metrics is not None:
            self._metrics.e2e.observe(now - tracked.sub.arrival)
            self._metrics.request_finished(output.finish_reason)
        _deliver(tracked.sub.sink, RequestDone(output, tails))

    def _leave_waiting(self, tracked: _Tracked) -> None:
        if tracked.waiting:
            tracked.waiting = False
            self._leave_waiting_count()

    def _leave_waiting_count(self) -> None:
        with self._lock:
            self._num_waiting -= 1

    def _abort_all(self) -> None:
        """Abort every tracked request and deliver the outcome (finish reason ``abort``)."""
        for request_id in list(self._tracked):
            self._engine.abort(request_id)
        # Aborts are reported by the next step without a forward; a few rounds are plenty.
        for _ in range(8):
            if not self._engine.has_unfinished():
                break
            self._step()
        if self._tracked:
            self._fail_all("the request was aborted at shutdown")

    def _fail_all(self, message: str) -> None:
        for request_id, tracked in list(self._tracked.items()):
            output = GenerationOutput(request_id, None, tracked.sub.prompt_token_ids, error=message)
            self._finish(tracked, output, time.monotonic())
        # Requests still queued as commands were never added: answer them too.
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            if cmd[0] == "add":
                self._reject(cmd[1], message)

    def _publish(self) -> None:
        """Copy the engine's state into the metrics (called from the loop thread, or before it starts)."""
        m = self._metrics
        if m is None:
            return
        blocks = self._engine.kv_pool.blocks
        m.requests_running.set(self._num_running)
        m.requests_waiting.set(self.num_waiting)
        m.kv_blocks_total.set(blocks.num_blocks)
        m.kv_blocks_used.set(blocks.num_used)
        m.kv_blocks_free.set(blocks.num_free)
        m.kv_usage.set(blocks.num_used / blocks.num_blocks)
        stats = self._engine.stats()
        m.prefix_hit_rate.set(stats.prefix_hit_rate)
        if stats.preemptions > self._last_preemptions:
            m.preemptions.inc(stats.preemptions - self._last_preemptions)
        self._last_preemptions = stats.preemptions


def _deliver(sink: Sink, event: Event) -> None:
    try:
        sink(event)
    except Exception:  # a consumer gone (closed event loop) must not stop the engine
        logger.debug("dropped an event for a request whose consumer is gone", exc_info=True)
