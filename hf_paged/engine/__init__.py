"""Continuous batching over a paged KV pool: `Engine`, `generate_batch` and `SamplingParams`.

Data flow of one request: `InputProcessor` (tokenize, validate) → `Scheduler.add_request`; then
each `Engine.step`: the `Scheduler` picks tokens under a token budget (decodes, then prompt chunks)
and the `BlockManager` gives them KV blocks (prefix cache, copy-on-write, preemption when blocks
run out); the `ModelRunner` packs them into one forward; the `Sampler` draws one token per
finished row (and scores prompt tokens); `Scheduler.update_from_output` advances the sequences
and finishes those that stop; the `OutputProcessor` detokenizes, applies stop strings and builds
the updates and outputs. `AsyncEngine` drives an engine from its own thread for every front end.
"""

from ..cache.geometry import default_num_blocks
from .async_engine import AsyncEngine, EngineDeadError, QueueFullError
from .engine import Engine
from .generate import generate_batch, release_engine
from .outputs import EngineStats, GenerationOutput, RequestUpdate, SampleOutput
from .sampling_params import SamplingParams

__all__ = [
    "AsyncEngine",
    "Engine",
    "EngineDeadError",
    "EngineStats",
    "GenerationOutput",
    "QueueFullError",
    "RequestUpdate",
    "SampleOutput",
    "SamplingParams",
    "default_num_blocks",
    "generate_batch",
    "release_engine",
]
