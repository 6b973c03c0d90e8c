"""Prometheus metrics of the server.

By default each `ServerMetrics` keeps a registry of its own (several servers may share a process).

Multiprocess mode (several front-end processes over one engine, each with one `ServerMetrics`):
on when ``PROMETHEUS_MULTIPROC_DIR`` names an existing, initially empty directory at the moment
prometheus_client is first imported in the process; in practice, set it in the environment before
the process starts (or at least before it imports this module): setting it later leaves that
process single-process. Every front end then writes its values to files in that directory,
`ServerMetrics.render` reports the totals over all of them, and whoever spawned the front ends
calls `mark_front_end_dead` when one exits and removes the directory after the last one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Literal, Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    values,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from ..engine import Engine, RequestUpdate

__all__ = ["CONTENT_TYPE_LATEST", "EngineStateLike", "MetricsSink", "ServerMetrics", "mark_front_end_dead"]

# prometheus_client picks where values live (memory, or per-process files in PROMETHEUS_MULTIPROC_DIR)
# once, when first imported: follow that choice, so that render() reads where values are written.
_MULTIPROCESS: bool = values.ValueClass is not values.MutexValue
_PREFIX = "hf_paged_"
_PREEMPTIONS = _PREFIX + "num_preemptions"
_LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0,
)
_ITL_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0,
)


class _FrontEndTotals(MultiProcessCollector):
    """The metrics of every front end merged; preemptions (a gauge in the files) shown as the counter they are."""

    def collect(self) -> Iterator[Metric]:
        for metric in super().collect():
            if metric.name == _PREEMPTIONS:
                metric.type = "counter"
                metric.samples = [s._replace(name=s.name + "_total") for s in metric.samples]
            yield metric


def mark_front_end_dead(pid: int) -> None:
    """Forget the live gauges (requests running and waiting) of front end ``pid``, which has exited.

    Its counters and histograms stay in the totals. Reads ``PROMETHEUS_MULTIPROC_DIR`` when called
    (the caller may have imported this module before setting it); a no-op without it.
    """
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        mark_process_dead(pid)


class ServerMetrics:
    """Gauges, counters and histograms a `MetricsSink` updates and ``GET /metrics`` renders.

    In multiprocess mode (see the module) the gauges say how front ends combine: queue sizes add up
    over live front ends, the engine's KV and prefix-cache figures (every front end gets the same
    ones) are the most recently set.

    Args:
        model_name: value of the ``model_name`` label on every metric.
    """

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["model_name"]
        r = self.registry

        # How front ends combine in multiprocess mode. The engine's figures reach each front end at
        # its own times, so the latest is the truth ("mostrecent"; "max" would keep stale peaks),
        # and a dead front end's last one stays valid until a newer one comes (not "live").
        def gauge(name: str, doc: str, mode: Literal["livesum", "mostrecent", "max"] = "mostrecent") -> Gauge:
            return Gauge(_PREFIX + name, doc, labels, registry=r, multiprocess_mode=mode).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(_PREFIX + name, doc, labels, registry=r).labels(model_name)

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(_PREFIX + name, doc, labels, buckets=buckets, registry=r).labels(model_name)

        self.requests_running = gauge(
            "num_requests_running", "Requests that have produced tokens and not finished.", "livesum")
        self.requests_waiting = gauge(
            "num_requests_waiting", "Requests accepted and waiting for their first token.", "livesum")
        self.kv_blocks_total = gauge("kv_blocks_total", "KV blocks in the pool.")
        self.kv_blocks_used = gauge("kv_blocks_used", "KV blocks owned by sequences.")
        self.kv_blocks_free = gauge("kv_blocks_free", "KV blocks free (unowned prefix-cache blocks included).")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV blocks in use (0 to 1).")
        self.prefix_hit_rate = gauge("prefix_cache_hit_rate", "Share of prompt tokens served from the prefix cache.")
        preemptions_doc = "Sequences preempted for lack of KV blocks."
        # Each front end's count follows the one engine's cumulative count, so a sum over front ends
        # would count every preemption once per front end: in the files it is a gauge merged by
        # "max" (each copy only grows, a dead front end's stays), rendered as a counter.
        self.preemptions: Counter | Gauge = (
            gauge("num_preemptions", preemptions_doc, "max") if _MULTIPROCESS
            else counter("num_preemptions", preemptions_doc)
        )
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of accepted requests.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens.")
        self._finished = Counter(
            _PREFIX + "request_success", "Finished requests by finish reason.", ["model_name", "finished_reason"],
            registry=r,
        )
        self._model_name = model_name
        self.ttft = histogram("time_to_first_token_seconds", "Arrival to first token.", _LATENCY_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between tokens of one request.", _ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to finish.", _LATENCY_BUCKETS)

    def request_finished(self, reason: str) -> None:
        """Count a finished request under its finish reason (``stop``, ``length``, ``abort``, ``error``)."""
        self._finished.labels(self._model_name, reason).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric (in multiprocess mode: of every front end)."""
        if _MULTIPROCESS:
            registry = CollectorRegistry()
            _FrontEndTotals(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


class EngineStateLike(Protocol):
    """What `MetricsSink.publish` reads when the engine runs in another process (`hf_paged.engine.wire.EngineState`)."""

    num_blocks: int
    num_blocks_used: int
    num_blocks_free: int
    prefix_hit_rate: float
    preemptions: int


class MetricsSink:
    """Keeps `ServerMetrics` up to date from the engine's steps (an `AsyncEngine` or `EngineProcessClient` sink).

    Args:
        metrics: what to update.
        num_waiting: the client's count of requests without a first token.
    """

    def __init__(self, metrics: ServerMetrics, num_waiting: Callable[[], int]) -> None:
        self._metrics = metrics
        self._num_waiting = num_waiting
        self._last_token: dict[str, float] = {}  # running request -> time of its last token
        self._last_preemptions = 0

    def __call__(self, engine: Engine | EngineStateLike, updates: list[RequestUpdate]) -> None:
        m = self._metrics
        now = time.perf_counter()
        stepped: set[str] = set()
        for update in updates:
            rid = update.request_id
            if update.new_token_ids:
                m.generation_tokens.inc(len(update.new_token_ids))
                last = self._last_token.get(rid)
                if last is not None and rid not in stepped:  # one observation per request and step
                    m.itl.observe(now - last)
                stepped.add(rid)
                self._last_token[rid] = now
            if update.output is not None:
                out = update.output
                self._last_token.pop(rid, None)
                m.prompt_tokens.inc(len(out.prompt_token_ids))
                if out.time_to_first_token is not None:
                    m.ttft.observe(out.time_to_first_token)
                m.e2e.observe(out.total_time)
                m.request_finished(out.finish_reason)
        self.publish(engine)

    def publish(self, engine: Engine | EngineStateLike) -> None:
        """Copy the engine's state (KV blocks, prefix hits, preemptions, queue sizes) into the gauges.

        ``engine`` is an `Engine` (in-process `AsyncEngine` sink) or the state an engine process
        reports (`hf_paged.engine.wire.EngineState`, from an `EngineProcessClient` sink).
        """
        m = self._metrics
        if hasattr(engine, "kv_pool"):
            blocks = engine.kv_pool.blocks
            stats = engine.stats()
            total, used, free = blocks.num_blocks, blocks.num_used, blocks.num_free
            hit_rate, preemptions = stats.prefix_hit_rate, stats.preemptions
        else:
            total, used, free = engine.num_blocks, engine.num_blocks_used, engine.num_blocks_free
            hit_rate, preemptions = engine.prefix_hit_rate, engine.preemptions
        m.requests_running.set(len(self._last_token))
        m.requests_waiting.set(self._num_waiting())
        m.kv_blocks_total.set(total)
        m.kv_blocks_used.set(used)
        m.kv_blocks_free.set(free)
        m.kv_usage.set(used / total if total else 0.0)
        m.prefix_hit_rate.set(hit_rate)
        if preemptions > self._last_preemptions:
            m.preemptions.inc(preemptions - self._last_preemptions)
        self._last_preemptions = preemptions
