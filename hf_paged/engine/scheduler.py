"""FCFS (or plugin-prioritised, see `hf_paged.engine.policy`) continuous-batching scheduler with chunked prefill and recompute preemption.

Every step fills a token budget (``max_num_batched_tokens``) under a sequence cap
(``max_num_seqs``): first one token for each decoding sequence, then the next chunk of prompts
already being prefilled, then new requests from the waiting queue in arrival order. A prompt longer
than what is left of the budget is split across steps. When the pool runs out of blocks the
newest running sequence is preempted: its blocks are freed and it goes back to the head of the
waiting queue, to be recomputed from its tokens (the prefix cache usually still holds most of them).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .outputs import SamplerOutput
from .sequence import FinishReason, Request, Sequence, SequenceStatus

__all__ = ["ScheduledChunk", "Scheduler", "SchedulerOutput"]


@dataclass(slots=True)
class ScheduledChunk:
    """``num_tokens`` tokens of ``seq`` starting at ``start``, fed to this step's forward.

    ``samplers`` are the sequences that take a token from the chunk's last logits: empty for a
    prompt chunk that does not reach the end of its tokens, ``[seq]`` normally, ``seq`` and its
    new siblings when the prompt of an ``n > 1`` request completes. When the chunk's last token
    is still being sampled by the step before (async scheduling), ``placeholder_row`` is its row
    in that step's sampled tokens.
    """

    seq: Sequence
    start: int
    num_tokens: int
    samplers: list[Sequence] | tuple[()] = ()  # (no list built for the chunks that sample nothing)
    placeholder_row: int = -1


@dataclass
class SchedulerOutput:
    """A step's chunks; ``samplers`` (every chunk's, in row order) and whether any of their requests
    needs host-synchronous sampling are gathered while scheduling (not by one more pass per step)."""

    chunks: list[ScheduledChunk]
    num_batched_tokens: int
    num_preempted: int = 0
    samplers: list[Sequence] = field(default_factory=list)
    sync_sampling: bool = False

    @property
    def empty(self) -> bool:
        return not self.chunks

    @property
    def is_decode_only(self) -> bool:
        return all(c.num_tokens == 1 for c in self.chunks)


class Scheduler:
    """Decides which tokens of which sequences the next forward computes, and owns their state.

    The scheduler (with its block manager) is the only writer of `Sequence` state: it creates the
    sequences of a request, schedules them, advances them with each step's sampled tokens
    (`update_from_output`) and finishes them.

    Args:
        block_manager: block tables and the prefix cache.
        max_num_seqs: running sequences at most.
        max_num_batched_tokens: tokens per forward at most.
    """

    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self._seq_ids = itertools.count()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add_request(self, request: Request) -> None:
        """Queue the first sample of ``request`` (the other ``n - 1`` split off when its prompt is done)."""
        seq = Sequence(next(self._seq_ids), request, 0, request.prompt_token_ids)
        seq.pending_forks = request.params.n - 1
        request.sequences.append(seq)
        self._enqueue(seq)

    def _enqueue(self, seq: Sequence) -> None:
        """Queue ``seq`` behind every waiting sequence of lower or equal priority."""
        seq.status = SequenceStatus.WAITING
        priority = seq.request.priority
        position = len(self.waiting)
        while position > 0 and self.waiting[position - 1].request.priority > priority:
            position -= 1
        self.waiting.insert(position, seq)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        chunks: dict[int, ScheduledChunk] = {}
        preempted = 0
        bm = self.block_manager

        # 1. Running sequences: decodes first, then prompts being prefilled in chunks. A sequence
        # whose token in flight is its last allowed one waits for it instead.
        decodes, prefills = [], []
        for s in self.running:  # (one pass, properties inlined: this runs for every sequence every step)
            num_tokens = len(s.token_ids) + s.num_pending
            left = num_tokens - s.num_computed_tokens
            if left == 1:
                if num_tokens - s.num_prompt_tokens < s.request.params.max_new_tokens:
                    decodes.append(s)
            elif left > 1:
                prefills.append(s)
        for seq in decodes + prefills:
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            if budget == 0:
                break
            num_new = min(len(seq.token_ids) + seq.num_pending - seq.num_computed_tokens, budget)
            while not bm.try_append(seq, num_new):
                victim = self.running[-1]
                budget += self._preempt(victim, chunks)
                preempted += 1
                if victim is seq:
                    break
            else:
                chunks[seq.seq_id] = ScheduledChunk(seq, seq.num_computed_tokens, num_new)
                budget -= num_new

        # 2. Waiting sequences in arrival order, unless this step already had to preempt.
        num_seqs = len(self.running)
        while self.waiting and budget > 0 and not preempted:
            seq = self.waiting[0]
            if num_seqs + 1 + seq.pending_forks > self.max_num_seqs and num_seqs > 0:
                break
            num_new = bm.try_admit(seq, budget, count_query=not seq.request.admitted)
            if num_new == 0:
                break
            seq.request.admitted = True
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            num_seqs += 1 + seq.pending_forks
            chunks[seq.seq_id] = ScheduledChunk(seq, seq.num_computed_tokens, num_new)
            budget -= num_new

        ordered = list(chunks.values())
        samplers: list[Sequence] = []
        sync = False
        for chunk in ordered:
            seq, end = chunk.seq, chunk.start + chunk.num_tokens
            known = len(seq.token_ids)
            if end > known:
                chunk.placeholder_row = seq.pending_row
            if end == known + seq.num_pending:
                chunk.samplers = [seq, *self._fork(seq)] if seq.pending_forks else [seq]
                sync = sync or seq.request.sync_sampling
            # Scheduled tokens count as computed from now on, so that the next step can be
            # scheduled before this one's tokens are known; each sampler gets a pending token.
            seq.num_computed_tokens = end
            for sampler in chunk.samplers:
                sampler.num_computed_tokens = end
                sampler.num_pending += 1
                sampler.pending_row = len(samplers)
                samplers.append(sampler)
        return SchedulerOutput(ordered, self.max_num_batched_tokens - budget, preempted, samplers, sync)

    def _fork(self, parent: Sequence) -> list[Sequence]:
        """Split the ``n - 1`` further samples off a sequence whose prompt completes this step."""
        children = []
        request = parent.request
        for _ in range(parent.pending_forks):
            child = Sequence(next(self._seq_ids), request, len(request.sequences), parent.token_ids)
            self.block_manager.fork(parent, child)
            child.status = SequenceStatus.RUNNING
            request.sequences.append(child)
            self.running.append(child)
            children.append(child)
        parent.pending_forks = 0
        return children

    def _preempt(self, seq: Sequence, chunks: dict[int, ScheduledChunk]) -> int:
        """Free ``seq``'s blocks and requeue it at the head; returns the budget it gave back."""
        chunk = chunks.pop(seq.seq_id, None)
        self.block_manager.free(seq)
        self.running.remove(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        return chunk.num_tokens if chunk else 0

    def update_from_output(self, out: SchedulerOutput, sampled: SamplerOutput) -> list[Sequence]:
        """Advance the sequences of a computed step; returns those that took a token, in row order.

        Full blocks the step computed enter the prefix cache, sampled tokens and their logprobs
        are appended, prompt logprobs stored, and a sample that drew a stop token or reached
        ``max_new_tokens`` finished. A sample that finished while the step ran (a stop found one
        step late, an abort) drops its token: it computed one more than it returns.
        """
        advanced: list[Sequence] = []
        tokens, logprobs = sampled.token_ids, sampled.logprobs
        bm = self.block_manager
        block_size = bm.block_size
        now = time.perf_counter()
        row = 0
        for chunk in out.chunks:
            end = chunk.start + chunk.num_tokens
            if not chunk.samplers:
                if chunk.seq.status is SequenceStatus.RUNNING:
                    bm.commit(chunk.seq, end)
                continue
            for seq in chunk.samplers:
                token = tokens[row]
                row += 1
                if seq.status is SequenceStatus.FINISHED:
                    continue
                seq.num_pending -= 1
                token_ids = seq.token_ids
                token_ids.append(token)
                if seq.logprobs is not None and logprobs is not None:
                    seq.logprobs.append(logprobs[row - 1])
                # (`commit` has work only once a step fills a block: the check is inlined for the other steps.)
                if seq.status is SequenceStatus.RUNNING and end // block_size > seq.num_committed_blocks:
                    bm.commit(seq, end)
                request = seq.request
                if request.first_token_time is None:
                    request.first_token_time = now
                if token in request.stop_token_ids:
                    self.finish(seq, FinishReason.STOP)
                elif len(token_ids) - seq.num_prompt_tokens >= request.params.max_new_tokens:
                    self.finish(seq, FinishReason.LENGTH)
                advanced.append(seq)
        for request, first, values in sampled.prompt_logprobs or ():
            request.prompt_logprobs[first : first + len(values)] = values
            request.prompt_logprobs_next = first + len(values)
        return advanced

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Mark ``seq`` finished and return its blocks (it may be running or waiting)."""
        if seq.status is SequenceStatus.FINISHED:
            if reason is FinishReason.STOP and seq.finish_reason is FinishReason.LENGTH:
                seq.finish_reason = reason  # its last token also completed a stop string
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.request.num_finished_samples += 1

    def finish_request(self, request: Request, reason: FinishReason) -> None:
        """Finish every sample of ``request`` (abort, error)."""
        for seq in request.sequences:
            self.finish(seq, reason)
