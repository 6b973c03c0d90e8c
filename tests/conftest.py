import os

import pytest
import torch

# Triton kernels run on the CPU through Triton's interpreter; it must be chosen before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smol_dir():
    """SmolLM2-135M-Instruct converted from its PyPI wheel into the user cache (once); skipped when it cannot be had."""
    from hf_paged.demo_model import DemoModelUnavailable, demo_model_dir

    try:
        return demo_model_dir(hub=False)
    except DemoModelUnavailable as e:
        pytest.skip(f"real demo model unavailable: {e}")


class _Replay:
    def __init__(self, forward, out):
        self.forward, self.out = forward, out

    def replay(self):
        self.out.copy_(self.forward())


@pytest.fixture
def emulated_capture(monkeypatch):
    """CUDA graphs emulated on the CPU: capturing runs the forward once, a replay reruns it into the captured
    output (so the graphs' static inputs, padding and output buffers are exercised as on a GPU)."""
    from hf_paged import cuda_graphs

    def capture(pool, forward):
        out = forward()
        return _Replay(forward, out), out

    monkeypatch.setattr(cuda_graphs, "capture_graph", capture)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)
