"""Per-request and per-sample state the scheduler, block manager and engine share."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from .sampling_params import SamplingParams

__all__ = ["FinishReason", "Request", "Sequence", "SequenceStatus"]


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, or preempted (its KV freed, to be recomputed)
    RUNNING = "running"  # holds KV blocks; scheduled every step until it finishes
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    LENGTH = "length"
    STOP = "stop"
    ERROR = "error"
    ABORT = "abort"


class Sequence:
    """One sample of a request: its tokens, how many of them have KV stored, and its block table.

    ``token_ids`` holds the prompt then the generated tokens. ``num_computed_tokens`` of them have
    their K/V in the pool or being computed by a scheduled step; the rest (the whole prompt at
    first, the last sampled token while decoding) are fed to the next forward.
    """

    __slots__ = (
        "seq_id",
        "request",
        "sample_index",
        "token_ids",
        "num_prompt_tokens",
        "num_computed_tokens",
        "block_table",
        "block_hashes",
        "num_committed_blocks",
        "status",
        "pending_forks",
        "generator",
        "logprobs",
        "finish_reason",
        "detokenizer",
        "num_pending",
        "pending_row",
        "table_row",
    )

    def __init__(self, seq_id: int, request: Request, sample_index: int, token_ids: list[int]) -> None:
        self.seq_id = seq_id
        self.request = request
        self.sample_index = sample_index
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(request.prompt_token_ids)
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        # Chained content hashes of the full blocks of ``token_ids`` computed so far (prefix caching);
        # tokens are only ever appended, so they stay valid across preemption.
        self.block_hashes: list[int] = []
        # Leading blocks of ``block_table`` already registered in (or taken from) the prefix cache.
        self.num_committed_blocks = 0
        self.status = SequenceStatus.WAITING
        # Samples still to split off this one when its prompt is done (``n > 1``).
        self.pending_forks = 0
        self.generator: torch.Generator | None = None
        self.logprobs: list | None = [] if request.params.logprobs is not None else None
        self.finish_reason: FinishReason | None = None
        # Output processing's state of this sample (an IncrementalDetokenizer), kept here to save a lookup.
        self.detokenizer = None
        # Tokens scheduled to be sampled whose values the host does not know yet: they follow
        # ``token_ids``. ``pending_row`` is the row of its step's sampled tokens that holds the newest.
        self.num_pending = 0
        self.pending_row = -1
        # This sequence's row in its block manager's `BlockTableRows` (-1: it holds no blocks).
        self.table_row = -1

    @property
    def num_tokens(self) -> int:
        """Tokens of the sequence, those still being sampled included."""
        return len(self.token_ids) + self.num_pending

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def seed_for_sample(self) -> int | None:
        seed = self.request.params.seed
        if seed is None or self.sample_index == 0:
            return seed
        # Distinct, reproducible streams per sample of one seeded request.
        return (seed * 1_000_003 + self.sample_index * 0x9E3779B1) % (2**63 - 1)

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, request={self.request.request_id!r}, sample={self.sample_index}, "
            f"tokens={self.num_tokens}, computed={self.num_computed_tokens}, status={self.status.value})"
        )


@dataclass(eq=False)
class Request:
    """A submitted prompt with its parameters, the samples it produced and its timing."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    stop_token_ids: frozenset[int]
    prompt: str | None = None
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None
    sequences: list[Sequence] = field(default_factory=list)
    error: str | None = None
    num_cached_tokens: int = 0
    aborted: bool = False
    # Admission order from the waiting queue: lower first (see hf_paged.engine.policy).
    priority: float = 0.0
    # Set at the first admission: prefix-cache hit statistics count first admissions only.
    admitted: bool = False
    # Prompt log-probabilities (``params.prompt_logprobs``): one slot per prompt token, and the
    # next prompt position still missing its value (filled in order, chunk by chunk).
    prompt_logprobs: list | None = None
    prompt_logprobs_next: int = 0
    # Samples that finished (kept by `Scheduler.finish`), so `finished` costs O(1) however large ``n``.
    num_finished_samples: int = 0
    # Whether output processing streams text deltas of this request.
    stream_text: bool = False
    # Whether output processing decodes text at all (off when the client decodes the token ids itself).
    detokenize: bool = True
    # Read for every sample every step, so decided once: the sampler's plain arg-max applies (greedy, no
    # penalties), and the step must wait for the host (logprobs are read there, penalties read its tokens).
    # And whether its samples are detokenized as they decode (streamed text, stop strings), not once at the end.
    argmax_only: bool = field(init=False)
    sync_sampling: bool = field(init=False)
    incremental_text: bool = field(init=False)

    def __post_init__(self) -> None:
        params = self.params
        self.argmax_only = params.greedy and not params.has_penalties
        self.sync_sampling = params.logprobs is not None or params.has_penalties
        self.incremental_text = self.detokenize and (self.stream_text or bool(params.stop))
        if self.params.prompt_logprobs is not None and self.error is None:
            self.prompt_logprobs = [None] * len(self.prompt_token_ids)
            self.prompt_logprobs_next = min(max(1, self.params.prompt_logprobs_start), len(self.prompt_token_ids))

    @property
    def max_cached_prefix(self) -> int | None:
        """Prompt tokens the prefix cache may serve at most (``None``: no limit).

        The logits at position ``p - 1`` give the log-probability of token ``p``, so every position
        from ``prompt_logprobs_next - 1`` on must be computed, not taken from the cache.
        """
        if self.prompt_logprobs is None or self.prompt_logprobs_next >= len(self.prompt_token_ids):
            return None
        return self.prompt_logprobs_next - 1

    @property
    def finished(self) -> bool:
        if self.error is not None or self.aborted:
            return True
        return self.num_finished_samples == self.params.n
