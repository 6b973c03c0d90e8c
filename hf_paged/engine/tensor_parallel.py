"""What an `Engine` needs on a tensor-parallel model: the TP group and a sampler that draws once.

Every rank runs the same engine over identical inputs; only sampling, which is random, is done on
the group's rank 0 and broadcast (`BroadcastSampler`). Launching ranks is `hf_paged.distributed`'s job.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from ..cache.geometry import tensor_parallel_size
from .sampler import SamplerOutput

__all__ = ["BroadcastSampler", "TensorParallelState"]

logger = logging.getLogger(__name__)


class TensorParallelState:
    """The tensor-parallel group of a sharded model, as the engine uses it.

    ``group`` is the model's TP process group (its device mesh's ``"tp"`` dimension, else the
    world); ``cpu_group`` a gloo group over the same ranks for small host-side messages (the same
    group when the backend already is gloo). Building it is collective: every rank must do it.

    Example:
        >>> state = TensorParallelState(model)  # on every rank  # doctest: +SKIP
        >>> state.agree_min(free_blocks)  # doctest: +SKIP
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.size = tensor_parallel_size(model)
        self.group = _tp_group(model)
        self.rank = dist.get_rank(self.group)
        if dist.get_backend(self.group) == "gloo":
            self.cpu_group = self.group
        else:
            self.cpu_group = dist.new_group(dist.get_process_group_ranks(self.group), backend="gloo")

    def agree_min(self, value: int) -> int:
        """The minimum of ``value`` over the ranks (pool sizes computed from each rank's free memory)."""
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return int(t.item())


def _tp_group(model: torch.nn.Module):
    mesh = getattr(model, "_device_mesh", None)
    if mesh is not None:
        names = tuple(getattr(mesh, "mesh_dim_names", None) or ())
        try:
            if "tp" in names:
                return mesh["tp"].get_group()
            if mesh.ndim == 1:
                return mesh.get_group()
        except Exception:  # an unfamiliar mesh layout: the world is the TP group then
            logger.debug("could not read the TP group from %r", mesh, exc_info=True)
    return dist.group.WORLD


class BroadcastSampler:
    """Samples on the group's rank 0 only and broadcasts the chosen tokens to the other ranks.

    Every rank holds the same gathered logits, but unseeded sampling draws from each rank's own
    generator: drawing once keeps the ranks' sequences (and so their schedules) identical. Token
    ids travel as one int64 tensor over the TP group; when logprobs are wanted the whole
    `SamplerOutput` goes over the gloo group instead.

    Example:
        >>> sampler = BroadcastSampler(Sampler(), TensorParallelState(model))  # doctest: +SKIP
    """

    def __init__(self, sampler, state: TensorParallelState) -> None:
        self.sampler = sampler
        self.state = state

    def __call__(self, logits: torch.Tensor, seqs) -> SamplerOutput:
        if any(s.request.params.logprobs is not None for s in seqs):
            box = [self.sampler(logits, seqs) if self.state.rank == 0 else None]
            dist.broadcast_object_list(box, group=self.state.cpu_group, group_src=0)
            return box[0]
        return SamplerOutput(self.tokens(logits, seqs).tolist())

    def tokens(self, logits: torch.Tensor, seqs) -> torch.Tensor:
        """Rank 0's sampled tokens, on every rank's device."""
        if all(s.request.argmax_only for s in seqs):
            # Every rank holds the same gathered logits, so each one's arg-max agrees: no broadcast.
            return self.sampler.tokens(logits, seqs)
        if self.state.rank == 0:
            tokens = self.sampler.tokens(logits, seqs)
        else:
            tokens = torch.empty(len(seqs), dtype=torch.int64, device=logits.device)
        dist.broadcast(tokens, group=self.state.group, group_src=0)
        return tokens
