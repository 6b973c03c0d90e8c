"""hf_paged: paged KV cache, paged attention and continuous batching for Hugging Face Transformers.

``import hf_paged`` registers ``attn_implementation="paged"``::

    import hf_paged
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="paged")
    model.generate(**inputs)  # KV cache in blocks of a PagedCache
"""

from .cache import BlockPool, KVPool, OutOfBlocksError, PagedCache, PagedCacheStats
from .engine import Engine, EngineStats, GenerationOutput, RequestUpdate, SamplingParams, generate_batch
from .registration import ATTN_IMPLEMENTATION, register

__all__ = [
    "ATTN_IMPLEMENTATION",
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
    "generate_batch",
    "register",
]
__version__ = "0.1.0"

register()
