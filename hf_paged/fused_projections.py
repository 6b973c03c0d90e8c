"""A layer's sibling input projections as one matmul: ``q_proj``/``k_proj``/``v_proj`` and ``gate_proj``/``up_proj``.

At small batches a decoder layer's matmuls read their weights and little else, and the small ones run far
from the memory's speed: on an H100 at batch 1 the 8B shape's ``k_proj`` and ``v_proj`` (8 MB each) took a
split-K launch of 5.7 us plus a 1.7 us reduce each, where their bytes need 2.8 us (bench/RESULTS.md,
session 16). `fuse_projections` concatenates each group's weights into one tensor and makes the members
views of it, so the model keeps its modules, parameter names and ``state_dict``; the group's first member
then computes the whole group's matmul, and each other member, called with the same input tensor, returns its
slice of that result instead of a matmul of its own. A member called with another input (or before its
group's first) computes its own matmul, so a model that does not call the group on one input stays correct.

With gradients on (training a model that an engine shares, as TRL's rollouts do) every member runs its own
forward as before, so autograd reaches its parameters. Under tensor parallelism (Transformers' ``tp_plan``)
the members are column-parallel: each rank holds a row shard of every member's weight and, at inference,
computes its own output columns from the replicated input. Those shards are fused the same way, per rank.

Example:
    >>> fused = fuse_projections(model)  # doctest: +SKIP
    >>> fused  # two groups per decoder layer  # doctest: +SKIP
    64
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Shard

__all__ = ["GROUPS", "fuse_projections"]

#: Sibling projections that Transformers' decoder layers (Llama, Mistral, Qwen2/3, Gemma, ...) apply to one input.
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _Pending:
    """The latest group matmul still to be handed out: (the group's fused weight, its input, {member index:
    output}). One slot serves every layer, since layers run one after another; a reader takes the tuple once,
    so a thread that replaced it meanwhile makes the check fail (the member then computes its own matmul),
    never hands out another group's output."""

    entry: tuple | None = None


_pending = _Pending()


class _FusedFirst(torch.nn.Linear):
    """The first member of a fused group: computes the group's matmul, returns its own slice, keeps the rest."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return _unfused(self, x)
        out = F.linear(x, self._hf_paged_fused_weight, self._hf_paged_fused_bias)
        first, *rest = out.split(self._hf_paged_sizes, dim=-1)
        _pending.entry = (self._hf_paged_fused_weight, x, dict(enumerate(rest, 1)))
        return first


class _FusedMember(torch.nn.Linear):
    """Another member: its slice of the group's matmul on the same input, else a matmul of its own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return _unfused(self, x)
        entry = _pending.entry
        if entry is not None and entry[0] is self._hf_paged_fused_weight and entry[1] is x:
            out = entry[2].pop(self._hf_paged_index, None)
            if out is not None:
                if not entry[2]:
                    _pending.entry = None  # the group's outputs are all handed out: nothing stays referenced
                return out
        return _unfused(self, x)


def _unfused(m: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The member's forward as before fusing (Transformers' tensor-parallel one where it had one): for a member
    called apart from its group, and with gradients on, where autograd must reach the member's own parameters
    (a trainer may share the model with an engine), which the fused weight, a buffer, would bypass."""
    tp_forward = m.__dict__.get("_hf_paged_tp_forward")
    return tp_forward(x) if tp_forward is not None else torch.nn.Linear.forward(m, x)


def _local(t: torch.Tensor | None) -> torch.Tensor | None:
    """This rank's shard of a tensor-parallel parameter (the tensor itself when it is not one)."""
    return t.to_local() if isinstance(t, DTensor) else t


def fuse_projections(model: torch.nn.Module) -> int:
    """Fuse every `GROUPS` group of plain ``nn.Linear`` siblings in ``model`` (in place); returns how many.

    A group is fused when its members are exactly ``torch.nn.Linear`` (not quantized or adapter layers), share
    the input size, dtype and device, all have a bias or none does, and either all carry no hooks and hold
    plain tensors, or all are column-parallel under Transformers' tensor parallelism (``"colwise"`` in a
    ``tp_plan``: DTensor row shards on one mesh; fused per rank, for inference, which is all such a layer's
    forward does without gradients). Parameters keep their names and values (views of the group's weight),
    so ``state_dict`` and ``save_pretrained`` are unchanged; memory stays the same (moving the model to
    another device or dtype afterwards copies the fused weights apart from their views). Calling it again
    fuses nothing more.
    """
    fused = 0
    for parent in list(model.modules()):
        for names in GROUPS:
            members = [getattr(parent, name, None) for name in names]
            if _fusable(members):
                _fuse(members)
                fused += 1
    return fused


def _fusable(members: list) -> bool:
    if not all(type(m) is torch.nn.Linear for m in members):
        return False
    first = members[0]
    tensors = [_local(t) for m in members for t in (m.weight, m.bias) if t is not None]
    meshes = {_column_parallel_mesh(m) for m in members}
    return (all(m.in_features == first.in_features for m in members)
            and len({(t.dtype, t.device) for t in tensors}) == 1
            and len({m.bias is None for m in members}) == 1
            and (all(_plain(m) for m in members) or (len(meshes) == 1 and None not in meshes)))


def _plain(m: torch.nn.Linear) -> bool:
    return (not (m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook") or "forward" in m.__dict__)
            and all(type(t.data) is torch.Tensor for t in (m.weight, m.bias) if t is not None))


def _column_parallel_mesh(m: torch.nn.Linear):
    """The device mesh of ``m`` when Transformers sharded it column-parallel with a local output (its
    ``ColwiseParallel`` style replaced ``m.forward``; without gradients and given a plain, replicated input,
    that forward is ``F.linear`` on the rank's shards), else None."""
    from transformers.distributed.tensor_parallel import ColwiseParallel

    forward = m.__dict__.get("forward")
    if forward is None or m._forward_hooks or m._forward_pre_hooks or not hasattr(forward, "__code__"):
        return None
    style = inspect.getclosurevars(forward).nonlocals.get("self")
    params = [t for t in (m.weight, m.bias) if t is not None]
    if (type(style) is not ColwiseParallel or not style.use_local_output
            or not (isinstance(style.output_layouts, Shard) and style.output_layouts.dim == -1)
            or not all(isinstance(t, DTensor) and tuple(t.placements) == (Shard(0),) for t in params)
            or len({t.device_mesh for t in params}) != 1):
        return None
    return m.weight.device_mesh


@torch.no_grad()
def _fuse(members: list) -> None:
    def concatenated(name: str) -> torch.Tensor:
        parts = [getattr(m, name) for m in members]
        whole = torch.cat([_local(p).detach() for p in parts])
        for m, part, piece in zip(members, parts, whole.split([_local(p).shape[0] for p in parts])):
            if isinstance(part, DTensor):  # the shard becomes a view; the DTensor keeps its global shape
                piece = DTensor.from_local(piece, part.device_mesh, part.placements, run_check=False,
                                           shape=part.shape, stride=part.stride())
            setattr(m, name, torch.nn.Parameter(piece, part.requires_grad))
        return whole

    weight = concatenated("weight")
    bias = concatenated("bias") if members[0].bias is not None else None
    for index, m in enumerate(members):
        m.register_buffer("_hf_paged_fused_weight", weight, persistent=False)
        m._hf_paged_index = index
        if "forward" in m.__dict__:  # a tensor-parallel style's: the class's fused forward replaces it without grads
            m._hf_paged_tp_forward = m.__dict__.pop("forward")
        m.__class__ = _FusedFirst if index == 0 else _FusedMember
    first = members[0]
    first.register_buffer("_hf_paged_fused_bias", bias, persistent=False)
    first._hf_paged_sizes = tuple(_local(m.weight).shape[0] for m in members)
