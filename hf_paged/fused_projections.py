"""A layer's sibling input projections as one matmul: ``q_proj``/``k_proj``/``v_proj`` and ``gate_proj``/``up_proj``.

At small batches a decoder layer's matmuls read their weights and little else, and the small ones run far
from the memory's speed: on an H100 at batch 1 the 8B shape's ``k_proj`` and ``v_proj`` (8 MB each) took a
split-K launch of 5.7 us plus a 1.7 us reduce each, where their bytes need 2.8 us (bench/RESULTS.md,
session 16). `fuse_projections` concatenates each group's weights into one tensor and makes the members
views of it, so the model keeps its modules, parameter names and ``state_dict``; the group's first member
then computes the whole group's matmul, and each other member, called with the same input tensor, returns its
slice of that result instead of a matmul of its own. A member called with another input (or before its
group's first) computes its own matmul, so a model that does not call the group on one input stays correct.

Example:
    >>> fused = fuse_projections(model)  # doctest: +SKIP
    >>> fused  # two groups per decoder layer  # doctest: +SKIP
    64
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
        out = F.linear(x, self._hf_paged_fused_weight, self._hf_paged_fused_bias)
        first, *rest = out.split(self._hf_paged_sizes, dim=-1)
        _pending.entry = (self._hf_paged_fused_weight, x, dict(enumerate(rest, 1)))
        return first


class _FusedMember(torch.nn.Linear):
    """Another member: its slice of the group's matmul on the same input, else a matmul of its own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        entry = _pending.entry
        if entry is not None and entry[0] is self._hf_paged_fused_weight and entry[1] is x:
            out = entry[2].pop(self._hf_paged_index, None)
            if out is not None:
                if not entry[2]:
                    _pending.entry = None  # the group's outputs are all handed out: nothing stays referenced
                return out
        return F.linear(x, self.weight, self.bias)


def fuse_projections(model: torch.nn.Module) -> int:
    """Fuse every `GROUPS` group of plain ``nn.Linear`` siblings in ``model`` (in place); returns how many.

    A group is fused when its members are exactly ``torch.nn.Linear`` (not quantized or adapter layers), share
    the input size, dtype and device, all have a bias or none does, carry no hooks (tensor-parallel styles,
    offloading) and hold plain tensors (not DTensors). Parameters keep their names and values (views of the
    group's weight), so ``state_dict`` and ``save_pretrained`` are unchanged; memory stays the same (moving
    the model to another device or dtype afterwards copies the fused weights apart from their views). Calling
    it again fuses nothing more.
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
    tensors = [t for m in members for t in (m.weight, m.bias) if t is not None]
    return (all(m.in_features == first.in_features for m in members)
            and len({(t.dtype, t.device) for t in tensors}) == 1
            and len({m.bias is None for m in members}) == 1
            and all(type(t.data) is torch.Tensor for t in tensors)
            and not any(m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook") for m in members))


@torch.no_grad()
def _fuse(members: list) -> None:
    def concatenated(name: str) -> torch.Tensor:
        parts = [getattr(m, name) for m in members]
        whole = torch.cat([p.detach() for p in parts])
        for m, part, piece in zip(members, parts, whole.split([p.shape[0] for p in parts])):
            setattr(m, name, torch.nn.Parameter(piece, part.requires_grad))
        return whole

    weight = concatenated("weight")
    bias = concatenated("bias") if members[0].bias is not None else None
    for index, m in enumerate(members):
        m.register_buffer("_hf_paged_fused_weight", weight, persistent=False)
        m._hf_paged_index = index
        m.__class__ = _FusedFirst if index == 0 else _FusedMember
    first = members[0]
    first.register_buffer("_hf_paged_fused_bias", bias, persistent=False)
    first._hf_paged_sizes = tuple(m.out_features for m in members)
