"""`TextStream`: streamed deltas never split a UTF-8 character and add up to the full decode."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

pytest.importorskip("fastapi")  # hf_paged.server needs the serve extra

from hf_paged.server.detokenize import TextStream  # noqa: E402


@pytest.fixture(scope="module")
def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE without merges: one token per byte, so multi-byte characters span tokens."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<eos>": 0, **{ch: i + 1 for i, ch in enumerate(sorted(alphabet))}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def _stream(tok, ids: list[int], chunk: int = 1, holdback: int = 0) -> tuple[list[str], TextStream]:
    stream = TextStream(tok, holdback)
    deltas = [stream.add(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    return [d for d in deltas if d], stream


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_multibyte_characters_are_never_split(byte_tokenizer, chunk):
    text = "héllo wörld: 日本語 👋🏽 ok"
    ids = byte_tokenizer(text)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))  # one token per byte
    deltas, stream = _stream(byte_tokenizer, ids, chunk)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text
    assert stream.finish(text) == ""


def test_random_bytes_add_up_to_the_full_decode(byte_tokenizer):
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(1, 257) for _ in range(rng.randrange(1, 40))]
        full = byte_tokenizer.decode(ids, skip_special_tokens=True)
        deltas, stream = _stream(byte_tokenizer, ids, rng.randrange(1, 4))
        assert "".join(deltas) + stream.finish(full) == full


def test_holdback_keeps_the_tail_for_stop_strings(byte_tokenizer):
    text = "abc STOP def"
    ids = byte_tokenizer(text)["input_ids"]
    stream = TextStream(byte_tokenizer, holdback=3)
    sent = "".join(stream.add([i]) for i in ids[: text.index("STOP") + 3])  # up to "abc STO"
    assert sent == "abc "  # "STO" may begin the stop string "STOP": held back
    final = text[: text.index("STOP")]  # the engine cut the text before the stop string
    assert sent + stream.finish(final) == final


def test_special_tokens_are_skipped(byte_tokenizer):
    ids = byte_tokenizer("hi")["input_ids"] + [0]
    deltas, stream = _stream(byte_tokenizer, ids)
    assert "".join(deltas) == "hi"
