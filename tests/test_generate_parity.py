"""``attn_implementation="paged"`` generates exactly the tokens of the stock implementation (fp32, CPU)."""

import pytest
import torch
from tiny_models import ARCHS, assert_same_generate, make_pair, make_tokenizer, padded_prompts
from transformers import AutoModelForCausalLM, pipeline

from hf_paged import PagedCache

ALL = list(ARCHS)


@pytest.mark.parametrize("arch", ALL)
def test_greedy_single_prompt(arch):
    paged, ref = make_pair(arch)
    ids, _ = padded_prompts(batch=1, pads=(0,))
    out = assert_same_generate(paged, ref, input_ids=ids, max_new_tokens=16, do_sample=False)
    assert out.shape[1] > ids.shape[1]


@pytest.mark.parametrize("arch", ALL)
def test_greedy_left_padded_batch(arch):
    paged, ref = make_pair(arch)
    ids, mask = padded_prompts()
    assert_same_generate(paged, ref, input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False)


def test_only_prompt_steps_check_the_padding_mask_on_the_host(monkeypatch):
    """Checking that a mask is left padding reads it on the host, a device sync: done at the prompt step, where
    the padding comes in; one-token steps take each row's first key from the mask unchecked (and still match)."""
    import hf_paged.attention as attention

    checks, real = [], attention._left_padding
    monkeypatch.setattr(attention, "_left_padding",
                        lambda mask, kv_len, check: checks.append(check) or real(mask, kv_len, check))
    paged, ref = make_pair("llama-gqa")
    ids, mask = padded_prompts()
    assert_same_generate(paged, ref, input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert checks == [True, False, False, False, False]


@pytest.mark.parametrize("arch", ALL)
def test_seeded_sampling_batch(arch):
    paged, ref = make_pair(arch)
    ids, mask = padded_prompts()
    assert_same_generate(paged, ref, input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=True,
          top_k=20, temperature=0.8, seed=123)


@pytest.mark.parametrize("arch", ALL)
def test_beam_search(arch):
    paged, ref = make_pair(arch)
    ids, mask = padded_prompts(batch=2, pads=(3, 0))
    assert_same_generate(paged, ref, input_ids=ids, attention_mask=mask, max_new_tokens=10, num_beams=2, do_sample=False,
          num_return_sequences=2)


@pytest.mark.parametrize("arch", ["llama-gqa", "mistral-window"])
def test_num_return_sequences_sampling(arch):
    paged, ref = make_pair(arch)
    ids, mask = padded_prompts(batch=2, pads=(2, 0))
    out = assert_same_generate(paged, ref, input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=True,
                num_return_sequences=3, seed=7)
    assert out.shape[0] == 6


@pytest.mark.parametrize("arch", ["llama-gqa", "gemma2-softcap-tied"])
def test_pipeline_text_generation(arch):
    paged, ref = make_pair(arch)
    tok = make_tokenizer()
    prompts = ["w5 w9 w17 w33", "w40 w41", "w7 w8 w9 w10 w11 w12"]
    texts = []
    for model in (ref, paged):
        pipe = pipeline("text-generation", model=model, tokenizer=tok)
        texts.append(pipe(prompts, max_new_tokens=8, do_sample=False, batch_size=3))
    assert texts[1] == texts[0]
    assert texts[1][0][0]["generated_text"].startswith(prompts[0])


def test_explicit_cache_is_used_and_freed_by_reset():
    paged, ref = make_pair("llama-gqa")
    ids, mask = padded_prompts()
    cache = PagedCache(paged.config, num_blocks=64, block_size=4)
    want = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    got = paged.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                         past_key_values=cache)
    assert torch.equal(got, want)
    stats = cache.stats()
    # 3 rows of 9 prompt + 9 stored new tokens (the last one is never fed back) = 18 tokens each.
    assert stats.tokens_stored == 3 * 18
    assert stats.blocks_used == 3 * 5 and stats.slots_reserved == 60
    assert stats.waste == 6 and stats.waste_fraction == pytest.approx(0.1)
    cache.reset()
    assert cache.pool.blocks.num_free == 64


def test_beam_search_shares_blocks():
    """Beams fork block tables instead of copying them: fewer blocks than rows x length."""
    paged, _ = make_pair("llama-gqa")
    ids, _ = padded_prompts(batch=1, length=16, pads=(0,))
    cache = PagedCache(paged.config, num_blocks=64, block_size=4)
    paged.generate(input_ids=ids, max_new_tokens=6, num_beams=4, do_sample=False, past_key_values=cache)
    per_row = -(-cache.get_seq_length() // 4)
    assert cache.stats().blocks_used < 4 * per_row


@pytest.mark.parametrize("arch", ["llama-gqa", "qwen2-bias-window"])
def test_save_and_reload_with_from_pretrained(arch, tmp_path):
    paged, ref = make_pair(arch)
    ref.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="paged").eval()
    assert loaded.config._attn_implementation == "paged"
    ids, mask = padded_prompts()
    assert_same_generate(loaded, ref, input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)


def test_plain_forward_and_dynamic_cache_use_dense_path():
    paged, ref = make_pair("mistral-window")
    ids, mask = padded_prompts()
    with torch.no_grad():
        got = paged(input_ids=ids, attention_mask=mask).logits
        want = ref(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-5, atol=1e-5)
