"""`PagedCache`: a Transformers `Cache` whose K/V live in the blocks of a `KVPool`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from .block_pool import OutOfBlocksError
from .geometry import cdiv, config_kv_geometry, num_blocks_for_memory
from .kv_pool import KVPool
from .metadata import PagedAttentionMetadata, flush_published, publish

__all__ = ["PagedCache", "PagedCacheStats"]


@dataclass(frozen=True)
class PagedCacheStats:
    """Accounting of a `PagedCache`; ``waste`` counts reserved slots that hold no token."""

    num_blocks: int
    block_size: int
    blocks_used: int
    blocks_free: int
    tokens_stored: int
    slots_reserved: int
    bytes_per_block: int

    @property
    def waste(self) -> int:
        return self.slots_reserved - self.tokens_stored

    @property
    def waste_fraction(self) -> float:
        return self.waste / self.slots_reserved if self.slots_reserved else 0.0

    @property
    def bytes_used(self) -> int:
        return self.blocks_used * self.bytes_per_block


class PagedCache(Cache):
    """KV cache for ``model.generate`` stored in fixed-size blocks.

    Each batch row owns a block table and takes a block only when its tokens spill into one; beams and
    ``num_return_sequences`` copies share blocks by reference count, and a shared, partly filled last
    block is copied before it is written (copy-on-write). Storage is allocated at the first
    ``update``, from the key shape the model hands over (so tensor-parallel shards size themselves).

    Args:
        config: the model config; every layer's keys are checked against its layer count, KV
            heads and head dim.
        num_blocks: pool size in blocks. Defaults to ``memory_fraction`` of free memory when that
            is set, else to what the first batch needs to reach ``max_cache_len`` tokens per row.
        block_size: tokens per block.
        memory_fraction: size the pool from this fraction of free device memory.
        max_cache_len: longest sequence the default sizing provides for.
        dtype: expected K/V dtype (checked at the first ``update``).
        tp_size: tensor-parallel degree of the model (``model.tp_size``): each rank's layers hand
            over ``num_key_value_heads // tp_size`` KV heads and its pool holds only those. When
            ``None``, a torch.distributed world of size ``W > 1`` makes ``num_key_value_heads // W``
            heads acceptable too.

    On CUDA, ``generate``'s one-token steps on this cache replay a CUDA graph of the model's forward over its pool
    (`hf_paged.graphed_decode`), captured at the first such step and kept with the cache.

    Reusing a cache: a later ``generate`` whose ``input_ids`` continue what the cache holds (longer,
    starting with the prompt it was filled from) continues it; any other prompt starts it afresh (the
    blocks return to the pool first), as a new call with a new cache would. ``reset()`` empties it by hand.

    Example:
        >>> import hf_paged
        >>> cache = hf_paged.PagedCache(model.config, num_blocks=256)  # doctest: +SKIP
        >>> model.generate(**inputs, cache=cache)  # doctest: +SKIP  (past_key_values= before Transformers 5.24)
        >>> cache.stats().waste_fraction  # doctest: +SKIP
    """

    is_compileable = False

    def __init__(
        self,
        config,
        *,
        num_blocks: int | None = None,
        block_size: int = 16,
        memory_fraction: float | None = None,
        max_cache_len: int | None = None,
        dtype: torch.dtype | None = None,
        tp_size: int | None = None,
    ) -> None:
        super().__init__(layers=[])
        if tp_size is not None and tp_size <= 0:
            raise ValueError(f"tp_size must be positive, got {tp_size}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if num_blocks is not None and num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.block_size = block_size
        self._num_blocks = num_blocks
        self._memory_fraction = memory_fraction
        self._max_cache_len = max_cache_len
        self._dtype = dtype
        self._expected = config_kv_geometry(config)
        self._tp_size = tp_size
        self._kv_heads_per_rank(self._expected[1])  # checks that tp_size divides the KV heads
        self._pool: KVPool | None = None
        self._checked: tuple | None = None  # the last keys' (shapes, dtype, device) that passed `_check_layer`
        self._tables: list[list[int]] = []
        self._seq_len = 0
        self._step: PagedAttentionMetadata | None = None
        self._prompt_ids: torch.Tensor | None = None  # what the last fresh prefill started from
        self._decode_graphs = None  # `hf_paged.graphed_decode`'s graphs over this pool: they live and die with it

    # -- what generate() and the masks ask ---------------------------------------------------------

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._seq_len

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self._seq_len

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        # Every layer keeps all its keys; sliding windows are applied inside the kernel.
        return self._seq_len + query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * self._num_layers_hint()

    @property
    def is_linear(self) -> list[bool]:
        return [False] * self._num_layers_hint()

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * self._num_layers_hint()

    @property
    def is_croppable(self) -> bool:
        return True

    @property
    def is_initialized(self) -> bool:
        return self._pool is not None

    @property
    def batch_size(self) -> int:
        return len(self._tables) if self._tables else -1

    def __len__(self) -> int:
        return self._num_layers_hint()

    # -- storage -----------------------------------------------------------------------------------

    @property
    def pool(self) -> KVPool | None:
        """The `KVPool` behind this cache (``None`` before the first ``update``)."""
        flush_published()
        return self._pool

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Store this step's ``[B, Hkv, Q, D]`` keys/values; return the layer's ``(k_cache, v_cache)``.

        The returned tensors are the block pools, not dense keys: the ``"paged"`` attention function
        reads them through the step's block tables, and stores this step's keys/values (a kernel backend may
        do so inside its attention launch). Keys no attention call took are stored when the cache is next
        updated or read (`hf_paged.cache.metadata.flush_published`).
        """
        try:
            flush_published()
            self._check_layer(key_states, value_states, layer_idx)
            if layer_idx == 0:
                self._begin_step(key_states)
            elif self._step is None:
                raise RuntimeError(f"PagedCache.update called for layer {layer_idx} before layer 0")
            k_cache, v_cache = self._pool.layer(layer_idx)
            b, hkv, q, d = key_states.shape
            # [B, Hkv, Q, D] -> [B * Q, Hkv, D]; one-token steps by a single view op (this runs every layer)
            if q == 1:
                keys, values = key_states[:, :, 0], value_states[:, :, 0]
            else:
                keys = key_states.transpose(1, 2).reshape(b * q, hkv, d)
                values = value_states.transpose(1, 2).reshape(b * q, hkv, d)
        except BaseException:
            self.reset()
            raise
        publish(k_cache, v_cache, self._step, keys, values)
        return k_cache, v_cache

    def _num_layers_hint(self) -> int:
        return self._expected[0]

    def _allocate_pool(self, key: torch.Tensor, batch: int, new_len: int) -> None:
        _, num_kv_heads, _, head_dim = key.shape
        dtype = key.dtype
        num_layers = self._expected[0]
        per_block = KVPool.bytes_per_block(num_layers, self.block_size, num_kv_heads, head_dim, dtype)
        num_blocks = self._num_blocks
        if num_blocks is None and self._memory_fraction is not None:
            num_blocks = num_blocks_for_memory(self._memory_fraction, key.device, per_block)
        if num_blocks is None:
            longest = max(new_len, self._max_cache_len or 0)
            # One extra block per row covers a copy-on-write of a shared last block.
            num_blocks = batch * (cdiv(longest, self.block_size) + 1)
        self._pool = KVPool(
            num_layers=num_layers,
            num_blocks=num_blocks,
            block_size=self.block_size,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            dtype=dtype,
            device=key.device,
        )

    def _begin_step(self, key: torch.Tensor) -> None:
        batch, q_len = key.shape[0], key.shape[2]
        if self._pool is None:
            self._allocate_pool(key, batch, self._seq_len + q_len)
        if not self._tables:
            self._tables = [[] for _ in range(batch)]
        new_len = self._reserve(batch, q_len)
        device = key.device
        tables, slots = self._tables_and_slots(new_len, device)
        self._step = PagedAttentionMetadata(
            slot_mapping=slots,
            cu_seqlens_q=torch.arange(0, (batch + 1) * q_len, q_len, dtype=torch.int32, device=device),
            context_lens=torch.full((batch,), new_len, dtype=torch.int32, device=device),
            block_tables=tables,
            max_seqlen_q=q_len,
            max_context_len=new_len,
        )
        self._seq_len = new_len

    def _reserve(self, batch: int, q_len: int) -> int:
        """Give every row the blocks ``q_len`` more tokens need (copying a shared last block before it is
        written); returns the rows' new length."""
        if batch != len(self._tables):
            raise ValueError(f"PagedCache holds {len(self._tables)} sequences but got a batch of {batch}")
        new_len = self._seq_len + q_len
        blocks, bs = self._pool.blocks, self.block_size
        per_row = cdiv(new_len, bs)
        if per_row > blocks.num_blocks:
            raise OutOfBlocksError(
                f"a sequence of {new_len} tokens needs {per_row} blocks of {bs}, "
                f"but the cache has only {blocks.num_blocks} blocks ({blocks.num_blocks * bs} tokens)"
            )
        # Rows whose partly filled last block is shared must copy it before writing into it.
        cow_rows = [
            i for i, t in enumerate(self._tables) if self._seq_len % bs and blocks.refcount(t[-1]) > 1
        ]
        needed = sum(per_row - len(t) for t in self._tables) + len(cow_rows)
        if needed > blocks.num_free:
            raise OutOfBlocksError(
                f"out of KV blocks: this step needs {needed}, {blocks.num_free} free of {blocks.num_blocks}"
            )
        if cow_rows:
            fresh = blocks.allocate(len(cow_rows))
            self._pool.copy_blocks([self._tables[i][-1] for i in cow_rows], fresh)
            blocks.free([self._tables[i][-1] for i in cow_rows])
            for i, b in zip(cow_rows, fresh):
                self._tables[i][-1] = b
        for t in self._tables:
            t.extend(blocks.allocate(per_row - len(t)))
        return new_len

    def _begin_graphed_step(self, batch: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        """The host half of a one-token step whose forward replays a CUDA graph (`hf_paged.graphed_decode`):
        blocks taken, length advanced. Returns the new length and, on the host, each row's slot for the new token
        (int64 ``[B]``) and the block tables (int32 ``[B, blocks]``). On error the cache is reset, as in ``update``."""
        try:
            flush_published()
            new_len = self._reserve(batch, 1)
        except BaseException:
            self.reset()
            raise
        tables, slots = self._tables_and_slots(new_len, "cpu")
        self._seq_len, self._step = new_len, None
        return new_len, slots, tables

    def _tables_and_slots(self, new_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The block tables (int32 ``[B, blocks]``) and the slots of the tokens from the current length to
        ``new_len`` (int64 ``[B * new tokens]``, row by row), on ``device``."""
        bs = self.block_size
        tables = torch.tensor(self._tables, dtype=torch.int32, device=device)
        pos = torch.arange(self._seq_len, new_len, device=device)
        return tables, (tables[:, pos // bs].long() * bs + pos % bs).reshape(-1)

    def _check_layer(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> None:
        num_layers, kv_heads, head_dim = self._expected
        if layer_idx >= num_layers:
            raise ValueError(f"PagedCache was built for {num_layers} layers, got layer index {layer_idx}")
        # Every layer of a step hands over keys like the last ones checked: the full check (several
        # microseconds of Python, every layer and token) runs when something changes.
        checked = (key.shape, value.shape, key.dtype, key.device)
        if checked == self._checked:
            return
        if value.shape != key.shape:
            raise ValueError(f"layer {layer_idx} gave keys {tuple(key.shape)} but values {tuple(value.shape)}")
        _, hkv, _, d = key.shape
        allowed = self._kv_heads_per_rank(kv_heads)
        if hkv not in allowed or d != head_dim:
            per_rank = sorted(allowed - {kv_heads})
            shard = f" ({per_rank[0]} per tensor-parallel rank)" if per_rank else ""
            hint = ""
            if self._tp_size is None and d == head_dim and hkv < kv_heads and kv_heads % hkv == 0:
                hint = " For a tensor-parallel model pass tp_size=model.tp_size."
            raise ValueError(
                f"PagedCache was built for a config with {kv_heads} KV heads{shard} of dim {head_dim}, "
                f"but layer {layer_idx} gave {hkv} heads of dim {d}: was this cache built for another model?{hint}"
            )
        dtype = self._pool.dtype if self._pool is not None else self._dtype
        if dtype is not None and key.dtype != dtype:
            raise ValueError(f"PagedCache stores {dtype}, got keys of {key.dtype}")
        if self._pool is not None and key.device != self._pool.device:
            raise ValueError(f"PagedCache lives on {self._pool.device}, got keys on {key.device}")
        if self._pool is not None:  # before the pool exists, its dtype and device are not checked yet
            self._checked = checked

    def _kv_heads_per_rank(self, kv_heads: int) -> set[int]:
        """KV head counts a layer may hand over: all of them, or one tensor-parallel shard."""
        tp = self._tp_size
        if tp is None:
            import torch.distributed as dist

            world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
            # A guess only (data-parallel worlds hand over every head): offered as an alternative.
            return {kv_heads, kv_heads // world} if world > 1 and kv_heads % world == 0 else {kv_heads}
        if tp == 1:
            return {kv_heads}
        if kv_heads % tp:
            raise ValueError(
                f"num_key_value_heads={kv_heads} is not divisible by the tensor-parallel size {tp}: "
                f"the KV heads cannot be split evenly across ranks"
            )
        return {kv_heads // tp}

    # -- batch surgery used by beam search, num_return_sequences and assisted decoding -------------

    def _reindex(self, rows: list[int]) -> None:
        flush_published()  # keys handed over but not stored yet go to the blocks they were meant for
        blocks = self._pool.blocks
        new_tables = [list(self._tables[r]) for r in rows]
        for t in new_tables:
            blocks.fork(t)
        for t in self._tables:
            blocks.free(t)
        self._tables = new_tables

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row ``i`` continues the sequence of row ``beam_idx[i]`` (blocks shared)."""
        if self._tables:
            self._reindex(beam_idx.tolist())

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._tables:
            self._reindex([i for i in range(len(self._tables)) for _ in range(repeats)])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._tables:
            self._reindex(indices.tolist())

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (a positive value is the length to keep)."""
        new_len = tokens_to_remove if tokens_to_remove > 0 else self._seq_len + tokens_to_remove
        if tokens_to_remove == 0 or new_len >= self._seq_len:
            return
        flush_published()
        keep = cdiv(max(new_len, 0), self.block_size)
        for t in self._tables:
            self._pool.blocks.free(t[keep:])
            del t[keep:]
        self._seq_len = max(new_len, 0)

    def reset(self) -> None:
        """Return every block to the pool; the storage stays allocated for reuse."""
        flush_published()
        if self._pool is not None:
            for t in self._tables:
                self._pool.blocks.free(t)
        self._tables = []
        self._seq_len = 0
        self._step = None
        self._prompt_ids = None

    def _continues(self, input_ids: torch.Tensor) -> bool:
        """Whether ``input_ids`` extend what this cache holds (else a new ``generate`` starts fresh)."""
        prompt = self._prompt_ids
        if prompt is None or input_ids.dim() != 2 or input_ids.shape[0] != len(self._tables):
            return False
        if input_ids.shape[1] <= self._seq_len or prompt.shape[0] != input_ids.shape[0]:
            return False
        n = min(prompt.shape[1], self._seq_len)
        return bool(torch.equal(input_ids[:, :n].to(prompt.device), prompt[:, :n]))

    def stats(self) -> PagedCacheStats:
        """Blocks used/free, tokens stored and slots reserved (shared blocks counted once)."""
        pool = self._pool
        if pool is None:
            return PagedCacheStats(self._num_blocks or 0, self.block_size, 0, self._num_blocks or 0, 0, 0, 0)
        distinct: dict[int, int] = {}
        for t in self._tables:
            for j, b in enumerate(t):
                distinct[b] = max(distinct.get(b, 0), min(self.block_size, self._seq_len - j * self.block_size))
        per_block = KVPool.bytes_per_block(pool.num_layers, pool.block_size, pool.num_kv_heads, pool.head_dim, pool.dtype)
        return PagedCacheStats(
            num_blocks=pool.num_blocks,
            block_size=pool.block_size,
            blocks_used=pool.blocks.num_used,
            blocks_free=pool.blocks.num_free,
            tokens_stored=sum(distinct.values()),
            slots_reserved=len(distinct) * pool.block_size,
            bytes_per_block=per_block,
        )

