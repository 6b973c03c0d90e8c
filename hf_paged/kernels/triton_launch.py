"""Launching a ``@triton.jit`` kernel for less host time than ``kernel[grid](...)``.

Triton binds and specialises every argument in Python at each launch (measured on the device's H100 machine: 34 us
for the 19-argument store kernel, of which the compiled kernel's own launcher takes 15). At decode sizes that is
more than the kernels run, and ``model.generate`` pays it for every launch of every layer and token. `launch` keys the
compiled kernel by everything its specialisation depends on (the non-tensor arguments by value, each tensor's
dtype and 16-byte alignment, the constexprs and launch options) and calls it directly. A key's first launch, an
argument it cannot key (a TMA descriptor) and the interpreter go through Triton's own path.
"""

from __future__ import annotations

import torch
from triton.runtime.jit import JITFunction

__all__ = ["launch"]

_SCALARS = (int, float, bool, str, type(None))
_MAX_ENTRIES = 4096  # keys hold per-step ints (sequence counts, splits): bounded, cleared when full
_compiled: dict[tuple, tuple] = {}


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``: positional runtime arguments, constexprs and options by keyword."""
    if not isinstance(kernel, JITFunction):  # TRITON_INTERPRET=1: an interpreted function
        kernel[grid](*args, **kwargs)
        return
    # One flat tuple (nested tuples cost as much again to build and hash): the kernel, the keyword names and
    # values (kernels live as long as their modules), then per argument its dtype and alignment or its value.
    key = [id(kernel), *kwargs, *kwargs.values()]
    add = key.append
    for a in args:
        kind = type(a)
        if kind is torch.Tensor:
            add(a.dtype)
            add(a.data_ptr() & 15 == 0)
        elif kind is int:
            add(a)
        elif isinstance(a, _SCALARS):  # typed: True == 1 == 1.0, but Triton types them u1, i32 and fp32
            add(kind)
            add(a)
        else:
            kernel[grid](*args, **kwargs)
            return
    key = tuple(key)
    entry = _compiled.get(key)
    if entry is None:
        compiled = kernel[grid](*args, **kwargs)
        if len(_compiled) >= _MAX_ENTRIES:
            _compiled.clear()
        # The compiled kernel's launcher takes every parameter in order, constexprs included.
        _compiled[key] = (compiled, tuple(p.name for p in kernel.params[len(args):]))
        return
    compiled, constexpr_names = entry
    compiled[grid + (1,) * (3 - len(grid))](*args, *(kwargs[name] for name in constexpr_names))
