"""`hf_paged.kernels.triton_launch.launch`: a compiled kernel is reused only for arguments it was specialised on."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.any_transformers

from triton.runtime.jit import JITFunction  # noqa: E402

from hf_paged.kernels import triton_launch  # noqa: E402


class _Param:
    def __init__(self, name):
        self.name = name


class _FakeKernel(JITFunction):
    """A JITFunction without a compiler: ``[grid](...)`` records a JIT launch and returns a recording
    'compiled kernel' (on a CPU machine nothing compiles)."""

    def __init__(self, names):
        self.params = [_Param(n) for n in names]
        self.calls = []

    def __getitem__(self, grid):
        def jit(*args, **kwargs):
            self.calls.append(("jit", grid, args, kwargs))
            return _FakeCompiled(self.calls)
        return jit


class _FakeCompiled:
    def __init__(self, calls):
        self.calls = calls

    def __getitem__(self, grid):
        return lambda *args: self.calls.append(("compiled", grid, args))


@pytest.fixture
def kernel(monkeypatch):
    monkeypatch.setattr(triton_launch, "_compiled", {})
    return _FakeKernel(["x", "n", "scale", "BLOCK"])


def test_same_specialisation_reuses_the_compiled_kernel(kernel):
    x = torch.zeros(64)
    triton_launch.launch(kernel, (4,), x, 7, 0.5, BLOCK=16, num_warps=4)
    triton_launch.launch(kernel, (8, 2), torch.ones(64), 7, 0.5, BLOCK=16, num_warps=4)
    assert [c[0] for c in kernel.calls] == ["jit", "compiled"]
    # every parameter in order, the constexprs after the positional ones; the grid padded to three dims
    _, grid, args = kernel.calls[1]
    assert grid == (8, 2, 1) and args[1:] == (7, 0.5, 16) and torch.equal(args[0], torch.ones(64))


@pytest.mark.parametrize("change", ["int", "float", "int as float", "constexpr", "option", "dtype", "alignment"])
def test_another_specialisation_goes_through_triton(kernel, change):
    x = torch.zeros(64)
    triton_launch.launch(kernel, (1,), x, 7, 0.5, BLOCK=16, num_warps=4)
    args, kwargs = [x, 7, 0.5], dict(BLOCK=16, num_warps=4)
    if change == "int":
        args[1] = 1  # Triton specialises on == 1 and on divisibility by 16
    elif change == "float":
        args[2] = 0.25
    elif change == "int as float":
        args[1] = 7.0  # equal to 7, but Triton compiles a float argument for it
    elif change == "constexpr":
        kwargs["BLOCK"] = 32
    elif change == "option":
        kwargs["num_warps"] = 8
    elif change == "dtype":
        args[0] = x.half()
    else:
        args[0] = x[1:]  # 4 bytes past a 16-byte boundary
    triton_launch.launch(kernel, (1,), *args, **kwargs)
    assert [c[0] for c in kernel.calls] == ["jit", "jit"]


def test_unkeyable_argument_always_goes_through_triton(kernel):
    descriptor = object()  # e.g. a TMA descriptor: its specialisation is not keyed here
    for _ in range(2):
        triton_launch.launch(kernel, (1,), descriptor, 7, 0.5, BLOCK=16)
    assert [c[0] for c in kernel.calls] == ["jit", "jit"]


def test_prepared_launch_keys_the_tensors_only(kernel):
    """A `PreparedLaunch` fixes grid, scalars and constexprs: it reuses its compiled kernel while the tensors'
    dtypes, alignment and None-ness stay, compiles again when one changes, and hands a TMA descriptor to Triton."""
    x = torch.zeros(64)
    run = triton_launch.PreparedLaunch(kernel, (4, 2), (7, 0.5), dict(BLOCK=16, num_warps=4))
    for t in (x, torch.ones(64), x[4:]):  # x[4:]: another 16-byte aligned view
        run(t)
    assert [c[0] for c in kernel.calls] == ["jit", "compiled", "compiled"]
    _, grid, args = kernel.calls[1]
    assert grid == (4, 2, 1) and args[1:] == (7, 0.5, 16) and torch.equal(args[0], torch.ones(64))
    for t in (x[1:], x.half(), None, object()):
        run(t)
    assert [c[0] for c in kernel.calls[3:]] == ["jit", "jit", "jit", "jit"]
    run(x[1:])
    assert kernel.calls[-1][0] == "compiled"


@pytest.mark.gpu
def test_gpu_store_through_the_launcher_for_aligned_and_misaligned_views():
    from hf_paged.kernels.triton_store import store_kv

    torch.manual_seed(0)
    cache = torch.zeros(2, 4, 16, 2, 8, device="cuda")  # [K/V, blocks, block_size, Hkv, D]
    flat = torch.randn(10 * 2 * 8 + 1, device="cuda")
    for offset in (0, 1, 0, 1):  # the second view starts 4 bytes past a 16-byte boundary
        key = flat[offset:offset + 10 * 16].view(10, 2, 8)
        slots = torch.randperm(64, device="cuda")[:10]
        store_kv(key, key, cache[0], cache[1], slots)
        got = cache[0].view(64, 2, 8)[slots]
        assert torch.equal(got, key)
