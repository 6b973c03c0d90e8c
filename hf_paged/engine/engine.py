"""`Engine`: continuous batching over a paged KV pool, one request queue, one forward per step."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator, Sequence as SequenceABC

import torch

from ..cache.geometry import default_num_blocks, kv_geometry, tensor_parallel_size
from ..cache.kv_pool import KVPool
from ..fused_projections import fuse_projections as _fuse_projections
from .block_manager import BlockManager
from .gc_pauses import quiet_gc
from .input_processor import InputProcessor, Prompt, eos_token_ids, per_prompt
from .model_runner import ModelRunner, prepare_model
from .output_processor import OutputProcessor
from .outputs import EngineStats, GenerationOutput, RequestUpdate, SamplerOutput
from .sampler import Sampler, prompt_logprob_rows, sample_step
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import FinishReason, Request
from .stats import StatsRecorder
from .tensor_parallel import BroadcastSampler, TensorParallelState

__all__ = ["Engine"]

logger = logging.getLogger(__name__)


class Engine:
    """Continuous-batching generation engine over a `KVPool` (vLLM-style).

    Requests are queued with `add_request`; each `step` schedules a packed batch of decode tokens
    and prompt chunks, runs one forward, samples, and returns what changed. Memory comes in
    blocks: when they run out the newest request is preempted and recomputed later; full blocks
    are shared across requests with the same prefix. `close` (or ``with Engine(...)``) frees the
    KV pool and CUDA graphs at once.

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
        stream_text: give every `RequestUpdate` a ``text_delta`` (needs ``tokenizer``); per
            request, `add_request`'s ``stream_text`` overrides it.
        cuda_graphs: on CUDA, replay captured graphs for decode-only steps and for other steps of
            up to 4,096 tokens; under tensor parallelism the graphs hold the ranks' NCCL collectives.
        async_scheduling: schedule and launch step N+1 while the device still runs step N; the
            host learns step N's tokens one step later (for stop checks and streaming), and a
            request that stops at step N may compute one more token, which is dropped. Steps with
            penalties, logprobs or prompt logprobs run synchronously. Default: on for CUDA.
        compile_model: ``torch.compile`` the model's decoder layers, in place (the paged-attention
            step is one opaque op, so norms, rotary, activations and residuals fuse around it; all
            layers share one compiled graph, so warm-up compiles one layer). Experimental: fp32 tokens
            equal the eager engine's on CPU and GPU; on an H100 the 1.5B shape went from 35k to 44k
            output tok/s on the uniform workload, with ~25 s more warm-up (README).
        fuse_projections: compute each decoder layer's ``q_proj``/``k_proj``/``v_proj`` and
            ``gate_proj``/``up_proj`` as one matmul per group without gradients, on one GPU and per
            rank under tensor parallelism (`hf_paged.fused_projections`; in place: parameter names,
            values and ``state_dict`` stay as they were, and training the model still reaches every
            parameter). On an H100, 8B shape, compiled: batch-1 decode 7.1 -> 6.6 ms per token,
            uniform workload 6,257 -> 6,350 tok/s (bench/RESULTS.md, session 17). Default: on.

    Example:
        >>> with Engine(model, num_blocks=1024, tokenizer=tok) as engine:  # doctest: +SKIP
        ...     rid = engine.add_request("Hello", SamplingParams(max_new_tokens=8, temperature=0))
        ...     while engine.has_unfinished():
        ...         for update in engine.step():
        ...             print(update.request_id, update.new_token_ids, update.text_delta)
    """

    def __init__(self, model: torch.nn.Module, *, num_blocks: int | None = None, block_size: int = 16,
                 memory_fraction: float | None = None, max_num_seqs: int = 256, max_num_batched_tokens: int = 8192,
                 enable_prefix_caching: bool = True, tokenizer=None, stream_text: bool = False,
                 cuda_graphs: bool = True, async_scheduling: bool | None = None, compile_model: bool = False,
                 fuse_projections: bool = True) -> None:
        _check_positive(block_size=block_size, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                        **({} if num_blocks is None else {"num_blocks": num_blocks}))
        prepare_model(model)
        if fuse_projections:
            _fuse_projections(model)
        self.model = model
        self.tokenizer = tokenizer
        self.stream_text = stream_text and tokenizer is not None
        # Tensor-parallel ranks hold only their KV heads and run this engine in lockstep (hf_paged.distributed).
        self.tp = TensorParallelState(model) if tensor_parallel_size(model) > 1 else None
        if num_blocks is None:
            num_blocks = default_num_blocks(model, block_size, memory_fraction, max_num_seqs)
        if self.tp is not None:
            num_blocks = self.tp.agree_min(num_blocks)
        num_layers, num_kv_heads, head_dim = kv_geometry(model)
        param = next(model.parameters())
        self.kv_pool = KVPool(num_layers=num_layers, num_blocks=num_blocks, block_size=block_size,
                              num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=param.dtype, device=param.device)
        self.block_size = block_size
        self.block_manager = BlockManager(self.kv_pool.blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens)
        started = time.perf_counter()
        self.runner = ModelRunner(model, self.kv_pool, self.block_manager, max_num_seqs=max_num_seqs,
                                  max_num_batched_tokens=max_num_batched_tokens, cuda_graphs=cuda_graphs,
                                  compile_model=compile_model)
        if self.kv_pool.device.type == "cuda":
            self.runner.warm_up()
        #: Seconds spent at construction compiling kernels and capturing CUDA graphs (CUDA only).
        self.warmup_s = time.perf_counter() - started
        self.sampler = Sampler() if self.tp is None else BroadcastSampler(Sampler(), self.tp)
        if async_scheduling is None:
            async_scheduling = self.kv_pool.device.type == "cuda"
        # Ranks stay in lockstep: what overlaps is decided from the requests alone, never from timing.
        self.async_scheduling = async_scheduling
        self._in_flight: _LaunchedStep | None = None  # launched, its tokens not read yet
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.inputs = InputProcessor(tokenizer, vocab_size=self.vocab_size, eos_token_ids=eos_token_ids(model),
                                     capacity_tokens=self.block_manager.capacity_tokens)
        self.outputs = OutputProcessor(tokenizer)
        self._stats = StatsRecorder(self.kv_pool, self.scheduler)
        self._requests: dict[str, Request] = {}
        self._pending: list[RequestUpdate] = []  # outputs decided outside a step (errors, aborts)
        self._request_ids = itertools.count()
        self._closed = False

    def add_request(self, prompt: Prompt, sampling_params: SamplingParams | dict | None = None,
                    request_id: str | None = None, *, stream_text: bool | None = None,
                    detokenize: bool = True) -> str:
        """Queue a prompt (text, with a tokenizer, or token ids); returns its request id.

        ``detokenize=False``: its updates and output carry token ids only, no text (a client that
        decodes them itself, e.g. `EngineProcessClient`); a request with stop strings is decoded anyway.

        A bad request (empty prompt, unknown token ids, invalid parameters, more tokens than the
        pool holds...) is not raised: it finishes at the next `step` with ``finish_reason="error"``
        and a message in ``error``. Only a duplicate ``request_id`` raises ``ValueError``.
        """
        if self._closed:
            raise RuntimeError("this engine is closed")
        if request_id is None:
            request_id = next(i for i in (f"req-{n}" for n in self._request_ids) if i not in self._requests)
        elif request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        try:
            request = self.inputs.process(request_id, prompt, sampling_params,
                                          stream_text=self.stream_text if stream_text is None else stream_text,
                                          detokenize=detokenize)
        except ValueError as e:
            request = Request(request_id, [], SamplingParams(), frozenset(),
                              prompt=prompt if isinstance(prompt, str) else None, error=str(e))
            self._pending.append(self._complete(request, reason="error"))
            return request_id
        self._requests[request_id] = request
        self.scheduler.add_request(request)
        return request_id

    def abort(self, request_id: str) -> bool:
        """Stop a queued or running request and free its blocks; it is reported (``"abort"``) by the next `step`.

        Returns False when the request is unknown or already finished.
        """
        request = self._requests.get(request_id)
        if request is None or request.finished:
            return False
        request.aborted = True
        self.scheduler.finish_request(request, FinishReason.ABORT)
        self._pending.append(self._complete(request, reason="abort"))
        return True

    def abort_all(self) -> None:
        """`abort` every request not finished yet."""
        for request_id in list(self._requests):
            self.abort(request_id)

    @property
    def num_unfinished(self) -> int:
        """Requests queued, running, or finished but not yet reported by `step`."""
        return len(self._requests)

    def has_unfinished(self) -> bool:
        """Whether any request is queued, running, or finished but not yet reported by `step`."""
        return bool(self._requests) or bool(self._pending)

    def step(self) -> list[RequestUpdate]:
        """Schedule, run one forward, sample, update the sequences, report: the updates of this step.

        With async scheduling the updates are those of the step launched by the previous call,
        whose tokens the host reads while the device runs this one.
        """
        updates, self._pending = self._pending, []
        if not self.scheduler.has_unfinished:
            return updates + self._finish_in_flight()
        out = self.scheduler.schedule()
        if out.empty:
            if self._in_flight is not None:  # the running sequences wait for their last tokens
                return updates + self._finish_in_flight()
            # Nothing fits although nothing runs (input processing rejects what no pool holds): fail, never spin.
            return updates + [self._fail(self.scheduler.waiting[0].request, "the request does not fit the KV pool")]
        self._stats.step_started()
        rows = prompt_logprob_rows(out)
        samplers = out.samplers
        # Logprobs are turned into Python values at once; penalties read every token on the host.
        if rows or out.sync_sampling:
            on_host, overlap = bool(rows) or any(s.request.params.logprobs is not None for s in samplers), False
        else:
            on_host, overlap = False, self.async_scheduling
        if not overlap:  # this step reads host state the step in flight has not written yet
            updates += self._finish_in_flight()
        previous = self._in_flight.tokens if self._in_flight is not None else None
        try:
            copies = self.block_manager.take_pending_copies()
            logits = self.runner.execute(out, copies, [(r.chunk_index, r.offset, r.count) for r in rows], previous)
            if on_host:
                launched = _LaunchedStep(out, sampled=sample_step(self.sampler, out, logits, rows))
            else:
                launched = _LaunchedStep(out, tokens=self.sampler.tokens(logits, samplers))
        except Exception as e:  # a failing forward fails this step's requests, not the engine
            logger.exception("engine step failed")
            failed = {id(c.seq.request): c.seq.request for c in out.chunks}
            updates += [self._fail(r, f"model step failed: {type(e).__name__}: {e}") for r in failed.values()]
            return updates + self._finish_in_flight()
        if overlap:
            launched, self._in_flight = self._in_flight, launched
            return updates + (self._process(launched) if launched is not None else [])
        return updates + self._process(launched)

    def _finish_in_flight(self) -> list[RequestUpdate]:
        launched, self._in_flight = self._in_flight, None
        return self._process(launched) if launched is not None else []

    def _process(self, launched: _LaunchedStep) -> list[RequestUpdate]:
        """Advance the sequences of a launched step by its tokens and turn them into updates."""
        advanced = self.scheduler.update_from_output(launched.out, launched.result())
        for seq in self.outputs.find_stop_strings(advanced):
            self.scheduler.finish(seq, FinishReason.STOP)
        updates = []
        for update in self.outputs.updates(advanced):
            if update.output is not None:
                self._forget(self._requests[update.request_id])
            updates.append(update)
        self._stats.step_done(len(advanced))
        return updates

    def _fail(self, request: Request, message: str) -> RequestUpdate:
        request.error = message
        self.scheduler.finish_request(request, FinishReason.ERROR)
        return self._complete(request, reason="error")

    def _complete(self, request: Request, reason: str) -> RequestUpdate:
        """The update that reports ``request`` finished outside a step (error, abort)."""
        self._forget(request)
        return RequestUpdate(request.request_id, 0, [], finish_reason=reason, output=self.outputs.output(request))

    def _forget(self, request: Request) -> None:
        self._requests.pop(request.request_id, None)
        self._stats.request_finished(request)

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

    def generate(self, prompts: SequenceABC[Prompt],
                 sampling_params: SamplingParams | dict | SequenceABC[SamplingParams | dict] | None = None,
                 *, progress: bool = False) -> list[GenerationOutput]:
        """Run ``prompts`` to completion; outputs in input order (see `hf_paged.generate_batch`)."""
        from tqdm.auto import tqdm

        ids = [self.add_request(p, sp) for p, sp in zip(prompts, per_prompt(sampling_params, len(prompts)))]
        wanted = set(ids)
        results: dict[str, GenerationOutput] = {}
        start = self._stats.output_tokens
        with quiet_gc(), tqdm(total=len(ids), disable=not progress, desc="hf_paged", unit="req",
                              dynamic_ncols=True) as bar:
            while len(results) < len(ids) and self.has_unfinished():
                for update in self.step():
                    if update.output is not None and update.request_id in wanted:
                        results[update.request_id] = update.output
                        bar.update(1)
                if progress:
                    rate = (self._stats.output_tokens - start) / max(bar.format_dict["elapsed"], 1e-9)
                    bar.set_postfix_str(f"{rate:,.0f} out tok/s", refresh=False)
        return [results[i] for i in ids]

    def stats(self) -> EngineStats:
        """Throughput, KV usage (peak blocks, waste), prefix-cache hit rate and preemptions."""
        return self._stats.snapshot()

    def reset_prefix_cache(self) -> None:
        """Forget every cached prompt prefix (e.g. after swapping weights, or between benchmark runs)."""
        self.block_manager.reset_prefix_cache()

    def reset_stats(self) -> None:
        """Start the counters of `stats` afresh (the prefix cache itself is kept)."""
        self._stats.reset()

    def close(self) -> None:
        """Abort what is in flight and free the KV pool and CUDA graphs now (idempotent)."""
        if self._closed:
            return
        self.abort_all()
        self._pending.clear()
        self._in_flight = None
        self._closed = True
        self.runner.close()
        self.kv_pool.release()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _LaunchedStep:
    """A step whose forward and sampling are queued on the device.

    Its tokens are either known already (``sampled``, a synchronous step) or still on the device
    (``tokens``): they are copied to pinned host memory at once, and `result` waits for that copy.
    """

    __slots__ = ("out", "sampled", "tokens", "_host", "_ready")

    def __init__(self, out, *, sampled: SamplerOutput | None = None, tokens: torch.Tensor | None = None) -> None:
        self.out, self.sampled, self.tokens = out, sampled, tokens
        self._host = self._ready = None
        if tokens is not None and tokens.device.type == "cuda":
            self._host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self._host.copy_(tokens, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()

    def result(self) -> SamplerOutput:
        if self.sampled is None:
            if self._ready is not None:
                self._ready.synchronize()
                self.sampled = SamplerOutput(self._host.tolist())
            else:
                self.sampled = SamplerOutput(self.tokens.tolist())
        return self.sampled


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
