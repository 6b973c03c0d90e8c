"""Block-allocated KV storage: `BlockPool`, `KVPool`, `PagedCache`, the per-step metadata and pool sizing."""

from .block_pool import BlockPool, OutOfBlocksError
from .geometry import default_num_blocks, num_blocks_for_memory
from .kv_pool import KVPool
from .metadata import PagedAttentionMetadata
from .paged_cache import PagedCache, PagedCacheStats

__all__ = [
    "BlockPool",
    "KVPool",
    "OutOfBlocksError",
    "PagedAttentionMetadata",
    "PagedCache",
    "PagedCacheStats",
    "default_num_blocks",
    "num_blocks_for_memory",
]
