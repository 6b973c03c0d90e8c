"""Block-allocated KV storage: `BlockPool`, `KVPool`, `PagedCache` and the per-step metadata."""

from .block_pool import BlockPool, OutOfBlocksError
from .kv_pool import KVPool
from .metadata import PagedAttentionMetadata
from .paged_cache import PagedCache, PagedCacheStats, num_blocks_for_memory

__all__ = [
    "BlockPool",
    "KVPool",
    "OutOfBlocksError",
    "PagedAttentionMetadata",
    "PagedCache",
    "PagedCacheStats",
    "num_blocks_for_memory",
]
