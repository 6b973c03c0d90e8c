"""Batched token sampling on the device with per-request parameters and generators."""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from .host_copy import upload
from .outputs import SamplerOutput
from .scheduler import SchedulerOutput
from .sequence import Sequence

__all__ = ["PromptLogprobRows", "Sampler", "SamplerOutput", "prompt_logprob_rows", "sample_step"]

# Rows turned into log-probabilities at once: bounds the float32 [rows, vocab] temporaries.
_LOGPROB_ROWS_PER_PASS = 512


class PromptLogprobRows(NamedTuple):
    """Positions of one chunk whose logits score prompt tokens: ``count`` rows from ``offset`` in
    the chunk; the first scores prompt position ``first``."""

    chunk_index: int
    offset: int
    count: int
    first: int


def sample_step(sampler, out: SchedulerOutput, logits: torch.Tensor, rows: list[PromptLogprobRows]) -> SamplerOutput:
    """Tokens for the step's sampling rows (the first rows of ``logits``, drawn by ``sampler``: a
    `Sampler` or a wrapper such as the tensor-parallel broadcast) and the prompt log-probabilities
    of ``rows`` (the rows after them)."""
    samplers = [s for c in out.chunks for s in c.samplers]
    result = sampler(logits[: len(samplers)], samplers) if samplers else SamplerOutput([])
    if rows:
        result.prompt_logprobs = _prompt_logprobs(out, rows, logits[len(samplers) :])
    return result


def prompt_logprob_rows(out: SchedulerOutput) -> list[PromptLogprobRows]:
    """The positions of this step whose logits give wanted prompt log-probabilities.

    A chunk contributes the positions ``q`` it computes with ``next - 1 <= q < num_prompt_tokens - 1``
    of a request that asked for ``prompt_logprobs`` (the logits at ``q`` score prompt token ``q + 1``).
    """
    rows = []
    for i, chunk in enumerate(out.chunks):
        request = chunk.seq.request
        if request.prompt_logprobs is None:
            continue
        lo = max(chunk.start, request.prompt_logprobs_next - 1)
        hi = min(chunk.start + chunk.num_tokens, len(request.prompt_token_ids) - 1)
        if hi > lo:
            rows.append(PromptLogprobRows(i, lo - chunk.start, hi - lo, lo + 1))
    return rows


class Sampler:
    """Turns the logits of a step into one token per row.

    Order of processing follows Transformers: penalties, temperature, top-k, top-p, min-p, then a
    draw. Greedy rows (``temperature == 0``) take the arg-max after penalties. A draw is
    ``argmax(probs / E)`` with ``E ~ Exp(1)`` (equivalent to sampling from ``probs``); seeded rows
    draw their ``E`` from their own generator, so their tokens do not depend on which other
    requests share the batch. On CUDA the filters and the draw run in one Triton kernel without
    sorting the vocabulary (`hf_paged.kernels.triton_sampling`): the same distribution from other
    random numbers (a per-row Philox seed drawn from the request's generator).
    """

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        tokens = self.tokens(logits, seqs)
        if not any(s.request.params.logprobs is not None for s in seqs):
            return SamplerOutput(tokens.tolist())  # the step's one device->host copy
        params = [s.request.params for s in seqs]
        return SamplerOutput(tokens.tolist(), self._logprobs(logits.float(), tokens, params))

    def tokens(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """The sampled token of each row, left on the logits' device (no host sync)."""
        if all(s.request.argmax_only for s in seqs):
            return logits.argmax(dim=-1)
        params = [s.request.params for s in seqs]
        raw = logits.float()
        scores = self._apply_penalties(raw, seqs) if any(p.has_penalties for p in params) else raw
        return self._sample(scores, seqs)

    # -- pieces ------------------------------------------------------------------------------------

    @staticmethod
    def _apply_penalties(scores: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        device, (rows, vocab) = scores.device, scores.shape
        longest = max(len(s.token_ids) for s in seqs)
        # Padded token ids per row (pad = vocab, a scratch column dropped below) and a mask of
        # which positions are generated tokens.
        ids = torch.full((rows, longest), vocab, dtype=torch.int64)
        is_output = torch.zeros((rows, longest), dtype=torch.bool)
        for i, s in enumerate(seqs):
            ids[i, : len(s.token_ids)] = torch.tensor(s.token_ids, dtype=torch.int64)
            is_output[i, s.num_prompt_tokens : len(s.token_ids)] = True
        ids, is_output = ids.to(device), is_output.to(device)
        seen = torch.zeros((rows, vocab + 1), dtype=torch.bool, device=device)
        seen.scatter_(1, ids, True)
        counts = torch.zeros((rows, vocab + 1), dtype=torch.float32, device=device)
        counts.scatter_add_(1, ids, is_output.float())
        seen, counts = seen[:, :vocab], counts[:, :vocab]

        p = [s.request.params for s in seqs]
        table = torch.tensor(
            [[q.repetition_penalty, q.presence_penalty, q.frequency_penalty] for q in p], dtype=torch.float32
        ).to(device)
        rep, presence, frequency = table[:, 0:1], table[:, 1:2], table[:, 2:3]
        penalized = torch.where(scores < 0, scores * rep, scores / rep)
        scores = torch.where(seen, penalized, scores)
        return scores - presence * (counts > 0) - frequency * counts

    def _sample(self, scores: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        params = [s.request.params for s in seqs]
        greedy_tokens = scores.argmax(dim=-1)
        if all(p.greedy for p in params):
            return greedy_tokens
        device, vocab = scores.device, scores.shape[1]
        # One pass over the rows: their parameters, and which filters and generators the step needs.
        rows, greedy_rows, seeded = [], [], []
        use_top_k = use_top_p = use_min_p = False
        for i, p in enumerate(params):
            top_k = p.top_k if 0 < p.top_k < vocab else vocab
            rows.append((1.0 if p.greedy else p.temperature, top_k, p.top_p, p.min_p))
            greedy_rows.append(p.greedy)
            use_top_k |= top_k < vocab
            use_top_p |= p.top_p < 1.0
            use_min_p |= p.min_p > 0
            if p.seed is not None:
                seeded.append(i)
        table = upload(torch.tensor(rows, dtype=torch.float32), device)
        greedy = upload(torch.tensor(greedy_rows), device)
        fused = _fused_sample() if scores.is_cuda else None
        if fused is not None:  # no sort, no [rows, vocab] temporaries (hf_paged/kernels/triton_sampling.py)
            seeds = torch.randint(0, 2**62, (len(seqs),), device=device)
            for i in seeded:
                seeds[i : i + 1].random_(0, 2**62, generator=self._generator(seqs[i], device))
            sampled = fused(scores, table, seeds, top_k=use_top_k, top_p=use_top_p, min_p=use_min_p)
            return torch.where(greedy, greedy_tokens, sampled)
        temperature, top_k, top_p, min_p = table.unbind(1)
        scores = scores / temperature[:, None]
        if use_top_k or use_top_p:
            scores = self._top_k_top_p(scores, top_k, top_p)
        if use_min_p:
            probs = torch.softmax(scores, dim=-1)
            threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
            scores = scores.masked_fill(probs < threshold, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        # Every row draws from the default generator, then seeded rows redraw from their own (no index
        # tensor built from a host list, whose copy would wait for the device).
        noise = torch.empty_like(probs).exponential_()
        for i in seeded:
            noise[i].exponential_(generator=self._generator(seqs[i], device))
        # A zero draw over a zero probability would give NaN, which arg-max prefers.
        sampled = (probs / noise.clamp_min_(torch.finfo(noise.dtype).tiny)).argmax(dim=-1)
        return torch.where(greedy, greedy_tokens, sampled)

    @staticmethod
    def _top_k_top_p(scores: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        rank = torch.arange(scores.shape[1], device=scores.device)[None, :]
        drop = rank >= top_k[:, None]
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        probs = torch.softmax(sorted_scores, dim=-1)
        # Drop a token once the more likely ones already cover top_p (the first is always kept).
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop = mass_before >= top_p[:, None]
        drop[:, 0] = False
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        return torch.empty_like(scores).scatter_(1, order, sorted_scores)

    @staticmethod
    def _generator(seq: Sequence, device: torch.device) -> torch.Generator:
        if seq.generator is None or seq.generator.device != device:
            seq.generator = torch.Generator(device=device)
            seq.generator.manual_seed(seq.seed_for_sample())
        return seq.generator

    @staticmethod
    def _logprobs(raw: torch.Tensor, tokens: torch.Tensor, params) -> list:
        logprobs = torch.log_softmax(raw, dim=-1)
        chosen = logprobs.gather(1, tokens[:, None])[:, 0].tolist()
        k = max(p.logprobs or 0 for p in params)
        top_vals, top_ids = (logprobs.topk(k, dim=-1) if k else (None, None))
        top_vals = top_vals.tolist() if k else None
        top_ids = top_ids.tolist() if k else None
        result: list = []
        for i, p in enumerate(params):
            if p.logprobs is None:
                result.append(None)
                continue
            n = p.logprobs
            top = dict(zip(top_ids[i][:n], top_vals[i][:n])) if n else {}
            result.append((chosen[i], top))
        return result


@functools.cache
def _fused_sample():
    """The sort-free sampling kernel where Triton is installed (CUDA tensors), else ``None``."""
    try:
        from ..kernels.triton_sampling import sample
    except ImportError:
        return None
    return sample


def _prompt_logprobs(out: SchedulerOutput, rows: list[PromptLogprobRows], logits: torch.Tensor) -> list:
    """Log-probabilities of the prompt tokens that ``rows`` score, from their logits rows."""
    targets: list[int] = []
    top_k = 0
    for r in rows:
        request = out.chunks[r.chunk_index].seq.request
        targets.extend(request.prompt_token_ids[r.first : r.first + r.count])
        top_k = max(top_k, request.params.prompt_logprobs)
    target_t = torch.tensor(targets, dtype=torch.int64, device=logits.device)
    chosen: list[float] = []
    tops: list[list[int]] = []
    top_vals: list[list[float]] = []
    for lo in range(0, len(targets), _LOGPROB_ROWS_PER_PASS):
        part = torch.log_softmax(logits[lo : lo + _LOGPROB_ROWS_PER_PASS].float(), dim=-1)
        chosen.extend(part.gather(1, target_t[lo : lo + part.shape[0], None])[:, 0].tolist())
        if top_k:
            values, indices = part.topk(top_k, dim=-1)
            top_vals.extend(values.tolist())
            tops.extend(indices.tolist())
    result = []
    row = 0
    for r in rows:
        request = out.chunks[r.chunk_index].seq.request
        k = request.params.prompt_logprobs
        values = []
        for i in range(row, row + r.count):
            values.append((chosen[i], dict(zip(tops[i][:k], top_vals[i][:k])) if k else {}))
        row += r.count
        result.append((request, r.first, values))
    return result
