"""Messages between `EngineProcessClient` (front end) and `run_engine_core` (engine process).

Two one-way pyzmq channels carry msgpack (msgspec) messages, every one a tagged array-like
`msgspec.Struct`:

* front end → core (`Command`): `AddRequest`, `AbortRequest`, `Shutdown`.
* core → front end (`CoreMessage`): `Ready` once the engine is built (its static facts), then one
  `StepBatch` per engine step with every update of the step for that front end's requests (plus an
  `EngineState` now and then, for the metrics), `Dead` when the engine failed (or could not be
  built), `Stopped` after its shutdown.

A core may serve several front ends (``hf-paged serve --api-server-count N``): each has its own
pair of channels, and commands name the front end they come from (``front_end``, its index).

Updates travel as `WireUpdate` (array-like: no field names per token); a finished request's
`GenerationOutput` travels as itself (msgspec encodes and rebuilds the dataclass).
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from .outputs import GenerationOutput, RequestUpdate

__all__ = [
    "AbortRequest", "AddRequest", "Command", "CoreMessage", "Dead", "EngineState", "Ready", "Shutdown",
    "StepBatch", "Stopped", "WireUpdate", "engine_state", "from_wire", "to_wire",
]


class AddRequest(msgspec.Struct, tag="add", array_like=True):
    request_id: str
    prompt: str | list[int]
    params: dict | None  # SamplingParams fields
    stream_text: bool | None
    detokenize: bool = True  # False: the client decodes the token ids (`ClientDetokenizer`)
    front_end: int = 0  # which front end's output channel gets the request's updates


class AbortRequest(msgspec.Struct, tag="abort", array_like=True):
    request_id: str


class Shutdown(msgspec.Struct, tag="shutdown", array_like=True):
    """One front end leaves: its requests may run ``drain_timeout`` s more, then are aborted; it gets
    `Stopped` once all of them were reported. The core exits when every front end has left."""

    drain_timeout: float
    front_end: int = 0


Command = AddRequest | AbortRequest | Shutdown


@dataclass
class EngineState:
    """What the server's metrics read of a running engine (`MetricsSink.publish` takes it or an `Engine`)."""

    num_blocks: int
    num_blocks_used: int
    num_blocks_free: int
    prefix_hit_rate: float
    preemptions: int
    num_unfinished: int = 0


def engine_state(engine) -> EngineState:
    """The `EngineState` of an `Engine` now."""
    blocks = engine.kv_pool.blocks
    stats = engine.stats()
    return EngineState(blocks.num_blocks, blocks.num_used, blocks.num_free, stats.prefix_hit_rate,
                       stats.preemptions, engine.num_unfinished)


class Ready(msgspec.Struct, tag="ready", array_like=True):
    """The engine is built: its static facts (and its state)."""

    pid: int
    vocab_size: int
    capacity_tokens: int  # KV slots of the whole pool
    num_blocks: int
    block_size: int
    kv_pool_bytes: int
    model_max_len: int | None  # the model's max_position_embeddings
    model_class: str
    dtype: str
    device: str
    state: EngineState


class WireUpdate(msgspec.Struct, array_like=True):
    request_id: str
    sample_index: int
    new_token_ids: list[int]
    text_delta: str | None
    finish_reason: str | None
    output: GenerationOutput | None


class StepBatch(msgspec.Struct, tag="batch", array_like=True):
    """The updates of one engine step; ``state`` rides along every so often (and when the engine idles)."""

    updates: list[WireUpdate]
    state: EngineState | None = None


class Dead(msgspec.Struct, tag="dead", array_like=True):
    """The engine failed (or its factory raised): the process ends."""

    error: str


class Stopped(msgspec.Struct, tag="stopped", array_like=True):
    """A shutdown finished: everything in flight was reported; the process ends."""


CoreMessage = Ready | StepBatch | Dead | Stopped


def to_wire(update: RequestUpdate) -> WireUpdate:
    return WireUpdate(update.request_id, update.sample_index, update.new_token_ids, update.text_delta,
                      update.finish_reason, update.output)


def from_wire(update: WireUpdate) -> RequestUpdate:
    return RequestUpdate(update.request_id, update.sample_index, update.new_token_ids, update.text_delta,
                         update.finish_reason, update.output)
