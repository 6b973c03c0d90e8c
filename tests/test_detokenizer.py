"""`IncrementalDetokenizer`: deltas never split a UTF-8 character, add up to the text, keep the leading space."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tiny_models import continuation_text, make_tokenizer
from transformers import PreTrainedTokenizerFast

from hf_paged.engine.detokenizer import IncrementalDetokenizer, _fast_decoder


@pytest.fixture(scope="module")
def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE without merges: one token per byte, so multi-byte characters span tokens."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<eos>": 0, **{ch: i + 1 for i, ch in enumerate(sorted(alphabet))}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def _stream(tok, ids: list[int], chunk: int = 1, stop=None, prompt=()) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tok, list(prompt), stop)
    deltas = []
    for i in range(0, len(ids), chunk):
        detok.add(ids[i : i + chunk])
        deltas.append(detok.take_delta())
    return [d for d in deltas if d], detok


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_multibyte_characters_are_never_split(byte_tokenizer, chunk):
    text = "héllo wörld: 日本語 👋🏽 ok"
    ids = byte_tokenizer(text)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))  # one token per byte
    deltas, stream = _stream(byte_tokenizer, ids, chunk)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text
    assert stream.take_delta(final=True) == ""


def test_random_bytes_add_up_to_the_full_decode(byte_tokenizer):
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(1, 257) for _ in range(rng.randrange(1, 40))]
        prompt = [rng.randrange(1, 257) for _ in range(rng.randrange(0, 8))]
        full = continuation_text(byte_tokenizer, prompt, ids)
        deltas, stream = _stream(byte_tokenizer, ids, rng.randrange(1, 4), prompt=prompt)
        assert "".join(deltas) + stream.take_delta(final=True) == full == stream.text


def test_holdback_keeps_the_tail_for_stop_strings(byte_tokenizer):
    text = "abc STOP def"
    ids = byte_tokenizer(text)["input_ids"]
    deltas, stream = _stream(byte_tokenizer, ids[: text.index("STOP") + 3], stop=["STOP"])  # up to "abc STO"
    assert "".join(deltas) == "abc "  # "STO" may begin the stop string "STOP": held back
    assert stream.add(ids[text.index("STOP") + 3 :][:1])  # "abc STOP" found
    final = text[: text.index("STOP")]  # cut before the stop string
    assert stream.stop_index == len(final) and stream.text == final
    assert "".join(deltas) + stream.take_delta() == final


def test_special_tokens_are_skipped(byte_tokenizer):
    ids = byte_tokenizer("hi")["input_ids"] + [0]
    deltas, stream = _stream(byte_tokenizer, ids)
    assert "".join(deltas) == "hi"


def test_metaspace_keeps_the_leading_space():
    """SentencePiece-style tokenizers drop the first space of a decode; the output's text keeps it."""
    words = ["<eos>"] + [f"\u2581{w}" for w in ("hello", "big", "world", "again")]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    prompt, output = fast("hello big")["input_ids"], fast("world again")["input_ids"]
    assert fast.decode(output) == "world again"  # decoded alone, the space is lost
    deltas, stream = _stream(fast, output, prompt=prompt)
    assert "".join(deltas) == stream.text == continuation_text(fast, prompt, output) == " world again"


def test_client_detokenizer_matches_the_engine(byte_tokenizer):
    """Front-end detokenization: an engine that sends token ids only (``detokenize=False``) plus a
    `ClientDetokenizer` per request give the deltas and texts the engine's own decoding gives, on a
    byte-level tokenizer whose random outputs split UTF-8 characters across tokens (n=2, seeded)."""
    import torch
    from tiny_models import make_config
    from transformers import AutoModelForCausalLM

    from hf_paged import Engine, SamplingParams
    from hf_paged.engine.detokenizer import ClientDetokenizer

    config = make_config("llama-gqa")
    config.vocab_size, config.eos_token_id = 257, None
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="paged").eval()
    rng = random.Random(1)
    prompts = [[rng.randrange(1, 257) for _ in range(rng.randrange(2, 9))] for _ in range(6)]
    params = [SamplingParams(max_new_tokens=24, temperature=1.0, seed=i, n=1 + i % 2, ignore_eos=True)
              for i in range(len(prompts))]

    def run(detokenize: bool):
        engine = Engine(model, num_blocks=64, tokenizer=byte_tokenizer)
        ids = [engine.add_request(p, sp, stream_text=True, detokenize=detokenize) for p, sp in zip(prompts, params)]
        decoders = {rid: ClientDetokenizer(byte_tokenizer, p, stream_text=True) for rid, p in zip(ids, prompts)}
        deltas, texts = {}, {}
        for update in engine.iter_updates():
            if not detokenize:
                assert update.text_delta is None  # the engine decoded nothing
                update = decoders[update.request_id](update)
            deltas.setdefault((update.request_id, update.sample_index), []).append(update.text_delta)
            if update.output is not None:
                texts[update.request_id] = [s.text for s in update.output.samples]
        return deltas, texts

    engine_deltas, engine_texts = run(True)
    client_deltas, client_texts = run(False)
    assert client_deltas == engine_deltas and client_texts == engine_texts
    assert any(d == "" for ds in engine_deltas.values() for d in ds)  # an incomplete character waited
    assert all(t for texts in engine_texts.values() for t in texts)


def test_fast_decoder_gives_what_decode_gives(byte_tokenizer):
    """The backend's decode is used only where it equals ``tokenizer.decode``, special tokens included."""
    rng = random.Random(3)
    for tok in (byte_tokenizer, make_tokenizer()):
        decode = _fast_decoder(tok)
        assert decode == tok.backend_tokenizer.decode  # the fast path is taken
        for _ in range(50):
            ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(0, 12))]
            for skip in (True, False):
                assert decode(ids, skip_special_tokens=skip) == tok.decode(ids, skip_special_tokens=skip)


def test_fast_decoder_keeps_decode_where_it_cleans_up_spaces(byte_tokenizer):
    tok = PreTrainedTokenizerFast(tokenizer_object=byte_tokenizer.backend_tokenizer, eos_token="<eos>",
                                  clean_up_tokenization_spaces=True)
    assert _fast_decoder(tok) == tok.decode
