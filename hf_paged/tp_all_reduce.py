"""The sum of row-parallel layers' partial outputs under tensor parallelism: one-shot over NVLink for small ones.

Transformers' row-parallel layers (``"rowwise"`` in a ``tp_plan``: Llama's ``o_proj`` and ``down_proj``) sum
their ranks' partial outputs with ``dist.all_reduce``, two per layer. A decode step's messages are small
(tokens x hidden x 2 bytes: 8 KB at batch 1, 2 MB at 256 sequences) and NCCL's protocol latency dominates
them. With symmetric memory each rank reads its peers' partial sums directly
(``torch.ops.symm_mem.one_shot_all_reduce_copy``: one kernel with a barrier on either side, capturable
in CUDA graphs, no multicast). `row_parallel_all_reduce` installs that for a model being loaded; messages
over ``max_bytes`` (prefill), other groups and every group that is not NCCL keep ``dist.all_reduce``.

Example:
    >>> with row_parallel_all_reduce():  # doctest: +SKIP
    ...     model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto")
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
import torch.distributed as dist

__all__ = ["DEFAULT_MAX_BYTES", "enable_one_shot", "one_shot_all_reduce", "row_parallel_all_reduce"]

# Messages up to this size take the one-shot path: on two H100s (bench/all_reduce.py) it beat NCCL up to 2 MB
# (256 decodes at hidden size 4,096 in bf16; 23 vs 35 us) and lost from 8 MB (64 vs 56 us).
DEFAULT_MAX_BYTES = 4 << 20

# One symmetric staging buffer per process group that takes the one-shot path.
_buffers: dict[str, torch.Tensor] = {}


def enable_one_shot(group: dist.ProcessGroup, max_bytes: int = DEFAULT_MAX_BYTES) -> bool:
    """Give an NCCL group a symmetric staging buffer of ``max_bytes`` for `one_shot_all_reduce`
    (collective; once per group, the first size stays). Returns whether the group has one (a gloo
    group never does).

    Example:
        >>> enable_one_shot(dist.group.WORLD)  # doctest: +SKIP
        True
    """
    name = group.group_name
    if name not in _buffers and dist.get_backend(group) == "nccl":
        import torch.distributed._symmetric_memory as symm_mem

        with warnings.catch_warnings():  # required before torch 2.12, deprecated (a no-op) since
            warnings.simplefilter("ignore", FutureWarning)
            if hasattr(symm_mem, "enable_symm_mem_for_group"):
                symm_mem.enable_symm_mem_for_group(name)
        buffer = symm_mem.empty(max_bytes, dtype=torch.uint8, device=torch.device("cuda", torch.cuda.current_device()))
        symm_mem.rendezvous(buffer, name)
        _buffers[name] = buffer
    return name in _buffers


def one_shot_all_reduce(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """``x`` summed over the group named ``group_name`` (after `enable_one_shot`; ``x`` contiguous and
    within the group's buffer): every rank reads its peers' copies directly, one kernel. Under
    torch.compile it is one opaque op; eager calls skip the dispatcher.

    Example:
        >>> total = one_shot_all_reduce(partial, dist.group.WORLD.group_name)  # doctest: +SKIP
    """
    if torch.compiler.is_compiling():
        return _one_shot_op(x, group_name)
    return _one_shot(x, group_name)


def _one_shot(x: torch.Tensor, group_name: str) -> torch.Tensor:
    staging = _buffers[group_name].view(x.dtype)[: x.numel()].view(x.shape)
    return torch.ops.symm_mem.one_shot_all_reduce_copy(staging, x, "sum", group_name)


_one_shot_op = torch.library.custom_op("hf_paged::one_shot_all_reduce", mutates_args=())(_one_shot)


@_one_shot_op.register_fake
def _(x, group_name):
    return torch.empty_like(x)


def _tp_group(mesh) -> dist.ProcessGroup:
    return mesh.get_group() if mesh.ndim == 1 else mesh.get_group("tp")


def _one_shot_style(base, groups: list):
    """A copy of the row-parallel style ``base`` whose inference all-reduce takes the one-shot path
    (once its group has a buffer); the groups of the layers it is installed on go to ``groups``."""
    from torch.distributed.tensor import DTensor

    class OneShotRowwise(type(base)):
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
                return one_shot_all_reduce(output, group.group_name)
            return super().transform_output_post_forward(module, output, mesh)

    style = OneShotRowwise.__new__(OneShotRowwise)
    style.__dict__.update(base.__dict__)
    return style


@contextlib.contextmanager
def row_parallel_all_reduce(max_bytes: int = DEFAULT_MAX_BYTES) -> Iterator[None]:
    """Models loaded with a ``tp_plan`` in the block sum the partial outputs of their row-parallel
    layers (the styles that end replicated) with the one-shot all-reduce, for messages of up to
    ``max_bytes``; larger ones and groups that are not NCCL (gloo on CPU) keep ``dist.all_reduce``.

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
    ALL_PARALLEL_STYLES.update({name: _one_shot_style(style, groups) for name, style in saved.items()})
    try:
        yield
    finally:
        ALL_PARALLEL_STYLES.update(saved)
    for group in {g.group_name: g for g in groups}.values():
        enable_one_shot(group, max_bytes)
