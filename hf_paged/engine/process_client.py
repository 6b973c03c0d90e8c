"""`EngineProcessClient`: `AsyncEngine`'s interface over an engine running in a process of its own.

The engine loop gets a GIL of its own (project issue 14: HTTP handling, SSE formatting and the
engine loop in one interpreter stream several times fewer tokens/s than the engine offline). The
client spawns `run_engine_core` (``multiprocessing`` "spawn"), which builds the engine from a
picklable factory, and talks to it over two pyzmq IPC channels with msgspec messages
(`hf_paged.engine.wire`):

* `submit` / `abort` / `request_shutdown` encode a command and push it (any thread; one lock).
* a receiver thread pulls one `StepBatch` per engine step, rebuilds the `RequestUpdate`s and calls
  each request's callback, then the sinks with ``(EngineState, updates)``.
* the same thread watches the process (its sentinel is polled next to the socket): if it dies,
  every request in flight ends with ``finish_reason="error"`` ("the engine process died (exit
  code N)"), `alive` turns False, `error` says why and `submit` raises `EngineDeadError`.

Callbacks and sinks run on the receiver thread, as `AsyncEngine`'s run on its engine thread.

One engine process may serve several front-end processes (``hf-paged serve --api-server-count N``:
HTTP and text work spread over N interpreters): a supervisor starts an `EngineCoreProcess` for N
front ends and each front end process connects with `EngineProcessClient.attach`.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import multiprocessing
import os
import select
import shutil
import tempfile
import threading
import time
from collections.abc import Callable

from .client import SHUTTING_DOWN, EngineClient, EngineDeadError, WaitingRequests, error_update
from .core_process import CoreAddresses, params_to_wire, run_engine_core
from .detokenizer import ClientDetokenizer
from .input_processor import Prompt
from .outputs import RequestUpdate
from .sampling_params import SamplingParams

__all__ = ["EngineCoreProcess", "EngineProcessClient", "EngineStartError"]

logger = logging.getLogger(__name__)

Callback = Callable[[RequestUpdate], None]


class EngineStartError(RuntimeError):
    """The engine process exited (or did not answer in time) before its engine was built."""


class EngineProcessClient(EngineClient):
    """Runs ``engine_factory()`` in a spawned process; submit and stream as with `AsyncEngine`.

    Args:
        engine_factory: a picklable callable returning an `Engine` (e.g.
            `hf_paged.engine.core_process.engine_factory`); called in the new process.
        max_waiting: requests allowed to wait for their first token (`QueueFullError` beyond;
            ``None``: unbounded); the ``max_waiting`` attribute may be changed later.
        name: prefix of generated request ids and of the process and thread names.
        tokenizer: the model's tokenizer, to decode text here rather than in the engine process
            (front-end detokenization: the engine's interpreter does no text work) for requests
            submitted as token ids with an explicit ``stream_text`` and no stop strings.
        ready_timeout: seconds the engine may take to build (model load included).
        log_level: logging level configured in the engine process (``None``: the root logger's here).
        daemon: ``False`` for an engine that starts processes of its own (tensor-parallel ranks), which a
            daemonic process may not; the engine process is then killed at this interpreter's exit if
            `shutdown` did not stop it (its ranks stop when it is gone).

    After construction (which returns once the engine is built) ``vocab_size``,
    ``capacity_tokens``, ``max_model_len`` (the model's ``max_position_embeddings``),
    ``num_blocks``, ``block_size``, ``info`` (the whole `Ready` message) and ``state`` (the latest
    `EngineState`) describe the engine.

    Example:
        >>> from hf_paged.engine.core_process import engine_factory
        >>> with EngineProcessClient(engine_factory("path/to/model")) as client:  # doctest: +SKIP
        ...     out = client.generate(["Hello"], SamplingParams(max_new_tokens=8))
    """

    def __init__(self, engine_factory: Callable, *, max_waiting: int | None = None,
                 name: str = "hf-paged-engine", ready_timeout: float = 900.0, log_level: int | None = None,
                 tokenizer=None, daemon: bool = True) -> None:
        core = EngineCoreProcess(engine_factory, 1, name=name, log_level=log_level, daemon=daemon)
        try:
            self._connect(core.front_ends[0], 0, core.process, owned=core, max_waiting=max_waiting, name=name,
                          ready_timeout=ready_timeout, tokenizer=tokenizer)
        except BaseException:
            core.close()
            raise

    @classmethod
    def attach(cls, addresses: CoreAddresses, pid: int, front_end: int, *, max_waiting: int | None = None,
               ready_timeout: float = 900.0, tokenizer=None) -> EngineProcessClient:
        """A client for front end ``front_end`` of an `EngineCoreProcess` another process started (its
        ``front_ends[front_end]`` and ``pid``); returns once the engine is built. `shutdown` leaves
        the engine (its requests drain, then the core forgets this front end); the engine process
        stops once every front end has left. Its death is seen through a pidfd (Linux).

        Example:
            >>> client = EngineProcessClient.attach(core.front_ends[1], core.pid, 1)  # doctest: +SKIP
        """
        self = cls.__new__(cls)
        watch = _ProcessWatch(pid)
        try:
            self._connect(addresses, front_end, watch, owned=None, max_waiting=max_waiting,
                          name=f"hf-paged-fe{front_end}", ready_timeout=ready_timeout, tokenizer=tokenizer)
        except BaseException:
            watch.close()
            raise
        return self

    def _connect(self, addresses: CoreAddresses, front_end: int, process, *, owned: EngineCoreProcess | None,
                 max_waiting: int | None, name: str, ready_timeout: float, tokenizer) -> None:
        """Bind this front end's channels and wait for the engine's `Ready` (``process``: the core's
        `multiprocessing.Process`, or a `_ProcessWatch` of it)."""
        import msgspec
        import zmq

        from . import wire

        self._wire = wire
        self._zmq = zmq
        self._tokenizer = tokenizer
        self._name = name
        self._front_end = front_end
        self._process = process
        self._owned = owned
        self._ids = itertools.count()
        self._lock = threading.Lock()  # guards the command socket, _callbacks, _waiting, _accepting
        self._callbacks: dict[str, Callback] = {}
        self._waiting = WaitingRequests(max_waiting)
        self._accepting = True
        self._sinks: list[Callable] = []
        self._closing = threading.Event()
        self.error: str | None = None
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(wire.CoreMessage)
        self._ctx = zmq.Context(1)
        self._commands = self._ctx.socket(zmq.PUSH)
        self._outputs = self._ctx.socket(zmq.PULL)
        for sock in (self._commands, self._outputs):  # never block on a full queue (set before binding)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
        try:
            self._commands.bind(addresses.commands)
            self._outputs.bind(addresses.outputs)
            ready = self._wait_ready(ready_timeout)
        except BaseException:
            self._close_sockets()
            raise
        self.info = ready
        self.pid = ready.pid
        self.vocab_size = ready.vocab_size
        self.capacity_tokens = ready.capacity_tokens
        self.max_model_len = ready.model_max_len
        self.num_blocks = ready.num_blocks
        self.block_size = ready.block_size
        self.state = ready.state
        self._thread = threading.Thread(target=self._receive, name=f"{name}-receiver", daemon=True)
        self._thread.start()

    # -- any thread -------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """Whether new requests are taken (the process runs and no shutdown began)."""
        return self._accepting and self._process.is_alive()

    def submit(self, prompt: Prompt, params: SamplingParams | dict | None, callback: Callback, *,
               request_id: str | None = None, stream_text: bool | None = None) -> str:
        """Queue a request; ``callback`` gets its updates on the receiver thread. Returns its id.

        Raises `EngineDeadError` when the engine is not running and `QueueFullError` when
        ``max_waiting`` requests already wait. A bad prompt or parameter is not raised: its one
        update has ``finish_reason="error"``.
        """
        if hasattr(prompt, "tolist") and not isinstance(prompt, (str, list)):
            prompt = prompt.tolist()  # a tensor of ids
        elif isinstance(prompt, tuple):
            prompt = list(prompt)
        try:
            wire_params = params_to_wire(params)
        except TypeError as e:  # pragma: no cover  (not a dataclass: the engine would reject it)
            wire_params, bad = None, e
        else:
            bad = None
        with self._lock:
            if not self.alive:
                raise EngineDeadError(self.error or SHUTTING_DOWN)
            self._waiting.check_room()
            request_id = request_id or f"{self._name}-{next(self._ids)}"
            duplicate = request_id in self._callbacks
            if not duplicate:
                decode = self._client_detokenizer(prompt, wire_params, stream_text)
                self._callbacks[request_id] = callback if decode is None else _decoded(callback, decode)
                self._waiting.add(request_id)
                if bad is None:
                    self._send(self._wire.AddRequest(request_id, prompt, wire_params, stream_text,
                                                     detokenize=decode is None, front_end=self._front_end))
        if duplicate:
            _call(callback, error_update(request_id, f"request_id {request_id!r} is already in use"))
        elif bad is not None:  # pragma: no cover
            self._deliver([error_update(request_id, f"invalid sampling parameters: {bad}")])
        return request_id

    def _client_detokenizer(self, prompt, wire_params: dict | None, stream_text: bool | None):
        """A `ClientDetokenizer` when this client decodes the request's text (see ``tokenizer``), else None."""
        if self._tokenizer is None or stream_text is None or not isinstance(prompt, list):
            return None
        if wire_params is not None and wire_params.get("stop"):
            return None  # the engine must see the text to stop at a stop string
        return ClientDetokenizer(self._tokenizer, prompt, stream_text)

    def abort(self, request_id: str) -> None:
        """Abort a request (no-op when it already finished); it ends with ``finish_reason="abort"``."""
        with self._lock:
            self._waiting.discard(request_id)
            if self._process.is_alive() and not self._closing.is_set() and request_id in self._callbacks:
                try:
                    self._send(self._wire.AbortRequest(request_id))
                except EngineDeadError:  # its request ends with the death's error
                    pass

    def request_shutdown(self, drain_timeout: float = 0.0) -> None:
        """Begin shutting down without waiting: refuse new requests, let those in flight run up to
        ``drain_timeout`` seconds, then abort the rest (they end with ``finish_reason="abort"``)."""
        with self._lock:
            self._accepting = False
            if self._process.is_alive() and not self._closing.is_set():
                try:
                    self._send(self._wire.Shutdown(float(max(0.0, drain_timeout)), self._front_end))
                except EngineDeadError:
                    pass

    def shutdown(self, drain_timeout: float = 0.0, join_timeout: float = 30.0) -> None:
        """`request_shutdown`, wait (bounded) for the process to report and exit, kill it if it does
        not, and end whatever is still in flight with an error. Idempotent."""
        if self._closing.is_set():
            return
        self.request_shutdown(drain_timeout)
        deadline = time.monotonic() + max(0.0, drain_timeout) + join_timeout
        if self._owned is not None:
            self._process.join(max(0.0, deadline - time.monotonic()))
            if self._process.is_alive():
                logger.warning("engine process %s did not stop within %.1f s: killing it", self.pid, join_timeout)
                self._owned.kill()
        self._thread.join(max(1.0, deadline - time.monotonic()))  # an attached front end: until `Stopped`
        self._closing.set()
        self._thread.join(5.0)
        self._fail_all(SHUTTING_DOWN if self.error is None else self.error)
        self._close_sockets()
        (self._owned or self._process).close()

    # -- internals ----------------------------------------------------------------------------------

    def _send(self, message) -> None:
        """Push a command (``_lock`` held). Never blocks for long: a dead process raises `EngineDeadError`."""
        data = self._encoder.encode(message)
        zmq = self._zmq
        while True:
            try:
                self._commands.send(data, zmq.NOBLOCK, copy=False)
                return
            except zmq.Again:  # no peer connected or its queue is full
                if not self._process.is_alive():
                    raise EngineDeadError(self.error or self._death_message()) from None
                self._commands.poll(100, zmq.POLLOUT)

    def _wait_ready(self, timeout: float):
        zmq = self._zmq
        poller = zmq.Poller()
        poller.register(self._outputs, zmq.POLLIN)
        poller.register(self._process.sentinel, zmq.POLLIN)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise EngineStartError(f"the engine process did not get ready within {timeout:.0f} s")
            events = dict(poller.poll(min(left, 1.0) * 1000))
            if self._outputs in events:
                message = self._decoder.decode(self._outputs.recv(copy=False).buffer)
                if isinstance(message, self._wire.Ready):
                    return message
                if isinstance(message, self._wire.Dead):
                    self._process.join(5.0)
                    raise EngineStartError(f"the engine process failed to start: {message.error}")
                continue  # pragma: no cover
            if self._process.sentinel in events or not self._process.is_alive():
                if self._outputs.poll(200):
                    continue  # a last message (Dead) came with the exit
                self._process.join(1.0)
                raise EngineStartError(
                    f"the engine process exited (exit code {self._process.exitcode}) before the engine was built"
                )

    def _death_message(self) -> str:
        code = self._process.exitcode  # None: not this process's child
        return "the engine process died" + ("" if code is None else f" (exit code {code})")

    def _receive(self) -> None:
        """The receiver thread: deliver step batches; on Dead, Stopped or the process' death, end requests."""
        zmq = self._zmq
        wire = self._wire
        poller = zmq.Poller()
        poller.register(self._outputs, zmq.POLLIN)
        poller.register(self._process.sentinel, zmq.POLLIN)
        try:
            while not self._closing.is_set():
                events = dict(poller.poll(500))
                if self._outputs in events:
                    while True:
                        try:
                            raw = self._outputs.recv(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        message = self._decoder.decode(raw.buffer)
                        if isinstance(message, wire.StepBatch):
                            if message.state is not None:
                                self.state = message.state
                            self._deliver([wire.from_wire(u) for u in message.updates])
                        elif isinstance(message, wire.Dead):
                            logger.error("engine process failed: %s", message.error)
                            self._die(message.error)
                            return
                        elif isinstance(message, wire.Stopped):
                            self._die(SHUTTING_DOWN)
                            return
                    continue
                if self._process.sentinel in events or not self._process.is_alive():
                    if self._outputs.poll(200):  # what it sent just before exiting
                        continue
                    self._process.join(1.0)
                    message = self._death_message()
                    logger.error("%s", message)
                    self._die(message)
                    return
        except Exception:  # pragma: no cover  (a decoding bug): never leave requests hanging
            logger.exception("engine receiver thread failed")
            self._die("the engine client failed (see the log)")

    def _deliver(self, updates: list[RequestUpdate]) -> None:
        for update in updates:
            rid = update.request_id
            with self._lock:
                if self._waiting.ends(update):
                    self._waiting.discard(rid)
                callback = self._callbacks.pop(rid, None) if update.finished else self._callbacks.get(rid)
            if callback is not None:
                _call(callback, update)
        for sink in self._sinks:
            try:
                sink(self.state, updates)
            except Exception:
                logger.exception("engine sink failed")

    def _die(self, message: str) -> None:
        """No new requests; every request still known ends with ``message`` as its error."""
        with self._lock:
            self._accepting = False
            if message != SHUTTING_DOWN and self.error is None:
                self.error = message
        self._fail_all(message)

    def _fail_all(self, message: str) -> None:
        with self._lock:
            pending = list(self._callbacks)
        if pending:
            self._deliver([error_update(rid, message) for rid in pending])

    def _close_sockets(self) -> None:
        self._commands.close(linger=0)
        self._outputs.close(linger=0)
        self._ctx.term()


class EngineCoreProcess:
    """`run_engine_core` in a spawned process, for ``num_front_ends`` front ends.

    ``front_ends[i]`` are front end i's channels (an `EngineProcessClient` binds them: the one that
    started the core, or `EngineProcessClient.attach` in another process); ``process`` is the
    `multiprocessing.Process`. ``daemon=False`` for an engine that starts processes of its own
    (tensor-parallel ranks), which a daemonic process may not: the process is then killed at this
    interpreter's exit unless `close` ran.

    Example:
        >>> core = EngineCoreProcess(engine_factory("path/to/model"), 2)  # doctest: +SKIP
    """

    def __init__(self, engine_factory: Callable, num_front_ends: int = 1, *, name: str = "hf-paged-engine",
                 log_level: int | None = None, daemon: bool = True) -> None:
        self._dir = tempfile.mkdtemp(prefix="hf-paged-core-")
        self.front_ends = tuple(
            CoreAddresses(commands=f"ipc://{self._dir}/commands-{i}", outputs=f"ipc://{self._dir}/outputs-{i}")
            for i in range(num_front_ends)
        )
        if log_level is None:
            log_level = logging.getLogger().getEffectiveLevel()
        self.process = multiprocessing.get_context("spawn").Process(
            target=run_engine_core, args=(engine_factory, self.front_ends, log_level), name=f"{name}-core",
            daemon=daemon,
        )
        self.process.start()
        self.pid = self.process.pid
        if not daemon:  # multiprocessing would join it at exit, and it lives while this process does
            atexit.register(self.kill)

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5.0)

    def close(self) -> None:
        """Kill the process if it still runs; remove the channels' directory."""
        self.kill()
        atexit.unregister(self.kill)
        shutil.rmtree(self._dir, ignore_errors=True)


class _ProcessWatch:
    """The parts of `multiprocessing.Process` a client uses, for a process it did not start (a pidfd)."""

    exitcode = None  # only the parent learns it

    def __init__(self, pid: int) -> None:
        try:
            self.sentinel = os.pidfd_open(pid)
        except ProcessLookupError:
            raise EngineStartError(f"the engine process {pid} is gone") from None

    def is_alive(self) -> bool:
        return self.sentinel >= 0 and not select.select([self.sentinel], [], [], 0)[0]

    def join(self, timeout: float | None = None) -> None:
        if self.sentinel >= 0:
            select.select([self.sentinel], [], [], timeout)

    def close(self) -> None:
        """Release the pidfd; the process counts as gone from then on."""
        if self.sentinel >= 0:
            os.close(self.sentinel)
            self.sentinel = -1


def _decoded(callback: Callback, decode: ClientDetokenizer) -> Callback:
    return lambda update: callback(decode(update))


def _call(callback: Callback, update: RequestUpdate) -> None:
    try:
        callback(update)
    except Exception:  # a consumer gone (closed event loop) must not stop the receiver
        logger.debug("dropped an update of %s: its consumer failed", update.request_id, exc_info=True)
