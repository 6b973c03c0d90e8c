"""`StatsRecorder`: the counters behind `Engine.stats` (throughput, KV use and waste, prefix hits)."""

from __future__ import annotations

import time

from ..cache.kv_pool import KVPool
from .outputs import EngineStats
from .scheduler import Scheduler
from .sequence import Request

__all__ = ["StatsRecorder"]


# KV waste is averaged over every this many steps.
_WASTE_EVERY = 8


class StatsRecorder:
    """Accumulates what the engine reports in `EngineStats`, from steps and finished requests."""

    def __init__(self, kv_pool: KVPool, scheduler: Scheduler) -> None:
        self._kv_pool = kv_pool
        self._scheduler = scheduler
        self.reset()

    def reset(self) -> None:
        """Start every counter afresh (the prefix cache itself is kept)."""
        self._t_start: float | None = None
        self._t_end: float | None = None
        self._steps = 0
        self._finished = 0
        self._prompt_tokens = 0
        self.output_tokens = 0
        self._peak_blocks = self._kv_pool.blocks.num_used
        self._waste_slots = 0
        self._reserved_slots = 0
        bm = self._scheduler.block_manager
        bm.prefix_hit_tokens = 0
        bm.prefix_query_tokens = 0
        self._scheduler.num_preemptions = 0

    def step_started(self) -> None:
        if self._t_start is None:
            self._t_start = time.perf_counter()
        self._peak_blocks = max(self._peak_blocks, self._kv_pool.blocks.num_used)

    def step_done(self, num_sampled: int) -> None:
        """Count a computed step: its sampled tokens and the KV slots reserved but empty after it."""
        if self._steps % _WASTE_EVERY == 0:  # a sample of the steps: the walk over every sequence is not free
            block_size = self._kv_pool.block_size
            seen: set[int] = set()
            waste = 0
            for seq in self._scheduler.running:
                if not seq.block_table or seq.block_table[-1] in seen:
                    continue
                seen.add(seq.block_table[-1])
                waste += len(seq.block_table) * block_size - seq.num_computed_tokens
            self._waste_slots += waste
            self._reserved_slots += self._kv_pool.blocks.num_used * block_size
        self.output_tokens += num_sampled
        self._steps += 1
        self._t_end = time.perf_counter()

    def request_finished(self, request: Request) -> None:
        self._finished += 1
        self._prompt_tokens += len(request.prompt_token_ids)

    def snapshot(self) -> EngineStats:
        elapsed = (self._t_end - self._t_start) if self._t_start is not None and self._t_end is not None else 0.0
        bm = self._scheduler.block_manager
        return EngineStats(
            requests_finished=self._finished,
            prompt_tokens=self._prompt_tokens,
            output_tokens=self.output_tokens,
            steps=self._steps,
            elapsed_s=elapsed,
            num_blocks=self._kv_pool.num_blocks,
            block_size=self._kv_pool.block_size,
            kv_pool_bytes=self._kv_pool.nbytes,
            peak_blocks_used=self._peak_blocks,
            kv_waste=self._waste_slots / self._reserved_slots if self._reserved_slots else 0.0,
            prefix_hit_rate=bm.prefix_hit_rate,
            prefix_hit_tokens=bm.prefix_hit_tokens,
            preemptions=self._scheduler.num_preemptions,
        )
