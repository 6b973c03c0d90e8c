"""Turning chat messages into prompt token ids (the tokenizer's chat template, else plain text)."""

from __future__ import annotations

__all__ = ["prompt_token_ids"]


def prompt_token_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of ``messages`` (``{"role", "content"}`` dicts) ready for the assistant's reply.

    With a chat template the rendered text already holds its special tokens, so it is encoded
    without adding more (no second BOS). Without one, the contents are joined by blank lines and
    encoded as the tokenizer encodes any prompt.
    """
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = "\n\n".join(m["content"] for m in messages if m.get("content"))
    return list(tokenizer(text)["input_ids"])
