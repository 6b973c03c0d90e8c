"""The example kernel-backend plugin (examples/kernel_backend_plugin) loads through the entry-point path.

Nothing is installed: a ``.dist-info`` directory like the one ``pip install`` would write is put on
``sys.path`` next to the example module, so ``importlib.metadata`` (and pluggy's
``load_setuptools_entrypoints``, which hf_paged's plugin manager calls) find it as a distribution.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest
import torch
from tiny_models import make_pair

from hf_paged.kernels import PLUGIN_GROUP, get_backend, plugin_manager

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "kernel_backend_plugin"


@pytest.fixture()
def fake_install(tmp_path, monkeypatch):
    dist_info = tmp_path / "hf_paged_counting_backend-0.1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: hf-paged-counting-backend\nVersion: 0.1.0\n")
    (dist_info / "entry_points.txt").write_text(f"[{PLUGIN_GROUP}]\ncounting = hf_paged_counting_backend\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(EXAMPLE))
    # A fresh plugin manager reads the entry points again; restore the usual one afterwards.
    plugin_manager.cache_clear()
    get_backend.cache_clear()
    yield
    plugin_manager.cache_clear()
    get_backend.cache_clear()


def test_example_plugin_is_loaded_from_its_entry_point(fake_install, monkeypatch):
    assert "counting" in {ep.name for ep in metadata.entry_points(group=PLUGIN_GROUP)}
    pm = plugin_manager()
    plugin = pm.get_plugin("counting")
    assert plugin is not None and plugin.__name__ == "hf_paged_counting_backend"
    assert pm.get_plugin("reference") is not None
    # Installed but not asked for: the default choice is unchanged.
    assert get_backend(torch.device("cpu"), torch.float32).name != "counting"

    monkeypatch.setenv("HF_PAGED_BACKEND", "counting")
    get_backend.cache_clear()
    assert get_backend(torch.device("cpu"), torch.float32) is plugin
    paged, ref = make_pair("llama-gqa")
    ids = torch.tensor([[5, 6, 7]])
    out = paged.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    want = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert torch.equal(out, want)
    assert plugin.calls["store_kv"] > 0 and plugin.calls["paged_attention"] > 0
