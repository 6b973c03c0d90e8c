"""Launching a ``@triton.jit`` kernel for less host time than ``kernel[grid](...)``.

Triton binds and specialises every argument in Python at each launch (measured on the device's H100 machine: 34 us
for the 19-argument store kernel, of which the compiled kernel's own launcher takes 15). At decode sizes that is
more than the kernels run, and ``model.generate`` pays it for every launch of every layer and token. `launch` keys the
compiled kernel by everything its specialisation depends on (the non-tensor arguments by value, each tensor's
dtype and 16-byte alignment, the constexprs and launch options) and calls it directly. A key's first launch, an
argument it cannot key (a TMA descriptor) and the interpreter go through Triton's own path. A `PreparedLaunch` fixes the
grid, the trailing scalars and the constexprs of a launch repeated with other tensors (the attention of each layer of
a step) and keys its compiled kernel by the tensors alone.
"""

from __future__ import annotations

import torch
from triton.runtime.jit import JITFunction

__all__ = ["PreparedLaunch", "launch"]

_SCALARS = (int, float, bool, str, type(None))
_MAX_ENTRIES = 4096  # keys hold per-step ints (sequence counts, splits): bounded, cleared when full
_compiled: dict[tuple, tuple] = {}


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``: positional runtime arguments, constexprs and options by keyword."""
    entry = _compiled_for(kernel, grid, args, kwargs)
    if entry is not None:
        compiled, constexprs = entry
        compiled[grid + (1,) * (3 - len(grid))](*args, *(kwargs[name] for name in constexprs))


def _compiled_for(kernel, grid: tuple, args: tuple, kwargs: dict) -> tuple | None:
    """The compiled kernel for these arguments and the names of its parameters after ``args`` (its launcher
    takes every parameter in order, constexprs included); ``None`` after launching through Triton's own path
    instead: the key's first launch (which compiles), an argument it cannot key, the interpreter."""
    if not isinstance(kernel, JITFunction):  # TRITON_INTERPRET=1: an interpreted function
        kernel[grid](*args, **kwargs)
        return None
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
            return None
    key = tuple(key)
    entry = _compiled.get(key)
    if entry is None:
        compiled = kernel[grid](*args, **kwargs)
        if len(_compiled) >= _MAX_ENTRIES:
            _compiled.clear()
        _compiled[key] = (compiled, tuple(p.name for p in kernel.params[len(args):]))
    return entry


class PreparedLaunch:
    """`launch` of ``kernel`` on ``grid`` with the leading arguments given per call (tensors or ``None``), then
    ``scalars`` and the constexprs/options ``consts``: a call keys the compiled kernel by the tensors' dtypes and
    16-byte alignment only. Anything else among the leading arguments (a TMA descriptor) goes through `launch`.

    Example:
        >>> run = PreparedLaunch(kernel, (n_blocks,), (n, 0.5), {"BLOCK": 128})  # doctest: +SKIP
        >>> run(x, y)  # kernel[(n_blocks,)](x, y, n, 0.5, BLOCK=128)  # doctest: +SKIP
    """

    __slots__ = ("kernel", "grid", "scalars", "consts", "_runs")

    def __init__(self, kernel, grid: tuple, scalars: tuple, consts: dict) -> None:
        self.kernel, self.grid, self.scalars, self.consts = kernel, grid, scalars, consts
        self._runs: dict[tuple, tuple] = {}  # tensor key -> (launcher on the padded grid, constexpr values)

    def __call__(self, *tensors) -> None:
        key = []
        add = key.append
        for t in tensors:
            if type(t) is torch.Tensor:
                add(t.dtype)
                add(t.data_ptr() & 15 == 0)
            elif t is None:
                add(None)
            else:
                launch(self.kernel, self.grid, *tensors, *self.scalars, **self.consts)
                return
        key = tuple(key)
        run = self._runs.get(key)
        if run is None:  # this launch's first call with such tensors: the compiled kernel `launch` keeps
            entry = _compiled_for(self.kernel, self.grid, (*tensors, *self.scalars), self.consts)
            if entry is None:  # launched through Triton's own path
                return
            compiled, constexprs = entry
            run = self._runs[key] = (compiled[self.grid + (1,) * (3 - len(self.grid))],
                                     tuple(self.consts[name] for name in constexprs))
        run[0](*tensors, *self.scalars, *run[1])
