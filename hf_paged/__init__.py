"""hf_paged: paged KV cache, paged attention and continuous batching for Hugging Face Transformers.

``import hf_paged`` registers ``attn_implementation="paged"``::

    import hf_paged
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="paged")
    model.generate(**inputs)  # KV cache in blocks of a PagedCache
"""

from . import distributed, loader, plugins
from .cache import BlockPool, KVPool, OutOfBlocksError, PagedCache, PagedCacheStats
from .engine import AsyncEngine, Engine, EngineStats, GenerationOutput, RequestUpdate, SamplingParams, generate_batch
from .registration import ATTN_IMPLEMENTATION, register

__all__ = [
    "ATTN_IMPLEMENTATION",
    "AsyncEngine",
    "BlockPool",
    "Engine",
    "EngineStats",
    "GenerationOutput",
    "KVPool",
    "OutOfBlocksError",
    "PagedCache",
    "PagedCacheStats",
    "RequestUpdate",
    "SamplingParams",
    "distributed",
    "generate_batch",
    "loader",
    "plugins",
    "register",
]
__version__ = "0.1.0"

register()
