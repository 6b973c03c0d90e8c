"""`Engine`: continuous batching over a paged KV pool, one request queue, one forward per step."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator, Sequence as SequenceABC

import torch

from ..cache.kv_pool import KVPool
from ..cache.paged_cache import num_blocks_for_memory
from ..registration import ATTN_IMPLEMENTATION
from .block_manager import BlockManager
from .detokenizer import IncrementalDetokenizer
from .model_runner import ModelRunner
from .outputs import EngineStats, GenerationOutput, RequestUpdate, SampleOutput
from .policy import request_priority
from .sampler import Sampler
from .sampling_params import SamplingParams
from .scheduler import Scheduler, SchedulerOutput
from .sequence import FinishReason, Request, Sequence

__all__ = ["Engine", "default_num_blocks"]

logger = logging.getLogger(__name__)

Prompt = str | list[int]


class Engine:
    """Continuous-batching generation engine over a `KVPool` (vLLM-style).

    Requests are queued with `add_request`; each `step` schedules a packed batch of decode tokens
    and prompt chunks, runs one forward, samples, and returns what changed. Memory comes in
    blocks: when they run out the newest request is preempted and recomputed later; full blocks
    are shared across requests with the same prefix.

    Args:
        model: a decoder-only causal LM. It is switched to ``attn_implementation="paged"`` if it
            is not set so already.
        num_blocks: KV pool size in blocks. Default: ``memory_fraction`` of the device's free
            memory on CUDA (0.9 if unset); on CPU, room for ``max_num_seqs`` sequences of the
            model's ``max_position_embeddings`` (at most a quarter of free RAM).
        block_size: tokens per block.
        memory_fraction: size the pool from this fraction of free device memory.
        max_num_seqs: sequences running at once at most.
        max_num_batched_tokens: tokens per forward at most (the chunked-prefill budget).
        enable_prefix_caching: reuse KV blocks of identical prompt prefixes.
        tokenizer: decodes outputs (``text``), enables string prompts and stop strings.
        stream_text: give every `RequestUpdate` a ``text_delta`` (needs ``tokenizer``).
        cuda_graphs: on CUDA, replay captured graphs for decode-only steps (off under tensor
            parallelism, where capturing the collectives is untested).

    Example:
        >>> engine = Engine(model, num_blocks=1024, tokenizer=tok)  # doctest: +SKIP
        >>> rid = engine.add_request("Hello", SamplingParams(max_new_tokens=8, temperature=0))  # doctest: +SKIP
        >>> while engine.has_unfinished():  # doctest: +SKIP
        ...     for update in engine.step():
        ...         print(update.request_id, update.new_token_ids)
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        num_blocks: int | None = None,
        block_size: int = 16,
        memory_fraction: float | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        enable_prefix_caching: bool = True,
        tokenizer=None,
        stream_text: bool = False,
        cuda_graphs: bool = True,
    ) -> None:
        _check_positive(block_size=block_size, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens)
        if num_blocks is not None:
            _check_positive(num_blocks=num_blocks)
        _prepare_model(model)
        self.model = model
        self.tokenizer = tokenizer
        self.stream_text = stream_text and tokenizer is not None
        from ..distributed import BroadcastSampler, TensorParallelState, local_kv_heads, tensor_parallel_size

        # Tensor-parallel ranks hold only their KV heads and run this engine in lockstep (hf_paged.distributed).
        num_layers, num_kv_heads, head_dim = local_kv_heads(model)
        self.tp = TensorParallelState(model) if tensor_parallel_size(model) > 1 else None
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
        if num_blocks is None:
            num_blocks = default_num_blocks(model, block_size, memory_fraction, max_num_seqs)
        if self.tp is not None:
            num_blocks = self.tp.agree_min(num_blocks)
        self.kv_pool = KVPool(
            num_layers=num_layers, num_blocks=num_blocks, block_size=block_size, num_kv_heads=num_kv_heads,
            head_dim=head_dim, dtype=dtype, device=device,
        )
        self.block_size = block_size
        self.block_manager = BlockManager(self.kv_pool.blocks, block_size, enable_prefix_caching)
        self._seq_ids = itertools.count()
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens, lambda: next(self._seq_ids))
        self.runner = ModelRunner(
            model, self.kv_pool, max_num_seqs=max_num_seqs, cuda_graphs=cuda_graphs and self.tp is None
        )
        self.sampler = Sampler() if self.tp is None else BroadcastSampler(Sampler(), self.tp)
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.eos_token_ids = _eos_token_ids(model)
        self._requests: dict[str, Request] = {}
        self._pending: list[RequestUpdate] = []  # outputs decided outside a step (errors, aborts)
        self._request_ids = itertools.count()
        self.reset_stats()

    # -- requests ---------------------------------------------------------------------------------

    def add_request(
        self,
        prompt: Prompt,
        sampling_params: SamplingParams | dict | None = None,
        request_id: str | None = None,
    ) -> str:
        """Queue a prompt (text, with a tokenizer, or token ids); returns its request id.

        A bad request (empty prompt, unknown token ids, invalid parameters, more tokens than the
        pool holds...) is not raised: it finishes at the next `step` with ``finish_reason="error"``
        and a message in ``error``. Only a duplicate ``request_id`` raises ``ValueError``.
        """
        if request_id is None:
            request_id = f"req-{next(self._request_ids)}"
            while request_id in self._requests:
                request_id = f"req-{next(self._request_ids)}"
        elif request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        text = prompt if isinstance(prompt, str) else None
        params = None
        try:
            params = SamplingParams.coerce(sampling_params)
            token_ids = self._tokenize(prompt)
            self._check_request(token_ids, params)
        except ValueError as e:
            request = Request(request_id, token_ids if "token_ids" in locals() else [], params or SamplingParams(),
                              frozenset(), prompt=text, error=str(e))
            self._pending.append(self._complete(request, RequestUpdate(request_id, 0, [], finish_reason="error")))
            return request_id
        stops = set(params.stop_token_ids if params.stop_token_ids is not None else self.eos_token_ids)
        if params.ignore_eos:
            stops -= set(self.eos_token_ids)
        request = Request(request_id, token_ids, params, frozenset(stops), prompt=text,
                          priority=request_priority(request_id, token_ids, params))
        seq = Sequence(next(self._seq_ids), request, 0, token_ids)
        seq.pending_forks = params.n - 1
        request.sequences.append(seq)
        self._requests[request_id] = request
        self.scheduler.add(seq)
        return request_id

    def abort(self, request_id: str) -> bool:
        """Stop a queued or running request and free its blocks; it is reported (``"abort"``) by the next `step`.

        Returns False when the request is unknown or already finished.
        """
        request = self._requests.get(request_id)
        if request is None or request.finished:
            return False
        request.aborted = True
        for seq in request.sequences:
            self.scheduler.finish(seq, FinishReason.ABORT)
        self._pending.append(self._complete(request, RequestUpdate(request_id, 0, [], finish_reason="abort")))
        return True

    def has_unfinished(self) -> bool:
        """Whether any request is queued, running, or finished but not yet reported by `step`."""
        return bool(self._requests) or bool(self._pending)

    # -- stepping ---------------------------------------------------------------------------------

    def step(self) -> list[RequestUpdate]:
        """Run one scheduling step and forward; returns the updates of the requests it advanced."""
        updates, self._pending = self._pending, []
        if not self.scheduler.has_unfinished:
            return updates
        t0 = time.perf_counter()
        if self._t_start is None:
            self._t_start = t0
        out = self.scheduler.schedule()
        if out.empty:
            # Nothing fits although nothing runs: only possible for a request no pool could hold,
            # which add_request rejects; fail the head request rather than spin.
            seq = self.scheduler.waiting[0]
            updates.append(self._fail(seq.request, "the request does not fit into the KV pool"))
            return updates
        self._peak_blocks = max(self._peak_blocks, self.kv_pool.blocks.num_used)
        samplers = [s for c in out.chunks for s in c.samplers]
        prompt_rows = _prompt_logprob_rows(out)
        try:
            logits = self.runner.execute(
                out, self.block_manager.take_pending_copies(), [(c, off, n) for c, off, n, _ in prompt_rows]
            )
            sampled = self.sampler(logits[: len(samplers)], samplers) if samplers else None
            if prompt_rows:
                _store_prompt_logprobs(out, prompt_rows, logits[len(samplers) :])
        except Exception as e:  # a failing forward fails this step's requests, not the engine
            logger.exception("engine step failed")
            failed = {id(c.seq.request): c.seq.request for c in out.chunks}
            for request in failed.values():
                updates.append(self._fail(request, f"model step failed: {type(e).__name__}: {e}"))
            return updates
        updates.extend(self._postprocess(out, samplers, sampled))
        self._record_step_stats()
        self._t_end = time.perf_counter()
        self._steps += 1
        return updates

    def _postprocess(self, out: SchedulerOutput, samplers: list[Sequence], sampled) -> list[RequestUpdate]:
        updates: list[RequestUpdate] = []
        row = 0
        now = time.perf_counter()
        for chunk in out.chunks:
            end = chunk.start + chunk.num_tokens
            if not chunk.samplers:
                chunk.seq.num_computed_tokens = end
                self.block_manager.commit(chunk.seq)
                continue
            for seq in chunk.samplers:
                token = sampled.token_ids[row]
                lp = sampled.logprobs[row] if sampled.logprobs is not None else None
                row += 1
                seq.num_computed_tokens = end
                seq.token_ids.append(token)
                if seq.logprobs is not None and lp is not None:
                    seq.logprobs.append(lp)
                self.block_manager.commit(seq)
                self._output_tokens += 1
                request = seq.request
                if request.first_token_time is None:
                    request.first_token_time = now
                update = RequestUpdate(request.request_id, seq.sample_index, seq.take_new_tokens())
                reason = self._check_stop(seq, token, update)
                if reason is not None:
                    self.scheduler.finish(seq, reason)
                    update.finish_reason = reason.value
                    if request.finished:
                        self._complete(request, update)
                updates.append(update)
        return updates

    def _check_stop(self, seq: Sequence, token: int, update: RequestUpdate) -> FinishReason | None:
        params = seq.request.params
        if seq.detokenizer is None and self.tokenizer is not None and (self.stream_text or params.stop):
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, seq.num_prompt_tokens)
        if seq.detokenizer is not None:
            delta = seq.detokenizer.step(seq.token_ids)
            update.text_delta = delta
            if params.stop:
                at = seq.detokenizer.find_stop(params.stop, len(delta))
                if at is not None:
                    seq.stop_text_end = at
                    return FinishReason.STOP
        if token in seq.request.stop_token_ids:
            return FinishReason.STOP
        if seq.num_output_tokens >= params.max_new_tokens:
            return FinishReason.LENGTH
        return None

    def _fail(self, request: Request, message: str) -> RequestUpdate:
        request.error = message
        for seq in request.sequences:
            self.scheduler.finish(seq, FinishReason.ERROR)
        return self._complete(request, RequestUpdate(request.request_id, 0, [], finish_reason="error"))

    def _complete(self, request: Request, update: RequestUpdate) -> RequestUpdate:
        request.finish_time = time.perf_counter()
        self._requests.pop(request.request_id, None)
        self._finished += 1
        self._prompt_tokens += len(request.prompt_token_ids)
        update.output = self._output(request)
        return update

    def _output(self, request: Request) -> GenerationOutput:
        samples = []
        for seq in sorted(request.sequences, key=lambda s: s.sample_index):
            samples.append(
                SampleOutput(
                    index=seq.sample_index,
                    token_ids=seq.output_token_ids,
                    text=self._final_text(seq),
                    finish_reason=seq.finish_reason.value if seq.finish_reason else None,
                    logprobs=seq.logprobs,
                )
            )
        if request.error is not None:
            samples = []
        ttft = request.first_token_time - request.arrival_time if request.first_token_time else None
        return GenerationOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            samples=samples,
            error=request.error,
            time_to_first_token=ttft,
            total_time=(request.finish_time or time.perf_counter()) - request.arrival_time,
            num_cached_tokens=request.num_cached_tokens,
            prompt_logprobs=request.prompt_logprobs if request.error is None else None,
        )

    def _final_text(self, seq: Sequence) -> str | None:
        if self.tokenizer is None:
            return None
        text = self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)
        if seq.stop_text_end is not None:
            # Cut before the stop string (found incrementally; located again in the full decode,
            # whose spacing may differ from the streamed deltas).
            found = [i for i in (text.find(s) for s in seq.request.params.stop) if i >= 0]
            if found:
                text = text[: min(found)]
        return text

    # -- driving loops ----------------------------------------------------------------------------

    def iter_updates(self) -> Iterator[RequestUpdate]:
        """Step until every request is done, yielding each update (requests may be added meanwhile)."""
        while self.has_unfinished():
            yield from self.step()

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | dict | None = None) -> Iterator[RequestUpdate]:
        """Add one request and yield its updates as they come (other requests advance too)."""
        request_id = self.add_request(prompt, sampling_params)
        while True:
            for update in self.step():
                if update.request_id == request_id:
                    yield update
                    if update.finished:
                        return

    def generate(
        self,
        prompts: SequenceABC[Prompt],
        sampling_params: SamplingParams | dict | SequenceABC[SamplingParams | dict] | None = None,
        *,
        progress: bool = False,
    ) -> list[GenerationOutput]:
        """Run ``prompts`` to completion; outputs in input order (see `hf_paged.generate_batch`)."""
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(prompts):
                raise ValueError(
                    f"sampling_params has {len(sampling_params)} entries for {len(prompts)} prompts"
                )
            per_prompt = list(sampling_params)
        else:
            per_prompt = [sampling_params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, per_prompt)]
        wanted = set(ids)
        results: dict[str, GenerationOutput] = {}
        from tqdm.auto import tqdm

        start_tokens, t0 = self._output_tokens, time.perf_counter()
        with tqdm(total=len(ids), disable=not progress, desc="hf_paged", unit="req", dynamic_ncols=True) as bar:
            while len(results) < len(ids) and self.has_unfinished():
                for update in self.step():
                    if update.output is not None and update.request_id in wanted:
                        results[update.request_id] = update.output
                        bar.update(1)
                if progress:
                    rate = (self._output_tokens - start_tokens) / max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix_str(f"{rate:,.0f} out tok/s", refresh=False)
        return [results[i] for i in ids]

    # -- stats ------------------------------------------------------------------------------------

    def reset_stats(self) -> None:
        """Start the counters of `stats` afresh (the prefix cache itself is kept)."""
        self._t_start: float | None = None
        self._t_end: float | None = None
        self._steps = 0
        self._finished = 0
        self._prompt_tokens = 0
        self._output_tokens = 0
        self._peak_blocks = self.kv_pool.blocks.num_used
        self._waste_slots = 0
        self._reserved_slots = 0
        self.block_manager.prefix_hit_tokens = 0
        self.block_manager.prefix_query_tokens = 0
        self.scheduler.num_preemptions = 0

    def _record_step_stats(self) -> None:
        seen: set[int] = set()
        waste = 0
        for seq in self.scheduler.running:
            if not seq.block_table or seq.block_table[-1] in seen:
                continue
            seen.add(seq.block_table[-1])
            waste += len(seq.block_table) * self.block_size - seq.num_computed_tokens
        self._waste_slots += waste
        self._reserved_slots += self.kv_pool.blocks.num_used * self.block_size

    def stats(self) -> EngineStats:
        """Throughput, KV usage (peak blocks, waste), prefix-cache hit rate and preemptions."""
        elapsed = (self._t_end - self._t_start) if self._t_start is not None and self._t_end is not None else 0.0
        bm = self.block_manager
        return EngineStats(
            requests_finished=self._finished,
            prompt_tokens=self._prompt_tokens,
            output_tokens=self._output_tokens,
            steps=self._steps,
            elapsed_s=elapsed,
            num_blocks=self.kv_pool.num_blocks,
            block_size=self.block_size,
            kv_pool_bytes=self.kv_pool.nbytes,
            peak_blocks_used=self._peak_blocks,
            kv_waste=self._waste_slots / self._reserved_slots if self._reserved_slots else 0.0,
            prefix_hit_rate=bm.prefix_hit_rate,
            prefix_hit_tokens=bm.prefix_hit_tokens,
            preemptions=self.scheduler.num_preemptions,
        )

    # -- validation -------------------------------------------------------------------------------

    def _tokenize(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer (pass tokenizer=...), or pass token ids")
            return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        if isinstance(prompt, torch.Tensor):
            if prompt.dim() != 1:
                raise ValueError(f"a tensor prompt must be 1D token ids, got shape {tuple(prompt.shape)}")
            return prompt.tolist()
        if not isinstance(prompt, (list, tuple)) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            raise ValueError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        return list(prompt)

    def _check_request(self, token_ids: list[int], params: SamplingParams) -> None:
        if not token_ids:
            raise ValueError("the prompt is empty")
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer (pass tokenizer=...)")
        needed = len(token_ids) + params.max_new_tokens
        capacity = self.block_manager.capacity_tokens
        if needed > capacity:
            raise ValueError(
                f"the prompt ({len(token_ids)} tokens) plus max_new_tokens ({params.max_new_tokens}) needs "
                f"{needed} KV slots, more than the whole pool holds ({self.kv_pool.num_blocks} blocks of "
                f"{self.block_size} = {capacity}); raise num_blocks or lower max_new_tokens"
            )


def _prompt_logprob_rows(out: SchedulerOutput) -> list[tuple[int, int, int, int]]:
    """Positions of this step whose logits give wanted prompt log-probabilities.

    One ``(chunk index, offset in the chunk, count, first prompt position scored)`` per chunk that
    computes positions ``q`` with ``next - 1 <= q < num_prompt_tokens - 1`` of a request that asked
    for ``prompt_logprobs`` (the logits at ``q`` score prompt token ``q + 1``).
    """
    rows = []
    for i, chunk in enumerate(out.chunks):
        request = chunk.seq.request
        if request.prompt_logprobs is None:
            continue
        lo = max(chunk.start, request.prompt_logprobs_next - 1)
        hi = min(chunk.start + chunk.num_tokens, len(request.prompt_token_ids) - 1)
        if hi > lo:
            rows.append((i, lo - chunk.start, hi - lo, lo + 1))
    return rows


# Rows turned into log-probabilities at once: bounds the float32 [rows, vocab] temporaries.
_LOGPROB_ROWS_PER_PASS = 512


def _store_prompt_logprobs(out: SchedulerOutput, rows: list[tuple[int, int, int, int]], logits: torch.Tensor) -> None:
    """Fill the requests' ``prompt_logprobs`` from the extra logits rows of a step."""
    targets: list[int] = []
    slots: list[tuple[list, int]] = []
    top_k = 0
    for chunk_index, _, count, first in rows:
        request = out.chunks[chunk_index].seq.request
        targets.extend(request.prompt_token_ids[first : first + count])
        slots.extend((request.prompt_logprobs, p) for p in range(first, first + count))
        top_k = max(top_k, request.params.prompt_logprobs)
        request.prompt_logprobs_next = first + count
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
    row = 0
    for chunk_index, _, count, _ in rows:
        k = out.chunks[chunk_index].seq.request.params.prompt_logprobs
        for _ in range(count):
            slot, pos = slots[row]
            top = dict(zip(tops[row][:k], top_vals[row][:k])) if k else {}
            slot[pos] = (chosen[row], top)
            row += 1


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _text_config(config):
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _prepare_model(model: torch.nn.Module) -> None:
    """Check that ``model`` is a decoder-only causal LM and make sure it runs ``"paged"`` attention."""
    config = getattr(model, "config", None)
    name = type(model).__name__
    if config is None or not hasattr(model, "get_input_embeddings"):
        raise ValueError(f"Engine needs a Transformers causal LM, got {name}")
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"Engine runs decoder-only causal LMs; {name} is an encoder-decoder model")
    can_generate = getattr(model, "can_generate", None)
    if (can_generate is not None and not can_generate()) or model.get_output_embeddings() is None:
        raise ValueError(
            f"Engine needs a causal LM with a language-model head (e.g. AutoModelForCausalLM); {name} has none"
        )
    impl = getattr(config, "_attn_implementation", None)
    if impl != ATTN_IMPLEMENTATION:
        try:
            model.set_attn_implementation(ATTN_IMPLEMENTATION)
        except Exception as e:
            raise ValueError(
                f"{name} uses attn_implementation={impl!r} and could not be switched to "
                f"{ATTN_IMPLEMENTATION!r} ({e}); load it with attn_implementation='paged'"
            ) from e
        logger.warning("switched %s from attn_implementation=%r to %r for the engine", name, impl, ATTN_IMPLEMENTATION)


def _eos_token_ids(model) -> list[int]:
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if eos is not None:
            return [eos] if isinstance(eos, int) else list(eos)
    return []


def default_num_blocks(
    model: torch.nn.Module, block_size: int = 16, memory_fraction: float | None = None, max_num_seqs: int = 256
) -> int:
    """The pool size `Engine` picks for ``model`` when given no ``num_blocks``.

    ``memory_fraction`` (default 0.9 on CUDA) of the device's free memory; on CPU without a fraction,
    room for ``max_num_seqs`` sequences of ``max_position_embeddings`` within a quarter of free RAM.
    """
    from ..distributed import local_kv_heads

    text_config = _text_config(model.config)
    num_layers, num_kv_heads, head_dim = local_kv_heads(model)
    param = next(model.parameters())
    per_block = KVPool.bytes_per_block(num_layers, block_size, num_kv_heads, head_dim, param.dtype)
    if memory_fraction is not None or param.device.type == "cuda":
        return num_blocks_for_memory(memory_fraction or 0.9, param.device, per_block)
    longest = getattr(text_config, "max_position_embeddings", None) or 4096
    wanted = max_num_seqs * -(-longest // block_size)
    return min(wanted, num_blocks_for_memory(0.25, param.device, per_block))
