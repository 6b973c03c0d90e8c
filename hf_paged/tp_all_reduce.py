"""The sum of row-parallel layers' partial outputs under tensor parallelism: over NVLink for small and mid-sized ones.

Transformers' row-parallel layers (``"rowwise"`` in a ``tp_plan``: Llama's ``o_proj`` and ``down_proj``) sum
their ranks' partial outputs with ``dist.all_reduce``, two per layer. A decode step's messages are small
(tokens x hidden x 2 bytes: 8 KB at batch 1, 2 MB at 256 sequences) and NCCL's protocol latency dominates
them. With symmetric memory each rank reads its peers' partial sums directly, one kernel with a barrier on
either side, capturable in CUDA graphs, no multicast: up to ``ONE_SHOT_MAX_BYTES`` every rank sums the whole
message (``one_shot_all_reduce_copy``), beyond it each sums its share and gathers the others' (two-shot:
``two_shot_all_reduce_out``, half the NVLink traffic per rank on two GPUs). bf16/fp16 messages up to
``lamport_max_bytes`` (by default ``LAMPORT_MAX_BYTES`` on two ranks) skip both barriers: each rank writes its
partials into every rank's receive buffer and the data is its own arrival flag
(`hf_paged.kernels.triton_all_reduce`). `row_parallel_all_reduce` installs
that for a model being loaded; messages over ``max_bytes`` (prefill), other groups and every group that is
not NCCL keep ``dist.all_reduce`` (overlapping those with the layer's matmul, in row chunks, measured slower
on two H200s: NCCL's kernels take the matmul's SMs; bench/RESULTS.md, session 18).

Example:
    >>> with row_parallel_all_reduce():  # doctest: +SKIP
    ...     model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto")
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import operator
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import torch
import torch.distributed as dist

__all__ = ["DEFAULT_MAX_BYTES", "LAMPORT_MAX_BYTES", "ONE_SHOT_MAX_BYTES", "enable_symmetric_memory",
           "epilogue_fusion", "fuse_all_reduce_epilogues", "row_parallel_all_reduce", "symmetric_all_reduce"]

# Messages up to this size take symmetric memory, NCCL's all-reduce beyond; the one-shot kernel up to
# ONE_SHOT_MAX_BYTES, two-shot beyond. Two H100s (bench/all_reduce.py, microseconds in CUDA graphs): one-shot
# 8.9 / 13.2 us at 8 / 512 KB (NCCL 10.9 / 16.2, two-shot 12.5 / 15.4); two-shot 21.2 / 43.8 / 79.8 us at
# 2 / 8 / 16 MB (one-shot 23.7 / 64.0 / 143.6, NCCL 35.0 / 53.8 / 92.5); at 32 MB and beyond NCCL is as fast or faster.
DEFAULT_MAX_BYTES = 16 << 20
ONE_SHOT_MAX_BYTES = 1 << 20
# bf16/fp16 messages up to this size skip both barriers on two ranks (`hf_paged.kernels.triton_all_reduce`, the
# data its own flag). Two H200s (bench/all_reduce.py, session 19): 3.3 / 5.3 / 10.0 / 30.4 us at 8 KB / 512 KB /
# 2 MB / 8 MB against the best of one-shot and two-shot 6.7 / 11.3 / 19.3 / 42.6; in the engine (8B, TP=2) 3.7%
# more tokens/s and a 6% faster batch-1 token. Each rank sends (ranks - 1) x the message, so more ranks take
# less (`_lamport_bound`: 1.33 MB on four, measured on four H200s).
LAMPORT_MAX_BYTES = 8 << 20

# One symmetric staging buffer per process group that takes the symmetric-memory path, and its size.
_buffers: dict[str, torch.Tensor] = {}
_world_sizes: dict[str, int] = {}


class _LamportGroup(NamedTuple):
    """A group's barrier-free sums: the kernels' module (`hf_paged.kernels.triton_all_reduce`), this rank's receive
    buffer, every rank's buffer as an offset from it, the call counter, this rank, the largest message, and the
    elements of one slot of the buffer (a multiple of 16, so that the kernel's stores stay 16-byte wide)."""

    kernels: ModuleType  # `hf_paged.kernels.triton_all_reduce`
    receive: torch.Tensor
    peers: torch.Tensor
    counter: torch.Tensor
    rank: int
    max_bytes: int
    slot_elems: int

    @property
    def buffers(self) -> tuple:
        """The kernels' arguments after the message: receive buffer, peer offsets, counter, slot size, rank."""
        return self.receive, self.peers, self.counter, self.slot_elems, self.rank


_lamport: dict[str, _LamportGroup] = {}


def enable_symmetric_memory(group: dist.ProcessGroup, max_bytes: int = DEFAULT_MAX_BYTES,
                            lamport_max_bytes: int | None = None) -> bool:
    """Give an NCCL group a symmetric staging buffer of ``max_bytes`` for `symmetric_all_reduce`, and receive
    buffers for its barrier-free sums of up to ``lamport_max_bytes`` (None: `LAMPORT_MAX_BYTES` on two ranks,
    less on more (`_lamport_bound`), within ``max_bytes``; 0: none; they take 3 x ranks x that many bytes)
    (collective; once per group, the first sizes stay). Returns whether the group has them (a gloo group never does).

    Example:
        >>> enable_symmetric_memory(dist.group.WORLD)  # doctest: +SKIP
        True
    """
    name = group.group_name
    if name not in _buffers and dist.get_backend(group) == "nccl":
        import torch.distributed._symmetric_memory as symm_mem

        with warnings.catch_warnings():  # required before torch 2.12, deprecated (a no-op) since
            warnings.simplefilter("ignore", FutureWarning)
            if hasattr(symm_mem, "enable_symm_mem_for_group"):
                symm_mem.enable_symm_mem_for_group(name)
        device = torch.device("cuda", torch.cuda.current_device())
        buffer = symm_mem.empty(max_bytes, dtype=torch.uint8, device=device)
        symm_mem.rendezvous(buffer, name)
        lamport_max_bytes = _lamport_bound(lamport_max_bytes, group.size(), max_bytes)
        if lamport_max_bytes > 0:
            _lamport[name] = _lamport_buffers(name, group.size(), lamport_max_bytes, device)
        _buffers[name], _world_sizes[name] = buffer, group.size()
    return name in _buffers


def _lamport_bound(requested: int | None, world: int, max_bytes: int) -> int:
    """The largest barrier-free message: ``requested``, or by default `LAMPORT_MAX_BYTES` on two ranks and
    ``LAMPORT_MAX_BYTES x 2 / (world x (world - 1))`` on more; never past the staging buffer's ``max_bytes``.

    Each rank sends the whole message to each of ``world - 1`` peers, ``world / 2`` times what the two-shot
    kernel moves, so the size up to which skipping the barriers pays shrinks with both. Four H200s (session 20):
    barrier-free 10.5 / 29.4 us at 512 KB / 2 MB against two-shot 15.9 / 25.9: the crossover near 1.4 MB, the
    default 1.33 MB."""
    if requested is None:
        requested = LAMPORT_MAX_BYTES * 2 // max(2, world * (world - 1))
    return min(requested, max_bytes)


def _lamport_buffers(name: str, world: int, max_bytes: int, device: torch.device) -> _LamportGroup:
    import torch.distributed._symmetric_memory as symm_mem

    from .kernels import triton_all_reduce

    slot_elems = -(-max_bytes // 32) * 16
    receive = symm_mem.empty(triton_all_reduce.receive_elems(world, slot_elems), dtype=torch.int16, device=device)
    receive.fill_(triton_all_reduce.NOT_WRITTEN)
    handle = symm_mem.rendezvous(receive, name)
    # Every rank's buffer as mapped here (this tensor may sit at an offset inside the allocation), in int16
    # elements from this rank's: the mappings are page-aligned, so the kernel may take them as multiples of 16.
    offset = receive.data_ptr() - handle.buffer_ptrs[handle.rank]
    elems = [(ptr + offset - receive.data_ptr()) // 2 for ptr in handle.buffer_ptrs]
    if any(e % 16 for e in elems):
        raise RuntimeError(f"symmetric-memory peer buffers are not 32-byte aligned to each other: {elems}")
    peers = torch.tensor(elems, dtype=torch.int64, device=device)
    torch.cuda.synchronize(device)
    handle.barrier()  # every rank's buffers hold NOT_WRITTEN before anyone's first write
    counter = torch.zeros(2, dtype=torch.int32, device=device)
    return _LamportGroup(triton_all_reduce, receive, peers, counter, handle.rank, max_bytes, slot_elems)


def symmetric_all_reduce(x: torch.Tensor, group_name: str, one_shot_max_bytes: int = ONE_SHOT_MAX_BYTES,
                         lamport_max_bytes: int | None = None) -> torch.Tensor:
    """``x`` summed over the group named ``group_name`` (after `enable_symmetric_memory`; ``x``
    contiguous and within the group's buffer): bf16/fp16 messages up to ``lamport_max_bytes`` (None: the
    group's) without a barrier, else through its staging buffer: the one-shot kernel up to
    ``one_shot_max_bytes``, two-shot beyond. Under torch.compile it is one opaque op (the choice by
    size is no compiler guard); eager calls skip the dispatcher.

    Example:
        >>> total = symmetric_all_reduce(partial, dist.group.WORLD.group_name)  # doctest: +SKIP
    """
    if torch.compiler.is_compiling():
        return _symmetric_op(x, group_name, one_shot_max_bytes, lamport_max_bytes)
    return _symmetric(x, group_name, one_shot_max_bytes, lamport_max_bytes)


def _symmetric(x: torch.Tensor, group_name: str, one_shot_max_bytes: int, lamport_max_bytes: int | None) -> torch.Tensor:
    lamport = _barrier_free(x, group_name, lamport_max_bytes)
    if lamport is not None:
        return lamport.kernels.all_reduce(x, *lamport.buffers, _world_sizes[group_name])
    staging = _buffers[group_name].view(x.dtype)[: x.numel()].view(x.shape)
    # Two-shot splits the message into 16-byte pieces per rank.
    pieces = _world_sizes[group_name] * 16 // x.element_size()
    if x.numel() * x.element_size() <= one_shot_max_bytes or x.numel() % pieces:
        return torch.ops.symm_mem.one_shot_all_reduce_copy(staging, x, "sum", group_name)
    staging.copy_(x)
    return torch.ops.symm_mem.two_shot_all_reduce_out(staging, "sum", group_name, torch.empty_like(x))


def _barrier_free(x: torch.Tensor, group_name: str, lamport_max_bytes: int | None) -> _LamportGroup | None:
    """The group's barrier-free sums if they take ``x`` (bf16/fp16, within the bound), else None."""
    lamport = _lamport.get(group_name)
    if lamport is None or x.dtype not in (torch.bfloat16, torch.float16):
        return None
    limit = lamport.max_bytes if lamport_max_bytes is None else min(lamport.max_bytes, lamport_max_bytes)
    return lamport if x.numel() * x.element_size() <= limit else None


def _symmetric_add(x: torch.Tensor, residual: torch.Tensor, group_name: str, one_shot_max_bytes: int,
                   lamport_max_bytes: int | None) -> torch.Tensor:
    """``residual + symmetric_all_reduce(x)``: one kernel where the sum takes no barrier."""
    lamport = _barrier_free(x, group_name, lamport_max_bytes)
    if lamport is not None and _alike(residual, x):
        return lamport.kernels.all_reduce(x, *lamport.buffers, _world_sizes[group_name], residual=residual)
    return residual + _symmetric(x, group_name, one_shot_max_bytes, lamport_max_bytes)


def _symmetric_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                            group_name: str, one_shot_max_bytes: int,
                            lamport_max_bytes: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h, rms_norm(h))`` of ``h = residual + symmetric_all_reduce(x)``: one kernel where the sum takes no
    barrier, else the sum then one kernel for the rest. The norm is Llama's (`_rms_norm`)."""
    fits = _alike(residual, x) and weight.dtype == x.dtype and weight.is_contiguous() and weight.shape == x.shape[-1:]
    lamport = _barrier_free(x, group_name, lamport_max_bytes)
    if lamport is not None and fits:
        return lamport.kernels.all_reduce_rms_norm(x, residual, weight, eps, *lamport.buffers,
                                                   _world_sizes[group_name])
    total = _symmetric(x, group_name, one_shot_max_bytes, lamport_max_bytes)
    if fits and total.is_cuda:
        from .kernels import triton_all_reduce

        return triton_all_reduce.add_rms_norm(total, residual, weight, eps)
    summed = residual + total
    return summed, _rms_norm(summed, weight, eps)


def _alike(residual: torch.Tensor, x: torch.Tensor) -> bool:
    return _same_value(residual, x) and residual.is_contiguous()


def _rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``LlamaRMSNorm``'s forward: fp32 statistics, the normalised row rounded to ``h``'s dtype before the weight."""
    hf = h.float()
    return weight * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)


_symmetric_op = torch.library.custom_op("hf_paged::symmetric_all_reduce", mutates_args=())(_symmetric)
_symmetric_add_op = torch.library.custom_op("hf_paged::symmetric_all_reduce_add", mutates_args=())(_symmetric_add)
_symmetric_add_rms_norm_op = torch.library.custom_op("hf_paged::symmetric_all_reduce_add_rms_norm",
                                                     mutates_args=())(_symmetric_add_rms_norm)


@_symmetric_op.register_fake
def _(x, group_name, one_shot_max_bytes, lamport_max_bytes):
    return torch.empty_like(x)


@_symmetric_add_op.register_fake
def _(x, residual, group_name, one_shot_max_bytes, lamport_max_bytes):
    return torch.empty_like(x)


@_symmetric_add_rms_norm_op.register_fake
def _(x, residual, weight, eps, group_name, one_shot_max_bytes, lamport_max_bytes):
    return torch.empty_like(x), torch.empty_like(x)


def fuse_all_reduce_epilogues(graph: torch.fx.Graph) -> int:
    """Rewrite a compiled graph's row-parallel sums with what follows them (an Inductor post-grad pass): an add of
    the sum and a residual becomes one `_symmetric_add_op`, and where a Llama RMSNorm of that (``LlamaRMSNorm``:
    Llama, Mistral, Qwen, ...; matched op by op) follows, one `_symmetric_add_rms_norm_op` gives both. On the
    barrier-free path each is one kernel: a decoder layer's ``o_proj`` sum, residual add and
    ``post_attention_layernorm``, and its ``down_proj`` sum and residual add. Returns how many sums it rewrote."""
    aten = torch.ops.aten
    fused = 0
    order = {node: i for i, node in enumerate(graph.nodes)}
    for ar in list(graph.nodes):
        if ar.target is not torch.ops.hf_paged.symmetric_all_reduce.default or len(ar.users) != 1:
            continue
        add = next(iter(ar.users))
        if add.target is not aten.add.Tensor or len(add.args) != 2 or add.kwargs:
            continue
        residual = add.args[0] if add.args[1] is ar else add.args[1]
        x, *options = ar.args
        if not (isinstance(residual, torch.fx.Node) and residual is not ar
                and _same_value(residual.meta.get("val"), x.meta.get("val"))):
            continue
        norm = _llama_rms_norm_of(add)
        if norm is not None and order[norm[0]] > order[add]:  # the fused op goes where the add was
            norm = None
        ops = torch.ops.hf_paged
        with graph.inserting_before(add):
            if norm is None:
                summed = graph.call_function(ops.symmetric_all_reduce_add.default, (x, residual, *options))
                replaced = [ar, add]
            else:
                weight, eps, chain = norm
                normed = chain[-1]
                both = graph.call_function(ops.symmetric_all_reduce_add_rms_norm.default,
                                           (x, residual, weight, eps, *options))
                both.meta["val"] = (add.meta["val"], normed.meta["val"])
                summed = graph.call_function(operator.getitem, (both, 0))
                out = graph.call_function(operator.getitem, (both, 1))
                out.meta["val"] = normed.meta["val"]
                normed.replace_all_uses_with(out)
                replaced = [ar, add, *chain]
        summed.meta["val"] = add.meta["val"]
        add.replace_all_uses_with(summed)
        for node in reversed(replaced):  # only what was rewritten: the graph's other unused nodes stay as they are
            if not node.users:
                graph.erase_node(node)
        fused += 1
    return fused


def _same_value(a, b) -> bool:
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype


def _llama_rms_norm_of(h: torch.fx.Node) -> tuple | None:
    """``(weight, eps, nodes)`` where ``h``'s users hold ``LlamaRMSNorm(h)`` as its forward decomposes (``nodes``:
    those of the norm in order, its output last):
    ``weight * (hf * rsqrt(mean(hf ** 2, -1, keepdim) + eps)).to(h.dtype)`` with ``hf = h.to(float32)``, its
    intermediates used by nothing else; else None."""
    aten, prims = torch.ops.aten, torch.ops.prims

    def only_user(node, target):
        if len(node.users) != 1:
            return None
        user = next(iter(node.users))
        return user if user.target is target else None

    dtype = h.meta["val"].dtype
    for hf in h.users:
        if hf.target is not prims.convert_element_type.default or hf.args[1] is not torch.float32:
            continue
        pows = [u for u in hf.users if u.target is aten.pow.Tensor_Scalar and u.args == (hf, 2)]
        if len(hf.users) != 2 or len(pows) != 1:
            continue
        mean = only_user(pows[0], aten.mean.dim)
        if mean is None or list(mean.args[1]) not in ([-1], [h.meta["val"].dim() - 1]) or mean.args[2:] != (True,):
            continue
        plus = only_user(mean, aten.add.Tensor)
        if plus is None or plus.args[0] is not mean or not isinstance(plus.args[1], float):
            continue
        rsqrt = only_user(plus, aten.rsqrt.default)
        scaled = rsqrt and only_user(rsqrt, aten.mul.Tensor)
        if scaled is None or set(scaled.args) != {hf, rsqrt} or scaled not in hf.users:
            continue
        cast = only_user(scaled, prims.convert_element_type.default)
        out = cast and cast.args[1] is dtype and only_user(cast, aten.mul.Tensor)
        if not out:
            continue
        weight = out.args[0] if out.args[1] is cast else out.args[1]
        value = weight.meta.get("val") if isinstance(weight, torch.fx.Node) else None
        if (isinstance(value, torch.Tensor) and value.dtype == dtype and value.shape == h.meta["val"].shape[-1:]
                and out.meta["val"].dtype == dtype):
            return weight, plus.args[1], [hf, pows[0], mean, plus, rsqrt, scaled, cast, out]
    return None


@functools.cache
def epilogue_fusion():
    """`fuse_all_reduce_epilogues` as Inductor takes a post-grad pass, for ``torch.compile(..., options=
    {"post_grad_custom_post_pass": epilogue_fusion()})``; its uuid (this file's hash) keys Inductor's cache.
    Built on first use: importing Inductor takes over a second."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class EpilogueFusion(CustomGraphPass):
        def __call__(self, graph: torch.fx.Graph) -> None:
            fuse_all_reduce_epilogues(graph)

        def uuid(self) -> bytes:
            return hashlib.sha256(Path(__file__).read_bytes()).digest()

    return EpilogueFusion()


def _tp_group(mesh) -> dist.ProcessGroup:
    return mesh.get_group() if mesh.ndim == 1 else mesh.get_group("tp")


def _symmetric_style(base, groups: list):
    """A copy of the row-parallel style ``base`` whose inference all-reduce takes symmetric memory
    (once its group has a buffer); the groups of the layers it is installed on go to ``groups``."""
    from torch.distributed.tensor import DTensor

    class SymmetricRowwise(type(base)):
        def install_forward(self, module, mesh):
            groups.append(_tp_group(mesh))
            return super().install_forward(module, mesh)

        def transform_output_post_forward(self, module, output, mesh):
            group = _tp_group(mesh)
            # The case Transformers itself sums with a plain all_reduce: an inference forward of a
            # bias-free Linear whose local output is this rank's partial sum.
            buffer = _buffers.get(group.group_name)
            if (buffer is not None and isinstance(module, torch.nn.Linear) and module.bias is None
                    and not isinstance(output, DTensor) and not output.requires_grad and output.is_contiguous()
                    and output.numel() * output.element_size() <= buffer.numel()):
                return symmetric_all_reduce(output, group.group_name)
            return super().transform_output_post_forward(module, output, mesh)

    style = SymmetricRowwise.__new__(SymmetricRowwise)
    style.__dict__.update(base.__dict__)
    return style


@contextlib.contextmanager
def row_parallel_all_reduce(max_bytes: int = DEFAULT_MAX_BYTES, lamport_max_bytes: int | None = None) -> Iterator[None]:
    """Models loaded with a ``tp_plan`` in the block sum the partial outputs of their row-parallel
    layers (the styles that end replicated) through symmetric memory (`symmetric_all_reduce`), for messages of up to
    ``max_bytes`` (up to ``lamport_max_bytes`` without a barrier: `enable_symmetric_memory`); larger ones and
    groups that are not NCCL (gloo on CPU) keep ``dist.all_reduce``.

    Leaving the block sets up a symmetric buffer of ``max_bytes`` for each NCCL group a model was
    sharded over: collective (every rank loads the same model), and outside any graph capture.
    ``max_bytes=0`` changes nothing.
    """
    from torch.distributed.tensor import Replicate
    from transformers.distributed.tensor_parallel import ALL_PARALLEL_STYLES, RowwiseParallel

    if max_bytes <= 0:
        yield
        return
    groups: list[dist.ProcessGroup] = []
    saved = {name: style for name, style in ALL_PARALLEL_STYLES.items()
             if isinstance(style, RowwiseParallel) and isinstance(style.output_layouts, Replicate)}
    ALL_PARALLEL_STYLES.update({name: _symmetric_style(style, groups) for name, style in saved.items()})
    try:
        yield
    finally:
        ALL_PARALLEL_STYLES.update(saved)
    for group in {g.group_name: g for g in groups}.values():
        enable_symmetric_memory(group, max_bytes, lamport_max_bytes)
