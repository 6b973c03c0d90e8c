"""CUDA graphs of decode-only steps: the model's per-layer Python and kernel launches, replayed.

A decode step feeds one token per sequence, so its shapes depend only on the batch size. Batches
are padded up to a bucket (padded rows own no slot and see no key); each bucket's forward is
captured once over static input buffers, and a step copies its inputs into those buffers and
replays. The kernels size their grids from ``max_context`` (an upper bound), never from tensor
values, which is what makes them capturable.
"""

from __future__ import annotations

import bisect

import torch

from .cache.kv_pool import KVPool
from .cache.metadata import PagedAttentionMetadata

__all__ = ["DecodeGraphs", "MixedGraphs", "capture_graph", "forward_logits", "mixed_graphs_supported",
           "packed_forward_mask"]

_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


class DecodeGraphs:
    """Captures (once, per bucket) and replays decode forwards of up to ``max_batch`` sequences.

    Args:
        model: the paged model; called exactly as the eager runner calls it.
        kv_pool: the engine's pool (its tensors are read and written in place by the graphs).
        max_batch: the largest decode batch (the engine's ``max_num_seqs``).
        max_context: the longest sequence a decode step may attend over, in tokens.
        mask: the runner's dummy 4D mask (see `ModelRunner`).
    """

    def __init__(self, model, kv_pool: KVPool, *, max_batch: int, max_context: int, mask: torch.Tensor) -> None:
        self._model = model
        self._kv_pool = kv_pool
        self._mask = mask
        self.buckets = [b for b in _BUCKETS if b < max_batch] + [max_batch]
        bs = kv_pool.block_size
        self.max_context = -(-max_context // bs) * bs
        device, n = kv_pool.device, max_batch
        # int64 inputs travel in one copy: token ids | positions | slots (-1: padding, store nothing)
        # | positions and source rows of the tokens still being sampled by the previous step. Inference
        # tensors, like the eager steps' inputs: a compiled model's guards check dispatch keys, and unlike
        # ones would compile its layers once more for graphs (one more entry, and a recompile while serving).
        with torch.inference_mode():
            self._i64 = torch.zeros(5 * n, dtype=torch.int64, device=device)
            self._ids, self._positions, self._slots, self._fill_at, self._fill_from = self._i64.view(5, n)
            self._context_lens = torch.zeros(n, dtype=torch.int32, device=device)
            self._block_tables = torch.zeros(n, self.max_context // bs, dtype=torch.int32, device=device)
            self._cu_seqlens = torch.arange(n + 1, dtype=torch.int32, device=device)  # one query per row, always
            self._kv_start = torch.zeros(n, dtype=torch.int32, device=device)
            self._rows = torch.arange(n, device=device)
        # Two sets of pinned staging buffers, used in turn: with async scheduling the host fills
        # step N+1's while step N's copies may still be in flight (step N-1's are done: the engine
        # has waited for its sampled tokens).
        self._staging = [
            (torch.zeros(5, n, dtype=torch.int64).pin_memory(), torch.zeros(n, dtype=torch.int32).pin_memory(),
             torch.zeros(n, self.max_context // bs, dtype=torch.int32).pin_memory())
            for _ in range(2)
        ]
        self._turn = 0
        self._kv_start_set = False  # whether a step gave kv_start (else it stays zeros)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle()

    @property
    def model(self) -> torch.nn.Module:
        return self._model

    def fits(self, num_seqs: int, max_context_len: int) -> bool:
        return num_seqs <= self.buckets[-1] and max_context_len <= self.max_context

    def bucket(self, num_seqs: int) -> int:
        """The padded batch size a step of ``num_seqs`` sequences replays."""
        return self.buckets[bisect.bisect_left(self.buckets, num_seqs)]

    def captured(self, num_seqs: int) -> bool:
        return self.bucket(num_seqs) in self._graphs

    def run(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        context_lens: torch.Tensor,
        block_tables: torch.Tensor,
        fill: torch.Tensor | None = None,
        last_tokens: torch.Tensor | None = None,
        kv_start: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One decode step from host tensors (``[S]`` each, ``block_tables`` ``[S, W]``); ``[S, V]`` logits.

        ``fill`` (``[2, F]``: rows of ``input_ids`` and rows of ``last_tokens``) names the input
        tokens the previous step is still sampling; they are taken from ``last_tokens`` on the device.
        ``input_ids`` and ``positions`` may instead be device tensors, copied on the device (``model.generate``'s
        steps: its tokens and positions are there already). ``kv_start`` (a device tensor): each row's first
        visible key (left padding); zeros when not given.
        """
        num_seqs, width = block_tables.shape
        bucket = self.bucket(num_seqs)
        host, host_ctx, host_tables = self._staging[self._turn]
        self._turn ^= 1
        num_fill = 0 if fill is None or last_tokens is None else fill.shape[1]
        on_device = input_ids.device.type != "cpu"
        host[:, num_seqs:] = 0
        host[2, num_seqs:] = -1
        if not on_device:
            host[0, :num_seqs] = input_ids
            host[1, :num_seqs] = positions
        host[2, :num_seqs] = slots
        if num_fill:
            host[3:, :num_fill] = fill
        host_ctx[num_seqs:] = 0
        host_ctx[:num_seqs] = context_lens
        host_tables[:num_seqs, :width] = block_tables
        self._i64.copy_(host.view(-1), non_blocking=True)
        self._context_lens.copy_(host_ctx, non_blocking=True)
        # Entries beyond a row's context are never read, so only the used columns travel.
        self._block_tables[:num_seqs, :width].copy_(host_tables[:num_seqs, :width], non_blocking=True)
        if num_fill:
            self._ids[self._fill_at[:num_fill]] = last_tokens[self._fill_from[:num_fill]]
        if on_device:
            self._ids[:num_seqs].copy_(input_ids)
            self._positions[:num_seqs].copy_(positions)
        if kv_start is not None or self._kv_start_set:
            self._kv_start_set = kv_start is not None
            if kv_start is None:
                self._kv_start.zero_()
            else:
                self._kv_start[:num_seqs].copy_(kv_start)
        graph, logits = self._graphs[bucket]
        graph.replay()
        return logits[:num_seqs]

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Capture every bucket, largest first so the smaller ones reuse its memory pool."""
        for bucket in reversed(self.buckets):
            self.capture(bucket)

    @torch.inference_mode()
    def capture(self, num_seqs: int) -> None:
        """Capture the bucket of ``num_seqs`` sequences (again, if it was)."""
        bucket = self.bucket(num_seqs)
        self._graphs[bucket] = self._capture(bucket)

    def _forward(self, bucket: int) -> torch.Tensor:
        metadata = PagedAttentionMetadata(
            slot_mapping=self._slots[:bucket],
            cu_seqlens_q=self._cu_seqlens[: bucket + 1],
            context_lens=self._context_lens[:bucket],
            block_tables=self._block_tables[:bucket],
            max_seqlen_q=1,
            max_context_len=self.max_context,
            kv_start=self._kv_start[:bucket],
        )
        return forward_logits(self._model, self._ids[:bucket], self._positions[:bucket], self._rows[:bucket],
                              metadata, self._kv_pool, self._mask)

    def _capture(self, bucket: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Capture over inputs that touch nothing: no slot to store into, no key to read.
        self._slots.fill_(-1)
        self._context_lens.zero_()
        return capture_graph(self._pool, lambda: self._forward(bucket))


def packed_forward_mask(device: torch.device) -> torch.Tensor:
    """The (never read) 4D mask a packed paged forward passes: Transformers' mask builders return it untouched.
    With no mask and no cache they would instead inspect ``position_ids`` for packed sequences, whose ``.all()`` is a
    device->host sync in the middle of every forward (and breaks graph capture). The ``"paged"`` attention reads
    only the step's metadata (left padding, where there is any, as its ``kv_start``)."""
    return torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device)


def forward_logits(model, input_ids: torch.Tensor, position_ids: torch.Tensor, rows: torch.Tensor,
                   metadata: PagedAttentionMetadata, kv_pool: KVPool, mask: torch.Tensor) -> torch.Tensor:
    """One packed forward of ``model`` (``[T]`` ids and positions): the ``[R, V]`` logits of ``rows``."""
    return model(
        input_ids=input_ids[None],
        position_ids=position_ids[None],
        attention_mask=mask,
        use_cache=False,
        logits_to_keep=rows,
        paged_metadata=metadata,
        paged_kv=kv_pool,
    ).logits[0]


def capture_graph(pool, forward) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Run ``forward`` once on a side stream (compiles kernels, initialises cuBLAS workspaces), then
    capture it into a graph on ``pool`` (``None``: a private pool); returns the graph and its output tensor.
    A forward that cannot be captured (a host sync inside) raises, with the caller's stream current again."""
    current = torch.cuda.current_stream()
    stream = torch.cuda.Stream()
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        forward()
    current.wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, pool=pool):
            out = forward()
    except BaseException:
        torch.cuda.set_stream(current)  # a failed capture_end leaves the capture stream set
        raise
    return graph, out


# Token counts of the mixed-step graphs (steps of more tokens are device-bound and run eagerly).
_TOKEN_BUCKETS = (64, 128, 192, 256, 320, 384, 448, 512, 576, 640, 768, 896, 1024, 1280, 1536, 1792, 2048,
                  2560, 3072, 3584, 4096)
# Steps of more tokens than this run eagerly (what benchmarks call prefill steps).
MAX_MIXED_GRAPH_TOKENS = _TOKEN_BUCKETS[-1]


def mixed_graphs_supported(model) -> bool:
    """Whether ``model``'s logits are its LM head over its decoder's last hidden states, nothing more
    (no soft-capping or scaling of the logits), which is what `MixedGraphs` computes."""
    config = getattr(model, "config", None)
    text = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    scaled = any(getattr(text, name, None) not in (None, 1.0)
                 for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
    return not scaled and hasattr(model, "get_decoder") and model.get_output_embeddings() is not None


class MixedGraphs:
    """Captures (once per token-count bucket) and replays the forward of any step of up to 4,096
    tokens: prompt chunks and decodes together, up to ``max_seqs`` sequences.

    A step is padded to its bucket: padding tokens own no slot and belong to no sequence, padding
    sequences have no query. The attention kernels run with a launch sized from shapes alone
    (``static_grid``), so one graph serves any mix of query lengths. The graph ends at the rows
    that sample (decoder hidden states); the LM head runs after the replay, on those rows only.
    """

    def __init__(self, model, kv_pool: KVPool, *, max_seqs: int, max_tokens: int, max_context: int,
                 mask: torch.Tensor) -> None:
        self._model = model
        self._decoder = model.get_decoder()
        self._head = model.get_output_embeddings()
        self._kv_pool = kv_pool
        self._mask = mask
        self.buckets = [b for b in _TOKEN_BUCKETS if b <= max_tokens]
        bs = kv_pool.block_size
        self.max_seqs = s = max_seqs
        self.max_context = -(-max_context // bs) * bs
        t, w = (self.buckets[-1] if self.buckets else 0), self.max_context // bs
        device = kv_pool.device
        # int64: token ids | positions | slots | sampled rows | fill positions | fill sources;
        # int32: cu_seqlens | context lengths | block tables.
        self._split64 = (t, t, t, s, s, s)
        self._split32 = (s + 1, s, s * w)
        with torch.inference_mode():  # as `DecodeGraphs`' inputs
            self._i64 = torch.zeros(sum(self._split64), dtype=torch.int64, device=device)
            self._i32 = torch.zeros(sum(self._split32), dtype=torch.int32, device=device)
            self._ids, self._positions, self._slots, self._rows, self._fill_at, self._fill_from = self._i64.split(
                self._split64)
            self._cu, self._context_lens, tables = self._i32.split(self._split32)
            self._block_tables = tables.view(s, w)
        # Two pinned staging sets, used in turn (see `DecodeGraphs`).
        self._staging = [(torch.zeros_like(self._i64, device="cpu").pin_memory(),
                          torch.zeros_like(self._i32, device="cpu").pin_memory()) for _ in range(2)]
        self._turn = 0
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle()

    def fits(self, num_tokens: int, num_seqs: int, num_rows: int, max_context_len: int) -> bool:
        return (bool(self.buckets) and num_tokens <= self.buckets[-1] and num_seqs <= self.max_seqs
                and num_rows <= self.max_seqs and max_context_len <= self.max_context)

    def run(self, host, last_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """One step from the runner's packed host step; ``[R, V]`` logits of its sampled rows."""
        num_tokens, num_rows = host.input_ids.numel(), host.logits_indices.numel()
        num_seqs, width = host.block_tables.shape
        bucket = self.buckets[bisect.bisect_left(self.buckets, num_tokens)]
        h64, h32 = self._staging[self._turn]
        self._turn ^= 1
        ids, positions, slots, rows, fill_at, fill_from = h64.split(self._split64)
        cu, ctx, tables = h32.split(self._split32)
        ids[:num_tokens] = host.input_ids
        ids[num_tokens:bucket] = 0
        positions[:num_tokens] = host.positions
        positions[num_tokens:bucket] = 0
        slots[:num_tokens] = host.slots
        slots[num_tokens:bucket] = -1
        rows[:num_rows] = host.logits_indices
        rows[num_rows:] = 0
        num_fill = 0 if last_tokens is None else host.fill.shape[1]
        fill_at[:num_fill] = host.fill[0]
        fill_from[:num_fill] = host.fill[1]
        cu[: num_seqs + 1] = host.cu_seqlens
        cu[num_seqs + 1 :] = num_tokens
        ctx[:num_seqs] = host.context_lens
        ctx[num_seqs:] = 0
        tables = tables.view(self.max_seqs, -1)
        tables[:num_seqs, :width] = host.block_tables
        self._i64.copy_(h64, non_blocking=True)
        self._i32.copy_(h32, non_blocking=True)
        if num_fill:
            self._ids[self._fill_at[:num_fill]] = last_tokens[self._fill_from[:num_fill]]
        graph, hidden = self._graphs[bucket]
        graph.replay()
        return self._head(hidden[:num_rows])

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Capture every bucket, largest first so the smaller ones reuse its memory pool."""
        for bucket in reversed(self.buckets):
            self._slots.fill_(-1)
            self._cu.zero_()  # no sequence owns a token: nothing is stored or read
            self._context_lens.zero_()
            self._graphs[bucket] = capture_graph(self._pool, lambda b=bucket: self._forward(b))

    def _forward(self, bucket: int) -> torch.Tensor:
        metadata = PagedAttentionMetadata(
            slot_mapping=self._slots[:bucket],
            cu_seqlens_q=self._cu,
            context_lens=self._context_lens,
            block_tables=self._block_tables,
            max_seqlen_q=bucket,
            max_context_len=self.max_context,
            static_grid=True,
        )
        hidden = self._decoder(
            input_ids=self._ids[None, :bucket],
            position_ids=self._positions[None, :bucket],
            attention_mask=self._mask,
            use_cache=False,
            paged_metadata=metadata,
            paged_kv=self._kv_pool,
        ).last_hidden_state[0]
        return hidden[self._rows]
