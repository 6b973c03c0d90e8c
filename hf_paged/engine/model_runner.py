"""Runs one scheduled step: packs the batch, builds the attention metadata, calls the model once."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from ..cache.geometry import max_model_len
from ..cache.kv_pool import KVPool
from ..cache.metadata import PagedAttentionMetadata
from ..registration import ATTN_IMPLEMENTATION
from ..tp_all_reduce import epilogue_fusion
from .block_manager import BlockManager
from ..kernels import get_backend
from .host_copy import upload
from ..cuda_graphs import DecodeGraphs, MixedGraphs, forward_logits, mixed_graphs_supported, packed_forward_mask
from .sampling_params import SamplingParams
from .scheduler import ScheduledChunk, SchedulerOutput
from .sequence import Request, Sequence as SequenceState

__all__ = ["ModelRunner", "StepInputs", "prepare_model"]

logger = logging.getLogger(__name__)


def _compile_layers(model: torch.nn.Module) -> None:
    """``torch.compile`` each of the decoder's layers in place (``nn.Module.compile``).

    Every layer runs the same compiled code, so warm-up compiles one layer, not the whole stack
    (minutes less for a 32-layer model, and what makes compiling a tensor-parallel model practical).
    The paged-attention step inside is one opaque op (`hf_paged.attention`) that takes its layer
    as an argument; for that, torch.compile is told to treat ints on modules (each layer's
    ``layer_idx``) as inputs rather than constants: a process-wide setting.

    The recompile limit is raised to 16: by the end of warm-up the layer holds eight compiled entries
    (one-token steps, one-sequence steps and decode graphs each specialise a shape), so at torch's
    default of 8 every mixed-step graph captured the layers running eagerly, silently. Compiling with
    ``dynamic=True`` instead needs five entries but leaves the hidden sizes symbolic too (uniform
    workload on an H100: 41.4k vs 43.5k output tok/s).
    """
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    stacks = [m for m in decoder.children() if isinstance(m, torch.nn.ModuleList)]
    if not stacks:
        raise ValueError(f"compile_model=True needs the decoder's layers in an nn.ModuleList; "
                         f"{type(decoder).__name__} has none")
    torch._dynamo.config.allow_unspec_int_on_nn_module = True
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16)
    # Under TP the row-parallel sums take their residual adds and RMSNorms with them (`epilogue_fusion`).
    options = {"post_grad_custom_post_pass": epilogue_fusion()}
    for stack in stacks:
        for layer in stack:
            layer.compile(options=options)


def prepare_model(model: torch.nn.Module) -> None:
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


class StepInputs:
    """Device tensors of one packed step (``T`` tokens of ``S`` sequences, ``R`` sampled rows)."""

    __slots__ = ("input_ids", "position_ids", "logits_indices", "metadata")

    def __init__(self, input_ids, position_ids, logits_indices, metadata: PagedAttentionMetadata) -> None:
        self.input_ids = input_ids
        self.position_ids = position_ids
        self.logits_indices = logits_indices
        self.metadata = metadata


class _HostStep(NamedTuple):
    """A packed step on the host, before it travels to the device (int64 token-wise, int32 sequence-wise)."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    logits_indices: torch.Tensor
    cu_seqlens: torch.Tensor
    context_lens: torch.Tensor
    block_tables: torch.Tensor
    max_seqlen_q: int
    # [2, F]: positions in ``input_ids`` whose token the previous step is still sampling, and its rows.
    fill: torch.Tensor


class ModelRunner:
    """Owns the model call of the engine: one varlen forward per step, no padding.

    The step's tokens are packed into ``input_ids``/``position_ids`` of shape ``[1, T]``; the
    ``"paged"`` attention function stores their K/V into ``kv_pool`` at ``slot_mapping`` and attends
    over each sequence's block table. Only the rows that sample are projected onto the vocabulary
    (``logits_to_keep``).

    All integer inputs of a step travel in two host buffers (int64 and int32) and two copies.
    With ``cuda_graphs`` (CUDA only; captured by `warm_up`), decode-only steps of up to
    ``max_num_seqs`` sequences whose context fits ``max_context`` replay captured graphs instead
    (`DecodeGraphs`), and so do other steps of up to 4,096 tokens where the kernel backend can size
    its launches from shapes alone (`MixedGraphs`; not with prompt log-probabilities).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        kv_pool: KVPool,
        block_manager: BlockManager,
        *,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        max_context: int | None = None,
        cuda_graphs: bool = False,
        compile_model: bool = False,
    ) -> None:
        self.model = model
        if compile_model:
            _compile_layers(model)
        self.kv_pool = kv_pool
        # Its `BlockTableRows` give each step's block tables; warm-up borrows its blocks.
        self.block_manager = block_manager
        self._max_num_batched_tokens = max_num_batched_tokens
        self.block_size = kv_pool.block_size
        self.device = kv_pool.device
        # Never read: engine steps have no left padding (no kv_start), which lets every kernel backend take them.
        self._mask = packed_forward_mask(self.device)
        self._max_num_seqs = max_num_seqs
        self._graphs = self._mixed_graphs = None
        if cuda_graphs and self.device.type == "cuda":
            if max_context is None:
                max_context = max_model_len(model) or 4096
            max_context = min(max_context, kv_pool.num_blocks * kv_pool.block_size)
            self._graphs = DecodeGraphs(
                model, kv_pool, max_batch=max_num_seqs, max_context=max_context, mask=self._mask
            )
            param = next(model.parameters())
            if getattr(get_backend(self.device, param.dtype), "supports_static_grid", False) and \
                    mixed_graphs_supported(model):
                self._mixed_graphs = MixedGraphs(model, kv_pool, max_seqs=max_num_seqs,
                                                 max_tokens=max_num_batched_tokens, max_context=max_context,
                                                 mask=self._mask)

    def prepare(self, out: SchedulerOutput, extra_rows: Sequence[tuple[int, int, int]] = ()) -> StepInputs:
        """Build the step's device tensors from the scheduled chunks.

        ``extra_rows`` asks for logits of more positions (prompt log-probabilities): each
        ``(chunk index, offset in the chunk, count)`` adds ``count`` rows after the sampled ones.
        """
        return self._upload(self._pack(out, extra_rows))

    def _pack(self, out: SchedulerOutput, extra_rows: Sequence[tuple[int, int, int]]) -> _HostStep:
        chunks = out.chunks
        bs = self.block_size
        ids: list[int] = []
        starts: list[int] = []
        lens: list[int] = []
        rows: list[int] = []
        samples: list[int] = []
        fill_at: list[int] = []
        fill_from: list[int] = []
        for c in chunks:
            seq = c.seq
            known = seq.token_ids[c.start : c.start + c.num_tokens]
            ids.extend(known)
            if len(known) < c.num_tokens:  # async scheduling: the last token is still being sampled
                fill_at.append(len(ids))
                fill_from.append(c.placeholder_row)
                ids.append(0)
            starts.append(c.start)
            lens.append(c.num_tokens)
            rows.append(seq.table_row)
            samples.append(len(c.samplers))
        # numpy, not torch, for these small host arrays: a fraction of the per-call cost.
        num_seqs = len(chunks)
        lens_a = np.array(lens, dtype=np.int64)
        starts_a = np.array(starts, dtype=np.int64)
        cu = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(lens_a, out=cu[1:])
        ctx = starts_a + lens_a
        total = len(ids)
        seq_of_token = np.repeat(np.arange(num_seqs), lens_a)
        positions = np.arange(total) - (cu[:-1] - starts_a)[seq_of_token]
        # The block manager keeps every table in a row of one array: one gather, no Python lists flattened.
        mirror, rows_a = self.block_manager.rows, np.array(rows, dtype=np.intp)
        # At least two columns (the spare one unread): a width of 1 would give a compiled model a shape it
        # specialises on, and a recompile when a batch of short sequences first comes.
        width = max(2, int(mirror.lens[rows_a].max()))
        block_tables = mirror.tables[rows_a, :width]
        slots = block_tables[seq_of_token, positions // bs].astype(np.int64) * bs + positions % bs
        logits_indices = np.repeat(cu[1:] - 1, np.array(samples, dtype=np.int64))
        if extra_rows:
            extra = [int(cu[c]) + off + i for c, off, count in extra_rows for i in range(count)]
            logits_indices = np.concatenate([logits_indices, np.array(extra, dtype=np.int64)])
        t = torch.from_numpy
        return _HostStep(
            t(np.array(ids, dtype=np.int64)), t(positions), t(slots), t(logits_indices), t(cu.astype(np.int32)),
            t(ctx.astype(np.int32)), t(block_tables), max(lens),
            t(np.array([fill_at, fill_from], dtype=np.int64).reshape(2, -1)),
        )

    def _upload(self, host: _HostStep, last_tokens: torch.Tensor | None = None) -> StepInputs:
        total, num_rows = host.input_ids.numel(), host.logits_indices.numel()
        num_seqs, width = host.block_tables.shape
        num_fill = host.fill.shape[1]
        host64 = torch.cat([host.input_ids, host.positions, host.slots, host.logits_indices, host.fill.view(-1)])
        host32 = torch.cat([host.cu_seqlens, host.context_lens, host.block_tables.view(-1)])
        dev64, dev32 = upload(host64, self.device), upload(host32, self.device)
        input_ids, position_ids, slot_mapping, logits_idx, fill_at, fill_from = dev64.split(
            [total, total, total, num_rows, num_fill, num_fill])
        if num_fill and last_tokens is not None:
            input_ids[fill_at] = last_tokens[fill_from]
        cu_d, ctx_d, bt_d = dev32.split([num_seqs + 1, num_seqs, num_seqs * width])
        metadata = PagedAttentionMetadata(
            slot_mapping=slot_mapping,
            cu_seqlens_q=cu_d,
            context_lens=ctx_d,
            block_tables=bt_d.view(num_seqs, width),
            max_seqlen_q=host.max_seqlen_q,
            max_context_len=int(host.context_lens.max()),
        )
        return StepInputs(input_ids[None], position_ids[None], logits_idx, metadata)

    def warm_up(self) -> None:
        """Compile every kernel specialisation a step may launch and capture the graphs, before
        any request is served.

        Runs one sequence's eager forward at each power-of-two query length up to 128 (the kernels
        pick their tiles by query length) over a short and a long context (the long one splits the
        keys), two steps of several sequences and two as large as the engine schedules, in blocks taken
        from the block manager and given back; then captures the graphs.
        """
        graphs, self._graphs, self._mixed_graphs = (self._graphs, self._mixed_graphs), None, None  # eager first
        try:
            self._warm_up_eager()
        finally:
            self._graphs, self._mixed_graphs = graphs
        for g in graphs:
            if g is not None:
                g.capture_all()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _warm_up_eager(self) -> None:
        block_manager, max_num_batched_tokens = self.block_manager, self._max_num_batched_tokens
        request = Request("warm-up", [0], SamplingParams(), frozenset())
        longest = min(block_manager.capacity_tokens // 2, max_model_len(self.model) or 4096, 8192)
        lengths = [q for q in (1, 2, 4, 8, 16, 32, 64, 128) if q <= max_num_batched_tokens]
        for context in sorted({min(128, longest), longest}):
            for q in (q for q in lengths if q <= context):
                seq = SequenceState(-1, request, 0, [0] * context)
                if not block_manager.try_append(seq, context):
                    return
                try:
                    self.execute(SchedulerOutput([ScheduledChunk(seq, context - q, q, [seq])], q))
                finally:
                    block_manager.free(seq)
        # Steps of several sequences of unequal lengths, twice: a compiled model sees its batch dimensions
        # change (and torch.compile makes them dynamic) here, not in the middle of serving.
        for count in (2, 3):
            if 24 * count + 40 * count * (count - 1) // 2 <= max_num_batched_tokens:
                self._warm_up_step([24 + 40 * i for i in range(count)], request)
        # Last, the largest step: the kernels' tiles for long queries, and under tensor parallelism a compiled
        # model's other branch (all-reduces past the symmetric-memory size), which on two H100s was otherwise compiled
        # inside the first served prompt steps. Twice, with one more sequence the second time: that branch's
        # compiled entry then takes any sequence count (with one, the first served prompt step of 16 sequences
        # compiled it again, 3.3 s of a timed TP=2 run).
        if max_num_batched_tokens > lengths[-1]:
            fewest = -(-max_num_batched_tokens // longest)
            for count in (fewest, fewest + 1):
                if count <= min(self._max_num_seqs, max_num_batched_tokens):
                    self._warm_up_step([max_num_batched_tokens // count + (i < max_num_batched_tokens % count)
                                        for i in range(count)], request)

    def _warm_up_step(self, lengths: list[int], request: Request) -> None:
        """One step of whole prompts of ``lengths`` tokens, when their blocks are free."""
        block_manager = self.block_manager
        seqs = [SequenceState(-1 - i, request, 0, [0] * n) for i, n in enumerate(lengths)]
        taken = [s for s in seqs if block_manager.try_append(s, len(s.token_ids))]
        try:
            if len(taken) == len(seqs):
                self.execute(SchedulerOutput([ScheduledChunk(s, 0, len(s.token_ids), [s]) for s in seqs],
                                             sum(lengths)))
        finally:
            for s in taken:
                block_manager.free(s)

    def close(self) -> None:
        """Drop the captured graphs and their memory pool."""
        self._graphs = self._mixed_graphs = None

    @torch.inference_mode()
    def execute(
        self,
        out: SchedulerOutput,
        block_copies: list[tuple[int, int]] | None = None,
        extra_rows: Sequence[tuple[int, int, int]] = (),
        last_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the step; returns the ``[R, vocab]`` logits of the sampled rows, in chunk order,
        followed by those of ``extra_rows`` (see `prepare`).

        ``last_tokens`` are the previous step's sampled tokens, still on the device: the input
        tokens the host does not know yet (async scheduling) are read from them.
        """
        if block_copies:
            src, dst = zip(*block_copies)
            self.kv_pool.copy_blocks(list(src), list(dst))
        host = self._pack(out, extra_rows)
        num_seqs = host.block_tables.shape[0]
        decode_only = host.input_ids.numel() == num_seqs == host.logits_indices.numel()
        max_context_len = int(host.context_lens.max())
        if self._graphs is not None and decode_only and self._graphs.fits(num_seqs, max_context_len):
            return self._graphs.run(host.input_ids, host.positions, host.slots, host.context_lens, host.block_tables,
                                    host.fill, last_tokens)
        mixed = self._mixed_graphs
        if mixed is not None and not extra_rows and mixed.fits(host.input_ids.numel(), num_seqs,
                                                               host.logits_indices.numel(), max_context_len):
            return mixed.run(host, last_tokens)
        inputs = self._upload(host, last_tokens)
        return forward_logits(self.model, inputs.input_ids[0], inputs.position_ids[0], inputs.logits_indices,
                              inputs.metadata, self.kv_pool, self._mask)
