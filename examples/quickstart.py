"""Quickstart: build a small model offline, generate with "sdpa" and with "paged", compare.

Prints whether the tokens match, the tokens/s of each, and the KV memory the PagedCache used versus a
contiguous cache reserved for the model's maximum length.

    python examples/quickstart.py
"""

from __future__ import annotations

import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import hf_paged

MAX_LEN = 2048  # what a contiguous cache reserves per sequence
NEW_TOKENS = 48


def build_model(path: str) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=MAX_LEN,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.1,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(path)


def left_padded_batch(lengths: list[int], vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, vocab, (n,), generator=g)
        mask[row, width - n :] = 1
    return ids, mask


def timed_generate(model, cache=None, **kwargs) -> tuple[torch.Tensor, float]:
    model.generate(**kwargs, max_new_tokens=2)  # warm-up
    if cache is not None:
        kwargs["past_key_values"] = cache
    start = time.perf_counter()
    out = model.generate(**kwargs, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)
    return out, time.perf_counter() - start


def main() -> None:
    with tempfile.TemporaryDirectory() as path:
        build_model(path)
        sdpa = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
        paged = AutoModelForCausalLM.from_pretrained(path, attn_implementation="paged").eval()
    cfg = paged.config
    ids, mask = left_padded_batch([5, 17, 33, 64, 9, 120, 48, 2], cfg.vocab_size)
    batch, new = ids.shape[0], NEW_TOKENS

    want, t_sdpa = timed_generate(sdpa, input_ids=ids, attention_mask=mask)
    cache = hf_paged.PagedCache(cfg, num_blocks=256)
    got, t_paged = timed_generate(paged, cache, input_ids=ids, attention_mask=mask)
    stats = cache.stats()

    head_dim = cfg.hidden_size // cfg.num_attention_heads
    contiguous = 2 * cfg.num_hidden_layers * batch * MAX_LEN * cfg.num_key_value_heads * head_dim * 4
    print(f"tokens match sdpa:      {torch.equal(got, want)}")
    print(f"sdpa  generate:         {batch * new / t_sdpa:8.1f} tok/s")
    print(f"paged generate:         {batch * new / t_paged:8.1f} tok/s")
    print(
        f"PagedCache KV memory:   {stats.bytes_used / 2**20:8.2f} MiB "
        f"({stats.blocks_used} blocks of {stats.block_size}, {stats.tokens_stored} tokens, "
        f"waste {stats.waste_fraction:.1%})"
    )
    print(f"contiguous KV memory:   {contiguous / 2**20:8.2f} MiB ({batch} x {MAX_LEN} tokens reserved)")


if __name__ == "__main__":
    main()
