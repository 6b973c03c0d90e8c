import importlib.metadata

import pytest
import torch
from tiny_models import make_config
from transformers import AttentionInterface, AutoModelForCausalLM

import hf_paged
from hf_paged.kernels import PLUGIN_GROUP, backend, get_backend, hookimpl, plugin_manager


def test_register_is_idempotent():
    from transformers.generation.utils import GenerationMixin

    before = GenerationMixin._prepare_cache_for_generation
    hf_paged.register()
    hf_paged.register()
    assert GenerationMixin._prepare_cache_for_generation is before
    assert "paged" in AttentionInterface._global_mapping


def test_generate_builds_a_paged_cache():
    model = AutoModelForCausalLM.from_config(make_config("llama-gqa"), attn_implementation="paged").eval()
    out = model.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False,
                         return_dict_in_generate=True)
    cache = out.get("cache", out.get("past_key_values"))
    assert isinstance(cache, hf_paged.PagedCache)
    assert cache.stats().tokens_stored == 5


def test_entry_points_are_declared():
    plugins = {ep.name: ep.value for ep in importlib.metadata.entry_points(group=PLUGIN_GROUP)}
    assert plugins.get("reference") == "hf_paged.kernels.reference"
    (register,) = [ep for ep in importlib.metadata.entry_points(group="transformers.attention") if ep.name == "paged"]
    assert register.load() is hf_paged.register


def test_reference_backend_on_cpu():
    assert get_backend(torch.device("cpu"), torch.float32).name == "reference"


def test_a_third_party_backend_plugs_in(monkeypatch):
    calls = []

    class Plugin:
        name = "spy"

        def store_kv(self, *args):
            from hf_paged.kernels import reference

            calls.append("store")
            reference.store_kv(*args)

        def paged_attention(self, *args, **kwargs):
            from hf_paged.kernels import reference

            calls.append("attn")
            return reference.paged_attention(*args, **kwargs)

        @hookimpl
        def hf_paged_kernel_backend(self, device, dtype):
            return self if device.type == "cpu" else None

    plugin = Plugin()
    pm = plugin_manager()
    pm.register(plugin, name="spy")
    get_backend.cache_clear()
    try:
        assert get_backend(torch.device("cpu"), torch.float32) is plugin
        monkeypatch.setenv("HF_PAGED_BACKEND", "reference")
        get_backend.cache_clear()
        assert get_backend(torch.device("cpu"), torch.float32).name == "reference"
        monkeypatch.setenv("HF_PAGED_BACKEND", "nope")
        get_backend.cache_clear()
        with pytest.raises(ValueError, match="HF_PAGED_BACKEND='nope'"):
            get_backend(torch.device("cpu"), torch.float32)
        monkeypatch.delenv("HF_PAGED_BACKEND")
        get_backend.cache_clear()
        model = AutoModelForCausalLM.from_config(make_config("llama-gqa"), attn_implementation="paged").eval()
        model.generate(input_ids=torch.tensor([[5, 6]]), max_new_tokens=2)
        assert "store" in calls and "attn" in calls
    finally:
        pm.unregister(plugin)
        get_backend.cache_clear()
        assert backend.get_backend(torch.device("cpu"), torch.float32).name == "reference"
