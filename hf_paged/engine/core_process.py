"""The engine side of `EngineProcessClient`: an `Engine` driven in a process of its own.

HTTP handling, SSE formatting and the engine loop in one interpreter share one GIL; running the
engine loop in its own process (as vLLM's engine core does) gives it a GIL of its own. The front
end sends commands over a pyzmq PUSH socket; this process pulls them, steps the engine while it
has work and pushes each step's updates back as one `StepBatch` (see `hf_paged.engine.wire`).

The engine is built here by ``engine_factory``, a picklable callable (a model is never pickled):
`engine_factory` below makes one from a model path, `load_model` arguments and `Engine` arguments.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from ..cache.geometry import max_model_len
from .client import SHUTTING_DOWN, error_update
from .gc_pauses import quiet_gc
from .outputs import RequestUpdate

__all__ = ["CoreAddresses", "engine_factory", "load_engine", "run_engine_core"]

logger = logging.getLogger(__name__)

STATE_INTERVAL_S = 0.1  # engine state for the metrics at most this often while busy (and once when idle)
_PARENT_CHECK_S = 1.0  # an idle core looks this often whether its parent still lives
_LINGER_MS = 5000  # what is sent before exiting still reaches the front end


@dataclass(frozen=True)
class CoreAddresses:
    """One front end's ZMQ endpoints: ``commands`` (front end → core), ``outputs`` (core → front end);
    the front end binds both, the core connects."""

    commands: str
    outputs: str


def load_engine(model: str, load_kwargs: dict | None = None, engine_kwargs: dict | None = None):
    """An `Engine` over ``load_model(model, **load_kwargs)`` (tokenizer included) with ``engine_kwargs``."""
    from ..loader import load_model
    from .engine import Engine

    lm, tokenizer = load_model(model, **(load_kwargs or {}))
    return Engine(lm, tokenizer=tokenizer, **(engine_kwargs or {}))


def engine_factory(model: str, load_kwargs: dict | None = None, engine_kwargs: dict | None = None) -> Callable:
    """A picklable factory for `run_engine_core`: ``load_engine(model, load_kwargs, engine_kwargs)``.

    Example:
        >>> factory = engine_factory("path/to/model", {"dtype": "float32", "device": "cpu"}, {"num_blocks": 64})
    """
    return functools.partial(load_engine, model, dict(load_kwargs or {}), dict(engine_kwargs or {}))


def run_engine_core(engine_factory: Callable, front_ends: Sequence[CoreAddresses], log_level: int | None = None) -> None:
    """Process entry point: build the engine, then serve commands until shutdown, failure or orphaning.

    ``front_ends`` are the channels of the front ends this core serves (one for an
    `EngineProcessClient` that spawned it; N under ``hf-paged serve --api-server-count N``), in the
    order of their ``front_end`` index. Each gets `Ready` once the engine is built (`Dead` if the
    factory raises), a `StepBatch` per step with updates of its requests, `Dead` if an exception
    escapes `Engine.step` (failing forwards are already error outputs), and `Stopped` after its
    `Shutdown` drained or aborted its requests; the process ends once every front end has stopped.
    """
    import msgspec
    import zmq

    from . import wire

    if log_level is not None:
        logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s [core]: %(message)s")
    # Ctrl-C (or a service manager's SIGTERM) reaches every process of the group: the front ends
    # decide when this process stops (`Shutdown`), after draining.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent = os.getppid()
    ctx = zmq.Context(1)
    commands = ctx.socket(zmq.PULL)
    outputs = [ctx.socket(zmq.PUSH) for _ in front_ends]
    for sock in (commands, *outputs):  # never block on a full queue (set before connecting to apply)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
    for sock, addresses in zip(outputs, front_ends):
        sock.setsockopt(zmq.LINGER, _LINGER_MS)
        commands.connect(addresses.commands)  # one PULL socket fair-queues every front end's commands
        sock.connect(addresses.outputs)
    encoder = msgspec.msgpack.Encoder()
    decoder = msgspec.msgpack.Decoder(wire.Command)

    stopped: set[int] = set()  # front ends that left (`Shutdown` answered with `Stopped`)

    def send(message, front_end: int | None = None) -> None:
        """Push ``message`` to one front end (``None``: to every one that has not left)."""
        data = encoder.encode(message)
        to = [outputs[front_end]] if front_end is not None else [s for i, s in enumerate(outputs) if i not in stopped]
        for sock in to:
            while True:
                try:
                    sock.send(data, zmq.NOBLOCK, copy=False)
                    break
                except zmq.Again:  # the front end is not connected (yet, or any more)
                    if os.getppid() != parent:
                        raise _Orphaned from None
                    sock.poll(100, zmq.POLLOUT)

    engine = None
    try:
        try:
            engine = engine_factory()
        except BaseException as e:
            logger.exception("building the engine failed")
            send(wire.Dead(f"building the engine failed: {type(e).__name__}: {e}"))  # the traceback is logged here
            return
        param = next(engine.model.parameters())
        send(wire.Ready(
            pid=os.getpid(), vocab_size=engine.vocab_size, capacity_tokens=engine.block_manager.capacity_tokens,
            num_blocks=engine.kv_pool.num_blocks, block_size=engine.block_size, kv_pool_bytes=engine.kv_pool.nbytes,
            model_max_len=max_model_len(engine.model), model_class=type(engine.model).__name__,
            dtype=str(param.dtype), device=str(param.device), state=wire.engine_state(engine),
        ))
        try:
            with quiet_gc():
                _serve(engine, commands, decoder, send, len(front_ends), stopped, parent)
        except _Orphaned:
            raise
        except BaseException as e:
            logger.exception("the engine core failed")
            send(wire.Dead(f"the engine stopped after an internal error: {type(e).__name__}: {e}"))
    except _Orphaned:
        logger.warning("the front end process is gone: stopping the engine core")
    finally:
        if engine is not None:
            try:
                engine.close()
            except Exception:  # pragma: no cover
                logger.exception("closing the engine failed")
        commands.close(linger=0)
        for sock in outputs:
            sock.close()  # lingers until what was sent is delivered (at most _LINGER_MS)
        ctx.term()


class _Orphaned(Exception):
    """The front end process is gone: nobody reads what this process would say."""


def _serve(engine, commands, decoder, send, num_front_ends: int, stopped: set[int], parent: int) -> None:
    import zmq

    from . import wire

    poller = zmq.Poller()
    poller.register(commands, zmq.POLLIN)
    state_sent = time.monotonic()
    state_dirty = False
    owner: dict[str, int] = {}  # request added and not yet reported finished -> its front end
    deadlines: dict[int, float] = {}  # front end shutting down -> when its requests are aborted

    def deliver(updates: list[RequestUpdate], force_state: bool = False) -> None:
        nonlocal state_sent, state_dirty
        now = time.monotonic()
        state = None
        if force_state or now - state_sent >= STATE_INTERVAL_S:
            state, state_sent, state_dirty = wire.engine_state(engine), now, False
        else:
            state_dirty = True
        by_front_end: dict[int, list] = {}
        if num_front_ends == 1:  # the common case, without a lookup per update
            for update in updates:
                if update.output is not None:
                    owner.pop(update.request_id, None)
            if updates:
                by_front_end[0] = [wire.to_wire(u) for u in updates]
        else:
            for update in updates:
                rid = update.request_id
                front_end = owner.pop(rid, 0) if update.output is not None else owner.get(rid, 0)
                by_front_end.setdefault(front_end, []).append(wire.to_wire(update))
        for front_end in range(num_front_ends) if state is not None else by_front_end:
            if front_end not in stopped:
                send(wire.StepBatch(by_front_end.get(front_end, []), state), front_end)

    while True:
        if not (engine.has_unfinished() or deadlines):
            if state_dirty:
                deliver([], force_state=True)
            if not poller.poll(_PARENT_CHECK_S * 1000):
                if os.getppid() != parent:
                    raise _Orphaned
                continue
        refused: dict[int, list] = {}  # front end -> errors of its commands, sent at once (no owner to track)
        while True:
            try:
                raw = commands.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            command = decoder.decode(raw.buffer)
            if isinstance(command, wire.AddRequest):
                rid, front_end = command.request_id, command.front_end
                if front_end in deadlines or front_end in stopped:
                    refused.setdefault(front_end, []).append(wire.to_wire(error_update(rid, SHUTTING_DOWN)))
                    continue
                try:
                    engine.add_request(command.prompt, command.params, rid,
                                       stream_text=command.stream_text, detokenize=command.detokenize)
                    owner[rid] = front_end
                except ValueError as e:  # a request id already in flight
                    refused.setdefault(front_end, []).append(wire.to_wire(error_update(rid, str(e))))
            elif isinstance(command, wire.AbortRequest):
                engine.abort(command.request_id)
            elif command.front_end not in stopped:  # Shutdown
                new = time.monotonic() + max(0.0, command.drain_timeout)
                deadlines[command.front_end] = min(deadlines.get(command.front_end, new), new)
        for front_end, errors in refused.items():
            send(wire.StepBatch(errors), front_end)
        if deadlines:
            now = time.monotonic()
            for front_end, deadline in list(deadlines.items()):
                theirs = [rid for rid, fe in owner.items() if fe == front_end]
                if not theirs:
                    del deadlines[front_end]
                    deliver([], force_state=True)
                    send(wire.Stopped(), front_end)
                    stopped.add(front_end)
                    logger.info("front end %d left (%d of %d)", front_end, len(stopped), num_front_ends)
                elif now >= deadline:
                    for rid in theirs:  # reported by the next step, without a forward
                        engine.abort(rid)
                    deadlines[front_end] = math.inf
            if len(stopped) == num_front_ends:
                return
        if engine.has_unfinished():
            deliver(engine.step())


def params_to_wire(params) -> dict | None:
    """`SamplingParams` (or its dict, or ``None``) as a plain dict for `AddRequest`."""
    if params is None or isinstance(params, dict):
        return params
    return asdict(params)
