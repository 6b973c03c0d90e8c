"""The block pool together with the per-layer K/V tensors its blocks index."""

from __future__ import annotations

import torch

from .block_pool import BlockPool

__all__ = ["KVPool"]


class KVPool:
    """K/V storage of ``num_layers`` layers, each ``[num_blocks, block_size, num_kv_heads, head_dim]``.

    One allocation holds every layer so that copying a block (copy-on-write) is one indexing op.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.blocks = BlockPool(num_blocks)
        self.num_layers = num_layers
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self._storage = torch.zeros(
            num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device
        )
        # Made once: indexing the storage costs a few microseconds, and `PagedCache` asks every layer, every step.
        self._layers = [(self._storage[i, 0], self._storage[i, 1]) for i in range(num_layers)]

    @property
    def device(self) -> torch.device:
        return self._storage.device

    @property
    def storage(self) -> torch.Tensor:
        """Every layer's K/V: ``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]``."""
        return self._storage

    @property
    def num_blocks(self) -> int:
        return self.blocks.num_blocks

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes one block takes across all layers, K and V."""
        return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self._storage.numel() * self._storage.element_size()

    def release(self) -> None:
        """Free the K/V storage now, back to the device (the pool is unusable afterwards)."""
        device = self._storage.device
        self._storage = self._storage.new_empty(0)
        self._layers = []
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(k_cache, v_cache)`` views of one layer."""
        return self._layers[layer_idx]

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        """Copy the contents of blocks ``src`` into ``dst`` in every layer (copy-on-write)."""
        if not src:
            return
        device = self._storage.device
        self._storage[:, :, torch.tensor(dst, device=device)] = self._storage[:, :, torch.tensor(src, device=device)]
