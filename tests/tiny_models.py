"""Tiny random-weight models and a local tokenizer for the tests (no hub is reachable)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

import hf_paged  # noqa: F401  registers "paged"

VOCAB = 96
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

# One config per attention feature worth covering; "oracle" is the implementation to compare with.
ARCHS = {
    "llama-gqa": (LlamaConfig, dict(num_key_value_heads=2), "sdpa"),
    "mistral-window": (MistralConfig, dict(num_key_value_heads=2, sliding_window=5), "sdpa"),
    "qwen2-bias-window": (
        Qwen2Config,
        dict(num_key_value_heads=1, use_sliding_window=True, sliding_window=6, max_window_layers=1),
        "sdpa",
    ),
    # sdpa cannot soft-cap logits, so eager is Gemma2's reference implementation.
    "gemma2-softcap-tied": (
        Gemma2Config,
        dict(num_key_value_heads=2, head_dim=16, sliding_window=6, attn_logit_softcapping=1.0,
             final_logit_softcapping=3.0, query_pre_attn_scalar=16, tie_word_embeddings=True,
             initializer_range=0.3),
        "eager",
    ),
}


def make_config(arch: str):
    cls, extra, _ = ARCHS[arch]
    return cls(**_COMMON, **extra)


def make_pair(arch: str, seed: int = 0):
    """(paged model, oracle model) with identical random weights, built from separate configs."""
    _, _, oracle = ARCHS[arch]
    torch.manual_seed(seed)
    ref = AutoModelForCausalLM.from_config(make_config(arch), attn_implementation=oracle).eval()
    paged = AutoModelForCausalLM.from_config(make_config(arch), attn_implementation="paged").eval()
    paged.load_state_dict(ref.state_dict())
    return paged, ref


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over VOCAB ids: "<pad>", "<s>", "</s>", "<unk>", then w4 ... w95."""
    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(4, VOCAB)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        padding_side="left",
    )


def continuation_text(tok, prompt_ids: list[int], output_ids: list[int]) -> str:
    """What the output adds to the prompt's text: ``decode(prompt + output)`` minus ``decode(prompt)``."""
    whole = tok.decode(list(prompt_ids) + list(output_ids), skip_special_tokens=True)
    return whole[len(tok.decode(list(prompt_ids), skip_special_tokens=True)) :]


def padded_prompts(batch: int = 3, length: int = 9, pads=(4, 0, 2), seed: int = 1):
    """``(input_ids, attention_mask)`` of ``batch`` random prompts, row ``i`` left-padded by ``pads[i]``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for row, n in enumerate(pads[:batch]):
        ids[row, :n] = 0
        mask[row, :n] = 0
    return ids, mask


def assert_same_generate(paged, ref, seed=None, **kwargs):
    """``paged.generate(**kwargs)`` gives exactly ``ref``'s output (both seeded with ``seed`` when given)."""
    outs = []
    for model in (ref, paged):
        if seed is not None:
            torch.manual_seed(seed)
        outs.append(model.generate(**kwargs))
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    return outs[1]
