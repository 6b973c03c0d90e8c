"""Running the app: one uvicorn server (`run_app`), or N front-end processes over one engine process
(`run_api_servers`, ``hf-paged serve --api-server-count N``).

One front-end process saturates one core on HTTP, SSE formatting and detokenization well before
the engine does (an H100 streamed ~17k tokens/s through one, against ~43k offline on the same
chats). With N front ends the supervisor (the ``hf-paged serve`` process) starts an
`EngineCoreProcess` with a channel pair per front end and spawns N processes, each with an
`EngineProcessClient.attach`-ed client and the app; once all are built, each listens on the port
through a socket of its own (SO_REUSEPORT: the kernel spreads connections evenly). The supervisor
forwards SIGINT/SIGTERM (each front end drains its requests, ``--shutdown-timeout``, then leaves
the engine, which exits once all have left) and stops everything, exiting non-zero, when the
engine process or a front end dies. ``/metrics`` sums the front ends' counters through
Prometheus' multiprocess mode (`hf_paged.server.metrics`).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Callable

import uvicorn

from ..engine.gc_pauses import quiet_gc

__all__ = ["run_api_servers", "run_app"]

logger = logging.getLogger("hf_paged.server")

_WATCH_S = 0.5  # how often a server looks whether its engine failed (or its supervisor is gone)
_STOP_GRACE_S = 30.0  # beyond --shutdown-timeout, what a front end or the engine may take to stop


def run_app(app, args: argparse.Namespace, sockets=None, *, watch_parent: int | None = None,
            stop: threading.Event | None = None) -> int:
    """Serve ``app`` with uvicorn on ``args.host:args.port`` (or the bound ``sockets``) until a signal
    or the engine's failure; the exit status (1 when the engine failed).

    On SIGINT/SIGTERM the engine client is told to wind down first (``--shutdown-timeout``), so
    streams end with their requests rather than being cut when uvicorn's graceful timeout runs out.
    The server also stops when ``stop`` is set (a signal that came before uvicorn took over the
    handlers), when the process ``watch_parent`` is no longer this one's parent, or when the engine
    client reports an error (a dead engine process: its requests already ended with it).
    """
    client = app.state.engine_client
    server = _DrainingServer(
        uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                       timeout_graceful_shutdown=args.shutdown_timeout + 5),
        on_exit=lambda: client.request_shutdown(args.shutdown_timeout),
    )
    stop = stop or threading.Event()
    threading.Thread(target=_stop_when_told, args=(server, client, watch_parent, stop), daemon=True).start()
    try:
        with quiet_gc():  # the front end's per-event objects, as the engine loop's (hf_paged.engine.gc_pauses)
            server.run(sockets=sockets)
    finally:
        stop.set()
    return 0 if client.error is None else 1


class _DrainingServer(uvicorn.Server):
    """A uvicorn server that, on SIGINT/SIGTERM, also tells the engine client to wind down.

    Uvicorn waits for open connections before the lifespan shutdown runs; without this, a long
    stream would hold it until its graceful timeout and then be cancelled mid-response. Finishing
    or aborting the requests (``--shutdown-timeout``) ends their streams normally instead.
    """

    def __init__(self, config: uvicorn.Config, on_exit) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig, frame) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)

    def stop(self) -> None:
        """Stop as on SIGTERM, from any thread, without a signal for uvicorn to re-raise at exit."""
        if not self.should_exit:  # else uvicorn is stopping (or has stopped) already
            self._on_exit()
            self.should_exit = True


def _stop_when_told(server: _DrainingServer, client, parent: int | None, stop: threading.Event) -> None:
    while not stop.wait(_WATCH_S):
        if parent is not None and os.getppid() != parent:
            logger.warning("the supervisor process is gone: stopping this front end")
            break
        if client.error is not None:
            logger.error("stopping the server: %s", client.error)
            break
    server.stop()


def run_api_servers(args: argparse.Namespace, engine_factory: Callable, load_tokenizer: Callable, config, *,
                    daemon: bool, describe: Callable[..., None]) -> int:
    """Supervise ``args.api_server_count`` front ends over one engine process; the exit status.

    ``engine_factory`` builds the engine in its process (as for ``--engine-process``);
    ``load_tokenizer()`` gives each front end its tokenizer (a loader, not a tokenizer: what is pickled
    to a spawned process must stay small, or starting each one waits for the previous to import
    Transformers); ``config`` is a `ServerConfig`; ``describe(client, config)`` logs what is served
    (front end 0 calls it); ``daemon``: as `EngineCoreProcess`'s.
    """
    from ..engine.process_client import EngineCoreProcess
    from .metrics import mark_front_end_dead

    count = args.api_server_count
    metrics_dir = tempfile.mkdtemp(prefix="hf-paged-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # read by prometheus_client when a front end imports it
    stop = threading.Event()

    def on_signal(sig, frame) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    core = EngineCoreProcess(engine_factory, count, log_level=logging.getLogger().getEffectiveLevel(),
                             daemon=daemon)
    spawn = multiprocessing.get_context("spawn")
    ready = spawn.Barrier(count)  # every front end listens once all are built: none takes every early connection
    front_ends = [
        spawn.Process(target=_front_end_main, name=f"hf-paged-api-server-{i}", daemon=False,
                      args=(args, i, core.front_ends[i], core.pid, load_tokenizer, config, ready, os.getpid(),
                            describe if i == 0 else None))
        for i in range(count)
    ]
    for process in front_ends:
        process.start()
    logger.info("%d API server processes over engine process %d", count, core.pid)
    status = 0
    try:
        waiting = {core.process.sentinel: None, **{p.sentinel: p for p in front_ends}}
        while not stop.is_set():
            ended = multiprocessing.connection.wait(list(waiting), timeout=0.5)
            if not ended:
                continue
            process = waiting[ended[0]]
            if process is None:
                core.process.join(1.0)
                logger.error("the engine process died (exit code %s): stopping the server", core.process.exitcode)
            else:
                process.join(1.0)
                logger.error("%s exited (exit code %s): stopping the server", process.name, process.exitcode)
            status = process.exitcode if process is not None and process.exitcode not in (0, None) else 1
            break
        ready.abort()  # front ends still starting stop at the barrier (and leave the engine)
        for process in front_ends:  # each drains its streams, then leaves the engine
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)
        for process in front_ends:
            process.join(args.shutdown_timeout + _STOP_GRACE_S)
            logger.debug("%s exited (exit code %s)", process.name, process.exitcode)
            if process.is_alive():
                logger.warning("%s did not stop: killing it", process.name)
                process.kill()
                process.join(5.0)
            mark_front_end_dead(process.pid)
        core.process.join(_STOP_GRACE_S if status == 0 else 1.0)  # it exits once every front end has left
        if core.process.is_alive():
            if status == 0:
                logger.warning("the engine process did not stop: killing it")
            core.kill()
    finally:
        core.close()
        for process in front_ends:
            if process.is_alive():
                process.kill()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if status == 0:
        logger.info("engine stopped")
    return status


def _front_end_main(args: argparse.Namespace, index: int, addresses, core_pid: int, load_tokenizer: Callable,
                    config, ready, supervisor: int, describe: Callable[..., None] | None) -> None:
    """A front-end process: attach to the engine, build the app, wait for the others, serve on the port."""
    import sys

    from ..engine.process_client import EngineProcessClient, EngineStartError
    from .app import build_app

    logging.basicConfig(level=args.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s %(name)s [api {index}]: %(message)s")
    # The supervisor forwards signals. One that comes before uvicorn handles them (or after, when
    # uvicorn re-raises what it caught) only marks the front end as stopping.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda sig, frame: stop.set())
    try:
        client = EngineProcessClient.attach(addresses, core_pid, index, max_waiting=args.max_waiting,
                                            tokenizer=(tokenizer := load_tokenizer()))
    except EngineStartError as e:
        logger.error("%s", e)
        sys.exit(2)
    try:
        app = build_app(client, tokenizer, config)  # resolves config.max_model_len
    except ValueError as e:
        logger.error("%s", e)
        client.shutdown()
        sys.exit(2)
    try:
        ready.wait()
        sock = _reuse_port_socket(args.host, args.port)
    except threading.BrokenBarrierError:  # the server stops before it started
        client.shutdown()
        return
    except OSError as e:
        logger.error("cannot listen on %s:%d: %s", args.host, args.port, e)
        client.shutdown()
        sys.exit(2)
    if describe is not None:
        describe(client, config)
    sys.exit(run_app(app, args, sockets=[sock], watch_parent=supervisor, stop=stop))


def _reuse_port_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` with SO_REUSEPORT: each front end listens on its own, and the
    kernel spreads new connections evenly over them (one shared socket lets whichever front end wakes
    first accept a whole burst of connections, which then stay with it)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    return sock
