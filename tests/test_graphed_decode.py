"""``model.generate``'s one-token steps on a `PagedCache` replay CUDA graphs and give the stock implementation's
tokens. On CPU the capture is emulated (a replay reruns the packed forward over the graphs' static inputs),
so block tables, slots, positions and left padding travel exactly as on a GPU; the GPU test is at the end."""

from __future__ import annotations

import pytest
import torch
from tiny_models import (
    ARCHS,
    assert_same_generate,
    make_pair,
    make_tokenizer,
    padded_prompts,
)
from transformers import pipeline

from hf_paged import PagedCache, graphed_decode
from hf_paged.cuda_graphs import DecodeGraphs


@pytest.fixture
def replays(emulated_capture, monkeypatch):
    """Graphs allowed on the CPU; the batch size of every replayed step, in order."""
    monkeypatch.setattr(graphed_decode, "supported", lambda model: True)
    seen, run = [], DecodeGraphs.run
    monkeypatch.setattr(DecodeGraphs, "run", lambda self, ids, *a, **k: seen.append(ids.shape[0]) or run(self, ids, *a, **k))
    return seen


@pytest.mark.parametrize("arch", list(ARCHS))
def test_greedy_left_padded_batch_replays_graphs(replays, arch):
    paged, ref = make_pair(arch)
    ids, mask = padded_prompts()
    assert_same_generate(paged, ref, input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert replays == [3] * 11  # every step after the prompt's


def test_seeded_sampling_and_shared_blocks(replays):
    """num_return_sequences shares each prompt's blocks between its copies: the first graphed step copies the
    shared, partly filled last block of each row (copy on write) before the graph writes into it."""
    paged, ref = make_pair("mistral-window")
    ids, mask = padded_prompts(batch=2, pads=(3, 0))
    cache = PagedCache(paged.config, num_blocks=64, block_size=4)
    assert_same_generate(paged, ref, input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=True, top_k=20,
          temperature=0.8, num_return_sequences=3, seed=7)
    ref_out = assert_same_generate(paged, ref, input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, seed=None)
    assert set(replays) == {6, 2}
    out = paged.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, past_key_values=cache)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    assert cache._decode_graphs is not None and cache.stats().blocks_used > 0


def test_graphs_stay_with_the_cache_and_follow_its_batch(replays):
    paged, ref = make_pair("llama-gqa")
    cache = PagedCache(paged.config, num_blocks=64, block_size=4)
    for batch in (2, 2, 3):
        ids, mask = padded_prompts(batch=batch, seed=batch)
        want = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        graphs = cache._decode_graphs
        out = paged.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                             past_key_values=cache)
        torch.testing.assert_close(out, want, rtol=0, atol=0)
        if batch == 2 and graphs is not None:
            assert cache._decode_graphs is graphs  # the same batch again: captured once
    assert cache._decode_graphs.buckets[-1] == 3


def test_a_continued_cache_and_pipeline_replay_graphs(replays):
    """A second ``generate`` continuing what the cache holds (a chat's next turn) prefills the new tokens eagerly
    and replays its one-token steps; ``pipeline`` (left-padded batches) goes through the same path."""
    paged, ref = make_pair("llama-gqa")
    ids, _ = padded_prompts(batch=1, pads=(0,))
    cache = PagedCache(paged.config, num_blocks=64, block_size=4)
    out = paged.generate(input_ids=ids, max_new_tokens=6, do_sample=False, past_key_values=cache)
    more = torch.cat([out, torch.tensor([[5, 6]])], dim=1)
    got = paged.generate(input_ids=more, max_new_tokens=6, do_sample=False, past_key_values=cache)
    assert torch.equal(got, ref.generate(input_ids=more, max_new_tokens=6, do_sample=False))
    assert replays == [1] * 10 and cache.get_seq_length() == more.shape[1] + 5
    texts = [pipeline("text-generation", model=m, tokenizer=make_tokenizer())(
        ["w5 w9 w17 w33", "w40 w41", "w7 w8 w9 w10 w11 w12"], max_new_tokens=8, do_sample=False, batch_size=3)
        for m in (ref, paged)]
    assert texts[1] == texts[0] and replays[10:] == [3] * 7


def test_disable_compile_keeps_steps_eager(replays):
    paged, ref = make_pair("llama-gqa")
    ids, mask = padded_prompts()
    assert_same_generate(paged, ref, input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, disable_compile=True)
    assert replays == []


def test_steps_the_graph_cannot_reproduce_run_eagerly(replays):
    """Hidden states asked for, and a sequence longer than the graph's context: eager steps, same tokens."""
    paged, ref = make_pair("llama-gqa")
    ids, mask = padded_prompts()
    out = paged.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                         output_hidden_states=True, return_dict_in_generate=True)
    assert replays == [] and len(out.hidden_states) == 4
    cache = PagedCache(paged.config, num_blocks=64, block_size=4, max_cache_len=12)  # graphs for 12 tokens
    assert_same_generate(paged, ref, input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    replays.clear()
    out = paged.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, past_key_values=cache)
    assert replays == [3, 3, 3]  # 10, 11 and 12 tokens; 13 and 14 eager
    torch.testing.assert_close(out, assert_same_generate(paged, ref, input_ids=ids, attention_mask=mask, max_new_tokens=6,
                                          do_sample=False), rtol=0, atol=0)


def test_a_forward_that_cannot_be_captured_runs_eagerly(replays, monkeypatch, caplog):
    """A model whose forward fails to capture (a host sync inside, say) warns once and runs its steps eagerly,
    in that call and the next ones, with the stock tokens."""
    from hf_paged import cuda_graphs

    attempts = []

    def fail(pool, forward):
        attempts.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(cuda_graphs, "capture_graph", fail)
    paged, ref = make_pair("llama-gqa")
    ids, mask = padded_prompts()
    with caplog.at_level("WARNING", logger="hf_paged.graphed_decode"):
        for _ in range(2):
            assert_same_generate(paged, ref, input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert attempts == [1] and replays == []
    assert "cannot be captured" in caplog.text and "operation not permitted" in caplog.text


def test_not_offered_on_cpu():
    paged, _ = make_pair("llama-gqa")
    assert not graphed_decode.supported(paged)


@pytest.mark.gpu
def test_gpu_graphed_generate_matches_eager(monkeypatch):
    """fp32 on the GPU: graphed one-token steps (really replayed: counted) give the eager steps' tokens, greedy and
    seeded sampling."""
    replayed, run = [], DecodeGraphs.run
    monkeypatch.setattr(DecodeGraphs, "run", lambda self, *a, **k: replayed.append(1) or run(self, *a, **k))
    paged, _ = make_pair("llama-gqa")
    paged.cuda()
    ids, mask = (t.cuda() for t in padded_prompts())
    for kwargs in (dict(do_sample=False), dict(do_sample=True, top_k=20, temperature=0.8)):
        outs = []
        for disable in (True, False):
            torch.manual_seed(5)
            replayed.clear()
            outs.append(paged.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, min_new_tokens=24,
                                       disable_compile=disable, **kwargs))
            assert len(replayed) == (0 if disable else 23)
        torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
