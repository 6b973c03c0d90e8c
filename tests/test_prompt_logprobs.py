"""``SamplingParams.prompt_logprobs``: the engine scores prompt tokens exactly like a plain forward.

The oracle is ``log_softmax`` of one sdpa forward over the whole prompt (fp32, CPU). Runs cover
chunked prefill, top-k, ``prompt_logprobs_start`` with the prefix cache serving the shared
context, and preemption in the middle of a prompt.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import VOCAB, make_pair

from hf_paged import Engine, SamplingParams


@pytest.fixture(scope="module")
def llama():
    return make_pair("llama-gqa")


def _oracle(ref, prompt: list[int]) -> torch.Tensor:
    """``[len(prompt) - 1, vocab]`` log-probabilities of positions 1.. given their prefix."""
    with torch.no_grad():
        logits = ref(torch.tensor([prompt])).logits[0].float()
    return torch.log_softmax(logits, -1)[:-1]


def _prompts(count: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, VOCAB, (length + 3 * i,), generator=g).tolist() for i in range(count)]


def _check(ref, prompt, got, start=1, top_k=0):
    expected = _oracle(ref, prompt)
    assert len(got) == len(prompt)
    assert all(entry is None for entry in got[:start])
    for pos in range(start, len(prompt)):
        value, top = got[pos]
        assert value == pytest.approx(expected[pos - 1, prompt[pos]].item(), abs=1e-4)
        if top_k:
            want = expected[pos - 1].topk(top_k)
            assert list(top) == want.indices.tolist()
            assert list(top.values()) == pytest.approx(want.values.tolist(), abs=1e-4)


def test_prompt_logprobs_match_forward_with_chunked_prefill(llama):
    paged, ref = llama
    prompts = _prompts(3, 21, seed=1)
    engine = Engine(paged, num_blocks=64, block_size=4, max_num_batched_tokens=16)
    params = [SamplingParams(max_new_tokens=2, temperature=0.0, prompt_logprobs=2),
              SamplingParams(max_new_tokens=2, temperature=0.0),
              SamplingParams(max_new_tokens=1, temperature=0.0, prompt_logprobs=0, n=2)]
    outs = engine.generate(prompts, params)
    _check(ref, prompts[0], outs[0].prompt_logprobs, top_k=2)
    assert outs[1].prompt_logprobs is None
    _check(ref, prompts[2], outs[2].prompt_logprobs)
    assert len(outs[2].samples) == 2


def test_prompt_logprobs_start_reuses_cached_context(llama):
    paged, ref = llama
    g = torch.Generator().manual_seed(2)
    context = torch.randint(4, VOCAB, (13,), generator=g).tolist()
    choices = [torch.randint(4, VOCAB, (k,), generator=g).tolist() for k in (1, 3, 2, 4)]
    engine = Engine(paged, num_blocks=64, block_size=4)
    params = SamplingParams(max_new_tokens=1, temperature=0.0, prompt_logprobs=0, prompt_logprobs_start=len(context))
    # The first request computes (and caches) the context; the rest reuse all of its full blocks
    # except the one holding the last context token, whose logits score the first choice token.
    first = engine.generate([context + choices[0]], params)
    rest = engine.generate([context + c for c in choices[1:]], params)
    for out, choice in zip(first + rest, choices):
        _check(ref, context + choice, out.prompt_logprobs, start=len(context))
    assert [o.num_cached_tokens for o in rest] == [12, 12, 12]
    assert engine.stats().prefix_hit_rate > 0


def test_prompt_logprobs_survive_preemption(llama):
    paged, ref = llama
    prompts = _prompts(4, 30, seed=3)
    # 28 blocks of 4 hold fewer than two of these requests at full length: the newest is preempted
    # and recomputed, its prompt log-probabilities already stored must stay, the rest be filled.
    engine = Engine(paged, num_blocks=28, block_size=4, max_num_batched_tokens=12)
    params = SamplingParams(max_new_tokens=20, temperature=0.0, ignore_eos=True, prompt_logprobs=0)
    outs = engine.generate(prompts, params)
    assert engine.stats().preemptions > 0
    for prompt, out in zip(prompts, outs):
        _check(ref, prompt, out.prompt_logprobs)


def test_prompt_logprobs_validation():
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-1)
    with pytest.raises(ValueError, match="prompt_logprobs_start"):
        SamplingParams(prompt_logprobs_start=0)
