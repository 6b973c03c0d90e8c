"""An offline demo model for ``hf-paged serve --demo``: a small random Llama and a word-level tokenizer.

Its output is random words, but every code path of the server (streaming, chat template, stops,
metrics) runs without downloading anything.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

__all__ = ["DEMO_CHAT_TEMPLATE", "DEMO_MODEL_NAME", "build_demo", "build_demo_tokenizer"]

DEMO_MODEL_NAME = "hf-paged-demo"

_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
_WORDS = (
    "the of and to a in is it you that he was for on are with as his they be at one have this from or had by "
    "hot word but what some we can out other were all there when up use your how said an each she which do "
    "their time if will way about many then them write would like so these her long make thing see him two "
    "has look more day could go come did number sound no most people my over know water than call first who "
    "may down side been now find any new work part take get place made live where after back little only "
    "round man year came show every good me give our under name very through just form sentence great think "
    "say help low line differ turn cause much mean before move right boy old too same tell does set three "
    "want air well also play small end put home read hand port large spell add even land here must big high "
    "such follow act why ask men change went light kind off need house picture try us again animal point "
    "mother world near build self earth father hello paged attention block cache token batch stream server "
    ", . ! ? ' : ; - ( ) 0 1 2 3 4 5 6 7 8 9"
).split()

# Role-tagged turns, then the assistant tag when a reply is wanted.
DEMO_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} <|end|> "
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_demo_tokenizer(vocab_size: int | None = None) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer over a few hundred English words (unknown words: ``<unk>``).

    ``vocab_size``: pad the vocabulary with ``w<id>`` words up to that size, so that every id of a
    random model with a larger vocabulary (a benchmark's 8B or 70B shape) decodes to text.
    """
    words = list(dict.fromkeys(_SPECIALS + _WORDS))
    if vocab_size is not None:
        words += [f"w{i}" for i in range(len(words), vocab_size)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    # Words and punctuation runs apart; role tags are special tokens, matched before this split.
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
    )
    fast.chat_template = DEMO_CHAT_TEMPLATE
    return fast


def build_demo(
    *, hidden_size: int = 128, num_layers: int = 2, max_position_embeddings: int = 2048, seed: int = 0
) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    """A random-weight Llama sized to the demo tokenizer, loaded with ``attn_implementation="paged"``.

    Returns:
        ``(model, tokenizer)``, the model in eval mode on the CPU in float32.
    """
    import hf_paged  # noqa: F401  registers "paged"

    tokenizer = build_demo_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="paged").eval()
    return model, tokenizer
