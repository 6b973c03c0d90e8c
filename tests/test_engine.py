"""The continuous-batching engine generates exactly what ``model.generate`` does, prompt by prompt.

fp32 tiny models on CPU; every engine run checks that its KV pool is whole again afterwards.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from tiny_models import VOCAB, continuation_text, make_pair, make_tokenizer

from hf_paged import Engine, SamplingParams, generate_batch

GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def llama():
    return make_pair("llama-gqa")


def _prompts(count: int, lo: int = 1, hi: int = 40, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (count,), generator=g).tolist()
    return [torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in lengths]


# Keyed by the model object itself, not id(): a freed model's id is reused by the next one built, which then
# read the other architecture's cached tokens (seen as an intermittent failure of the sliding-window test).
_REFERENCE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _reference(ref, prompt: list[int], max_new_tokens: int, **kwargs) -> list[int]:
    """Tokens ``ref.generate`` (greedy, alone) adds after ``prompt``, EOS included."""
    cache = _REFERENCE.setdefault(ref, {})
    key = (tuple(prompt), max_new_tokens, tuple(sorted(kwargs.items())))
    if key not in cache:
        ids = torch.tensor([prompt])
        out = ref.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=0, **kwargs,
        )
        cache[key] = out[0, len(prompt):].tolist()
    return cache[key]


def _run(model, prompts, params=GREEDY, **engine_kwargs):
    engine = Engine(model, **engine_kwargs)
    outs = engine.generate(prompts, params)
    _assert_pool_whole(engine)
    return outs, engine


def _assert_pool_whole(engine: Engine) -> None:
    blocks = engine.kv_pool.blocks
    assert not engine.has_unfinished()
    assert blocks.num_free == blocks.num_blocks, "KV blocks leaked"
    assert all(blocks.refcount(b) == 0 for b in range(blocks.num_blocks))


def _assert_matches_reference(ref, prompts, outs, max_new_tokens=GREEDY.max_new_tokens):
    for prompt, out in zip(prompts, outs):
        assert out.error is None, out.error
        assert out.prompt_token_ids == prompt
        assert out.token_ids == _reference(ref, prompt, max_new_tokens)
        assert out.finish_reason == ("stop" if out.token_ids[-1] == 2 else "length")


ENGINE_SETUPS = {
    "roomy": dict(num_blocks=256),
    "chunked-prefill": dict(num_blocks=256, max_num_batched_tokens=16),
    "few-seqs": dict(num_blocks=256, max_num_seqs=2),
    # One sequence of 40 + 12 tokens needs 13 blocks of 4: the batch must preempt and recompute.
    "preempting": dict(num_blocks=16, block_size=4, max_num_batched_tokens=24),
    # One step in flight (the default on CUDA): the same tokens under chunking and preemption.
    "async-chunked-prefill": dict(num_blocks=256, max_num_batched_tokens=16, async_scheduling=True),
    "async-preempting": dict(num_blocks=16, block_size=4, max_num_batched_tokens=24, async_scheduling=True),
}


@pytest.mark.parametrize("setup", list(ENGINE_SETUPS))
def test_greedy_matches_generate(llama, setup):
    paged, ref = llama
    prompts = _prompts(10)
    outs, engine = _run(paged, prompts, **ENGINE_SETUPS[setup])
    _assert_matches_reference(ref, prompts, outs)
    stats = engine.stats()
    assert stats.requests_finished == len(prompts)
    assert stats.output_tokens == sum(len(o.token_ids) for o in outs)
    assert 0 < stats.peak_blocks_used <= engine.kv_pool.num_blocks
    assert 0.0 <= stats.kv_waste < 1.0
    if "preempting" in setup:
        assert stats.preemptions > 0
    else:
        assert stats.preemptions == 0


@pytest.mark.parametrize("caching", [True, False])
def test_prefix_caching_same_tokens_and_hits(llama, caching):
    paged, ref = llama
    g = torch.Generator().manual_seed(3)
    shared = torch.randint(4, VOCAB, (37,), generator=g).tolist()
    prompts = [shared + torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in (1, 5, 9, 14)]
    prompts += [shared[:32], shared[:32]]  # exact duplicates ending on a block boundary
    engine = Engine(paged, num_blocks=128, block_size=8, enable_prefix_caching=caching, max_num_batched_tokens=64)
    first = engine.generate(prompts[:1], GREEDY)  # computes and caches the shared blocks
    rest = engine.generate(prompts[1:], GREEDY)
    _assert_pool_whole(engine)
    _assert_matches_reference(ref, prompts, first + rest)
    stats = engine.stats()
    if caching:
        assert stats.prefix_hit_tokens >= 4 * 32 and stats.prefix_hit_rate > 0.5
        assert all(o.num_cached_tokens > 0 for o in rest)
        # Freed blocks stay cached: the same prompts again are served from the cache.
        again = engine.generate(prompts, GREEDY)
        assert [o.token_ids for o in again] == [o.token_ids for o in first + rest]
        assert again[0].num_cached_tokens == 32  # every full block before the last prompt token
        _assert_pool_whole(engine)
    else:
        assert stats.prefix_hit_tokens == 0 and stats.prefix_hit_rate == 0.0


def test_prefix_cache_evicts_under_pressure(llama):
    """A pool too small to keep old prefixes evicts them and still generates the right tokens."""
    paged, ref = llama
    prompts = _prompts(12, lo=20, hi=40, seed=5)
    outs, engine = _run(paged, prompts + prompts[:3], num_blocks=20, block_size=4, max_num_batched_tokens=32)
    _assert_matches_reference(ref, prompts + prompts[:3], outs)


SAMPLING = SamplingParams(max_new_tokens=10, temperature=0.9, top_k=40, top_p=0.9, min_p=0.02, seed=1234)


def test_seeded_sampling_independent_of_batch(llama):
    paged, _ = llama
    target = _prompts(1, 20, 20, seed=9)[0]
    alone, _ = _run(paged, [target], SAMPLING, num_blocks=64)
    others = _prompts(6, seed=10)
    mixed_params = [SAMPLING] + [
        SamplingParams(max_new_tokens=7, temperature=1.3, seed=i) if i % 2 else SamplingParams(max_new_tokens=9)
        for i in range(len(others))
    ]
    mixed, _ = _run(paged, [target] + others, mixed_params, num_blocks=64, max_num_batched_tokens=24)
    # Preemption and recompute do not disturb a seeded request either.
    tight, engine = _run(paged, [target] + others, mixed_params, num_blocks=12, block_size=4, max_num_batched_tokens=16)
    assert engine.stats().preemptions > 0
    assert alone[0].token_ids == mixed[0].token_ids == tight[0].token_ids
    assert len(alone[0].token_ids) == 10 or alone[0].token_ids[-1] == 2


def test_penalties_match_generate(llama):
    paged, ref = llama
    prompts = _prompts(4, seed=11)
    params = SamplingParams(max_new_tokens=12, temperature=0.0, repetition_penalty=1.8)
    outs, _ = _run(paged, prompts, params, num_blocks=64)
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == _reference(ref, prompt, 12, repetition_penalty=1.8)
    # presence/frequency penalties are OpenAI-style (no generate equivalent): they must change the output.
    strong = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True, frequency_penalty=2.0, presence_penalty=2.0)
    plain = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    a, _ = _run(paged, prompts, strong, num_blocks=64)
    b, _ = _run(paged, prompts, plain, num_blocks=64)
    assert [o.token_ids for o in a] != [o.token_ids for o in b]
    assert all(len(set(o.token_ids)) >= len(set(p.token_ids)) for o, p in zip(a, b))


def test_stop_token_ids_and_ignore_eos(llama):
    paged, ref = llama
    prompt = _prompts(1, 12, 12, seed=4)[0]
    free = _run(paged, [prompt], SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True), num_blocks=32)[0][0]
    assert len(free.token_ids) == 12 and free.finish_reason == "length"
    stop_at = 5
    stop_id = free.token_ids[stop_at]
    first = free.token_ids.index(stop_id)
    out = _run(paged, [prompt], SamplingParams(max_new_tokens=12, temperature=0.0, stop_token_ids=[stop_id]), num_blocks=32)[0][0]
    assert out.token_ids == free.token_ids[: first + 1] and out.finish_reason == "stop"


def test_stop_strings_and_text():
    paged, _ = make_pair("llama-gqa")
    tok = make_tokenizer()
    prompt = "w10 w11 w12 w13 w14 w15"
    base = generate_batch(paged, [prompt], SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True),
                          tokenizer=tok, progress=False)[0]
    words = base.text.split()
    # The text is what the output adds to the prompt's decode, leading space included (as OpenAI and vLLM return it).
    assert len(words) == 10 and base.text == continuation_text(tok, tok(prompt)["input_ids"], base.token_ids)
    assert base.text.startswith(" ")
    stop_word = words[4]
    first = words.index(stop_word)
    out = generate_batch(paged, [prompt], SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True, stop=[stop_word]),
                         tokenizer=tok, progress=False)[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == base.token_ids[: first + 1]
    assert out.text == "".join(" " + w for w in words[:first]) + " "  # cut before the stop string


def test_n_samples_share_prompt_blocks(llama):
    paged, ref = llama
    prompts = _prompts(3, 9, 30, seed=6)
    greedy_n = SamplingParams(max_new_tokens=12, temperature=0.0, n=3)
    outs, engine = _run(paged, prompts, greedy_n, num_blocks=64, block_size=4, enable_prefix_caching=False)
    for prompt, out in zip(prompts, outs):
        assert [s.index for s in out.samples] == [0, 1, 2]
        for sample in out.samples:
            assert sample.token_ids == _reference(ref, prompt, 12)
    # The samples forked the prompt's blocks instead of computing the prompt three times.
    assert engine.stats().peak_blocks_used < 3 * sum(-(-(len(p) + 12) // 4) for p in prompts)

    sampled_n = SamplingParams(max_new_tokens=8, temperature=1.5, n=4, seed=7, ignore_eos=True)
    a, _ = _run(paged, prompts, sampled_n, num_blocks=64, block_size=4)
    b, _ = _run(paged, prompts[:1], sampled_n, num_blocks=14, block_size=4, max_num_batched_tokens=8)
    assert [s.token_ids for s in a[0].samples] == [s.token_ids for s in b[0].samples]
    assert len({tuple(s.token_ids) for s in a[0].samples}) > 1


def test_abort_frees_and_rest_completes(llama):
    paged, ref = llama
    prompts = _prompts(4, seed=12)
    engine = Engine(paged, num_blocks=64, max_num_batched_tokens=16)
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    results = {}
    for _ in range(3):
        for u in engine.step():
            if u.output:
                results[u.request_id] = u.output
    assert engine.abort(ids[1])
    assert not engine.abort(ids[1]) and not engine.abort("nope")
    for u in engine.iter_updates():
        if u.output:
            results[u.request_id] = u.output
    _assert_pool_whole(engine)
    assert results[ids[1]].finish_reason == "abort"
    keep = [0, 2, 3]
    _assert_matches_reference(ref, [prompts[i] for i in keep], [results[ids[i]] for i in keep])


def test_bad_inputs_give_per_request_errors(llama):
    paged, ref = llama
    good = _prompts(3, seed=13)
    prompts = [good[0], [], [5, VOCAB + 3], good[1], list(range(4, 80)) * 3, "w5 w6", good[2], [1, 2]]
    params = [GREEDY] * len(prompts)
    params[7] = {"temperature": -1.0}
    outs, _ = _run(paged, prompts, params, num_blocks=16, block_size=8)
    errors = {i: o.error for i, o in enumerate(outs) if o.error}
    assert set(errors) == {1, 2, 4, 5, 7}
    assert "empty" in errors[1]
    assert "vocabulary" in errors[2]
    assert "pool" in errors[4] and "max_new_tokens" in errors[4]
    assert "tokenizer" in errors[5]
    assert "temperature" in errors[7]
    assert all(outs[i].finish_reason == "error" and outs[i].token_ids == [] for i in errors)
    _assert_matches_reference(ref, good, [outs[0], outs[3], outs[6]])


def test_streaming_updates(llama):
    paged, ref = llama
    tok = make_tokenizer()
    engine = Engine(paged, num_blocks=64, tokenizer=tok, stream_text=True)
    background = engine.add_request(_prompts(1, seed=14)[0], GREEDY)
    prompt = _prompts(1, 10, 10, seed=15)[0]
    tokens, text, last = [], "", None
    for update in engine.stream(prompt, GREEDY):
        tokens += update.new_token_ids
        text += update.text_delta
        last = update
    assert last.finished and last.output.token_ids == tokens == _reference(ref, prompt, 12)
    assert text.strip() == last.output.text.strip()
    rest = [u for u in engine.iter_updates() if u.output]
    assert [u.request_id for u in rest] in ([background], [])
    _assert_pool_whole(engine)


def test_logprobs(llama):
    paged, _ = llama
    prompts = _prompts(3, seed=16)
    params = [SamplingParams(max_new_tokens=6, temperature=0.0, logprobs=3), GREEDY,
              SamplingParams(max_new_tokens=6, temperature=0.7, seed=3, logprobs=0)]
    outs, _ = _run(paged, prompts, params, num_blocks=64)
    assert outs[1].logprobs is None
    lp = outs[0].logprobs
    assert len(lp) == len(outs[0].token_ids)
    for token, (chosen, top) in zip(outs[0].token_ids, lp):
        assert len(top) == 3 and chosen <= 0.0
        assert max(top, key=top.get) == token and top[token] == pytest.approx(chosen)
    assert all(top == {} and chosen <= 0.0 for chosen, top in outs[2].logprobs)


def test_no_packed_sequence_detection(llama, monkeypatch):
    """The runner keeps Transformers from scanning position_ids (a device sync) on every forward."""
    import transformers.masking_utils as mu

    def boom(*a, **k):
        raise AssertionError("packed-sequence detection ran")

    monkeypatch.setattr(mu, "find_packed_sequence_indices", boom)
    paged, ref = llama
    prompts = _prompts(3, seed=17)
    outs, _ = _run(paged, prompts, num_blocks=64)
    _assert_matches_reference(ref, prompts, outs)


def test_engine_steps_have_no_left_padding(llama, monkeypatch):
    """Engine steps are packed without padding: their attention gets ``kv_start=None``, which every backend takes
    (FA4 and the Gluon prompt kernel leave calls with a ``kv_start`` to the Triton kernel)."""
    from hf_paged.kernels import reference

    seen = []
    real = reference.paged_attention
    monkeypatch.setattr(reference, "paged_attention", lambda *a, **kw: seen.append(kw.get("kv_start")) or real(*a, **kw))
    paged, ref = llama
    prompts = _prompts(3, seed=19)
    outs, _ = _run(paged, prompts, num_blocks=64)
    assert seen and all(start is None for start in seen)
    _assert_matches_reference(ref, prompts, outs)


@pytest.mark.parametrize("arch", ["mistral-window", "qwen2-bias-window"])
def test_sliding_window_models(arch):
    paged, ref = make_pair(arch)
    prompts = _prompts(6, 3, 30, seed=18)
    outs, engine = _run(paged, prompts, num_blocks=24, block_size=4, max_num_batched_tokens=16)
    assert engine.stats().preemptions > 0
    _assert_matches_reference(ref, prompts, outs)


def test_generate_batch_switches_model_and_orders_outputs():
    paged, ref = make_pair("llama-gqa")
    paged.set_attn_implementation("sdpa")
    tok = make_tokenizer()
    prompts = ["w20 w21 w22", "w40", "w7 w8 w9 w10 w11 w12 w13"]
    outs = generate_batch(paged, prompts, GREEDY, tokenizer=tok, progress=True)
    assert paged.config._attn_implementation == "paged"
    for text, out in zip(prompts, outs):
        ids = tok(text)["input_ids"]
        assert out.prompt_token_ids == ids and out.prompt == text
        assert out.token_ids == _reference(ref, ids, 12)
        assert out.text == continuation_text(tok, ids, out.token_ids)
        assert out.time_to_first_token is not None and out.total_time >= out.time_to_first_token


def test_rejects_models_that_cannot_run():
    from transformers import AutoModel, AutoModelForSeq2SeqLM, LlamaConfig, T5Config

    t5 = AutoModelForSeq2SeqLM.from_config(T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2))
    with pytest.raises(ValueError, match="encoder-decoder"):
        Engine(t5, num_blocks=4)
    base = AutoModel.from_config(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2))
    with pytest.raises(ValueError, match="language-model head"):
        Engine(base, num_blocks=4)


@pytest.mark.parametrize(
    "field, value",
    [("max_new_tokens", 0), ("temperature", -0.5), ("top_k", -1), ("top_p", 0.0), ("min_p", 1.5),
     ("repetition_penalty", 0.0), ("presence_penalty", 3.0), ("frequency_penalty", float("nan")), ("seed", -1),
     ("stop_token_ids", [1, -2]), ("stop", [""]), ("n", 0), ("logprobs", -1), ("ignore_eos", "yes")],
)
def test_sampling_params_validation(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})
    with pytest.raises(ValueError, match="unknown sampling parameter"):
        SamplingParams.coerce({"temprature": 1.0})


def test_warm_up_gives_back_every_block_and_caches_nothing(llama):
    """The construction-time warm-up (run on CUDA) takes blocks and gives them all back, caching nothing."""
    ref, paged = llama
    prompts = _prompts(4, 20, 40)
    expected = [o.token_ids for o in _run(paged, prompts, num_blocks=64, block_size=4)[0]]
    engine = Engine(paged, num_blocks=64, block_size=4, max_num_batched_tokens=64)
    engine.runner.warm_up()
    _assert_pool_whole(engine)
    assert engine.block_manager.num_cached_blocks == 0
    assert [o.token_ids for o in engine.generate(prompts, GREEDY)] == expected


def test_async_scheduling_keeps_every_meaning(llama):
    """One step in flight: stop tokens and stop strings found a step late drop the extra token; an
    abort while a step runs loses nothing else; penalties and logprobs make their steps synchronous.
    Everything matches the synchronous engine."""
    paged, ref = llama
    tok = make_tokenizer()
    prompts = _prompts(8, 4, 30, seed=21)
    free = _run(paged, prompts[:1], SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True),
                num_blocks=64)[0][0]
    stop_id = free.token_ids[4]
    params = [
        SamplingParams(max_new_tokens=12, temperature=0.0, stop_token_ids=[stop_id]),
        SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True, stop=["w5", "w9"]),
        SamplingParams(max_new_tokens=7, temperature=0.9, seed=3, n=2),
        SamplingParams(max_new_tokens=9, temperature=0.0, repetition_penalty=1.3),
        SamplingParams(max_new_tokens=9, temperature=0.0, logprobs=2),
        SamplingParams(max_new_tokens=6, temperature=0.0, prompt_logprobs=1),
        SamplingParams(max_new_tokens=1, temperature=0.0),
        GREEDY,
    ]
    runs = {}
    for overlap in (False, True):
        engine = Engine(paged, num_blocks=64, block_size=4, max_num_batched_tokens=32, tokenizer=tok,
                        async_scheduling=overlap)
        runs[overlap] = engine.generate(prompts, params)
        _assert_pool_whole(engine)
    for want, got in zip(runs[False], runs[True]):
        assert [(s.token_ids, s.text, s.finish_reason, s.logprobs) for s in got.samples] == \
               [(s.token_ids, s.text, s.finish_reason, s.logprobs) for s in want.samples]
        assert got.prompt_logprobs == want.prompt_logprobs
    assert runs[True][0].token_ids == free.token_ids[: free.token_ids.index(stop_id) + 1]

    # Abort while its step is in flight: reported once, blocks back, the others as in a run without it.
    engine = Engine(paged, num_blocks=64, block_size=4, async_scheduling=True)
    ids = [engine.add_request(p, GREEDY) for p in prompts[:4]]
    results = {}
    for _ in range(3):
        for u in engine.step():
            if u.output:
                results[u.request_id] = u.output
    assert engine._in_flight is not None and engine.abort(ids[2])
    for u in engine.iter_updates():
        if u.output:
            assert u.request_id not in results
            results[u.request_id] = u.output
    _assert_pool_whole(engine)
    assert results[ids[2]].finish_reason == "abort" and len(results[ids[2]].token_ids) <= GREEDY.max_new_tokens
    _assert_matches_reference(ref, [prompts[i] for i in (0, 1, 3)], [results[ids[i]] for i in (0, 1, 3)])
