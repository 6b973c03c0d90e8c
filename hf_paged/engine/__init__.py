"""Continuous batching over a paged KV pool: `Engine`, `generate_batch` and `SamplingParams`.

Data flow of one `Engine.step`: the `Scheduler` picks tokens under a token budget (decodes, then
prompt chunks) and the `BlockManager` gives them KV blocks (prefix cache, copy-on-write,
preemption when blocks run out); the `ModelRunner` packs them into one forward; the `Sampler`
draws one token per finished row; the engine checks stop conditions and reports updates.
"""

from .engine import Engine, default_num_blocks
from .generate import generate_batch
from .outputs import EngineStats, GenerationOutput, RequestUpdate, SampleOutput
from .sampling_params import SamplingParams

__all__ = [
    "Engine",
    "EngineStats",
    "GenerationOutput",
    "RequestUpdate",
    "SampleOutput",
    "SamplingParams",
    "default_num_blocks",
    "generate_batch",
]
