"""Bad input raises an error naming the problem, and the pool keeps no leaked block."""

import pytest
import torch
from tiny_models import VOCAB, make_config, make_pair
from transformers import AutoModelForCausalLM, BartConfig, BartForConditionalGeneration

from hf_paged import OutOfBlocksError, PagedCache


def _ids(batch, length):
    return torch.randint(4, VOCAB, (batch, length), generator=torch.Generator().manual_seed(0))


def test_prompt_longer_than_cache():
    paged, _ = make_pair("llama-gqa")
    cache = PagedCache(paged.config, num_blocks=2, block_size=4)
    with pytest.raises(OutOfBlocksError, match="sequence of 12 tokens needs 3 blocks of 4, but the cache has only 2"):
        paged.generate(input_ids=_ids(1, 12), max_new_tokens=4, past_key_values=cache)
    assert cache.pool.blocks.num_free == 2


def test_running_out_mid_generation_frees_everything():
    paged, _ = make_pair("llama-gqa")
    cache = PagedCache(paged.config, num_blocks=5, block_size=4)
    with pytest.raises(OutOfBlocksError, match="out of KV blocks"):
        paged.generate(input_ids=_ids(2, 7), max_new_tokens=20, past_key_values=cache, do_sample=False)
    assert cache.pool.blocks.num_free == 5
    assert cache.get_seq_length() == 0


@pytest.mark.parametrize(
    "other,match",
    [
        (dict(num_key_value_heads=4), "built for a config with 4 KV heads of dim 16, but layer 0 gave 2 heads"),
        (dict(num_hidden_layers=1), "built for 1 layers, got layer index 1"),
    ],
)
def test_cache_built_for_another_model(other, match):
    paged, _ = make_pair("llama-gqa")
    cfg = make_config("llama-gqa")
    for k, v in other.items():
        setattr(cfg, k, v)
    cache = PagedCache(cfg, num_blocks=16)
    with pytest.raises(ValueError, match=match):
        paged.generate(input_ids=_ids(1, 5), max_new_tokens=3, past_key_values=cache)
    assert cache.pool is None or cache.pool.blocks.num_free == 16


def test_cache_of_another_dtype():
    paged, _ = make_pair("llama-gqa")
    cache = PagedCache(paged.config, num_blocks=16, dtype=torch.float16)
    with pytest.raises(ValueError, match="stores torch.float16, got keys of torch.float32"):
        paged.generate(input_ids=_ids(1, 5), max_new_tokens=3, past_key_values=cache)


def test_right_padding_is_refused():
    paged, _ = make_pair("llama-gqa")
    ids = _ids(2, 6)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    with pytest.raises(NotImplementedError, match="left padding only"):
        paged(input_ids=ids, attention_mask=mask)


def test_encoder_decoder_is_refused():
    cfg = BartConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64)
    model = BartForConditionalGeneration(cfg).eval()
    model.set_attn_implementation("paged")
    with pytest.raises(NotImplementedError, match="paged"):
        model.generate(input_ids=_ids(1, 5) % 64, max_new_tokens=3)


def test_attention_sinks_are_refused():
    paged, _ = make_pair("llama-gqa")
    attn = paged.model.layers[0].self_attn
    attn.sinks = torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(NotImplementedError, match="sinks"):
        paged(input_ids=_ids(1, 4))


def test_bad_cache_arguments():
    cfg = make_config("llama-gqa")
    with pytest.raises(ValueError, match="block_size"):
        PagedCache(cfg, block_size=0)
    with pytest.raises(ValueError, match="num_blocks"):
        PagedCache(cfg, num_blocks=0)
    model = AutoModelForCausalLM.from_config(make_config("llama-gqa"), attn_implementation="paged")
    with pytest.raises(ValueError, match="memory_fraction"):
        model.generate(input_ids=_ids(1, 4), max_new_tokens=2,
                       past_key_values=PagedCache(cfg, memory_fraction=1.5))
