"""Input processing: prompts (text, token ids, chat messages) and parameters checked and turned into `Request`s."""

from __future__ import annotations

from collections.abc import Sequence as SequenceABC

import torch

from .policy import request_priority
from .sampling_params import SamplingParams
from .sequence import Request

__all__ = ["InputProcessor", "Prompt", "eos_token_ids", "per_prompt", "render_chat"]

Prompt = str | list[int]


def render_chat(tokenizer, messages: SequenceABC[dict], *, chat_template: str | None = None,
                add_generation_prompt: bool = True) -> list[int]:
    """Token ids of chat ``messages`` (``{"role", "content"}`` dicts) through the chat template.

    ``chat_template`` overrides the tokenizer's. The rendered text holds the special tokens the
    template wants (BOS...), so it is encoded without adding more. A tokenizer without a template
    joins the contents with blank lines and encodes them as any prompt. A template that rejects
    the messages, or messages that render to nothing, raise ``ValueError``.

    Example:
        >>> render_chat(tok, [{"role": "user", "content": "Hi"}])  # doctest: +SKIP
        [1, 9690, 198, ...]
    """
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        text = "\n\n".join(m["content"] for m in messages if m.get("content"))
        ids = list(tokenizer(text)["input_ids"]) if text else []
    else:
        try:
            text = tokenizer.apply_chat_template(
                list(messages), chat_template=chat_template, tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
        except Exception as e:  # a template may raise on messages it does not accept (roles, order)
            raise ValueError(f"the chat template rejected the messages: {e}") from e
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []
    if not ids:
        raise ValueError("the messages render to an empty prompt")
    return ids


class InputProcessor:
    """Tokenizes and validates what `Engine.add_request` receives.

    Args:
        tokenizer: encodes text prompts (``None``: token ids only, no stop strings).
        vocab_size: prompt token ids must lie in ``[0, vocab_size)``.
        eos_token_ids: the model's EOS ids (the default stop tokens).
        capacity_tokens: KV slots of the whole pool: longer requests can never run.
    """

    def __init__(self, tokenizer, *, vocab_size: int, eos_token_ids: list[int], capacity_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.capacity_tokens = capacity_tokens

    def process(self, request_id: str, prompt: Prompt, sampling_params: SamplingParams | dict | None,
                *, stream_text: bool = False, detokenize: bool = True) -> Request:
        """A `Request` for ``prompt``; a bad one raises ``ValueError`` saying what is wrong.

        ``detokenize=False`` leaves text to the client, unless stop strings need it here.
        """
        params = SamplingParams.coerce(sampling_params)
        token_ids = self.tokenize(prompt)
        self._check(token_ids, params)
        stops = set(params.stop_token_ids if params.stop_token_ids is not None else self.eos_token_ids)
        if params.ignore_eos:
            stops -= set(self.eos_token_ids)
        detokenize = (detokenize or bool(params.stop)) and self.tokenizer is not None
        return Request(
            request_id, token_ids, params, frozenset(stops), prompt=prompt if isinstance(prompt, str) else None,
            priority=request_priority(request_id, token_ids, params),
            stream_text=stream_text and detokenize, detokenize=detokenize,
        )

    def tokenize(self, prompt: Prompt) -> list[int]:
        """Token ids of a text prompt (with the tokenizer's special tokens), a list or a 1D tensor of ids."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer (pass tokenizer=...), or pass token ids")
            return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        if isinstance(prompt, torch.Tensor):
            if prompt.dim() != 1:
                raise ValueError(f"a tensor prompt must be 1D token ids, got shape {tuple(prompt.shape)}")
            return prompt.tolist()
        if not isinstance(prompt, (list, tuple)) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            raise ValueError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        return list(prompt)

    def _check(self, token_ids: list[int], params: SamplingParams) -> None:
        if not token_ids:
            raise ValueError("the prompt is empty")
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer (pass tokenizer=...)")
        needed = len(token_ids) + params.max_new_tokens
        if needed > self.capacity_tokens:
            raise ValueError(
                f"the prompt ({len(token_ids)} tokens) plus max_new_tokens ({params.max_new_tokens}) needs "
                f"{needed} KV slots, more than the whole pool holds ({self.capacity_tokens}); raise num_blocks "
                "or lower max_new_tokens"
            )


def per_prompt(sampling_params, num_prompts: int) -> list:
    """One sampling-parameters entry per prompt from a single value or a list of ``num_prompts``."""
    if isinstance(sampling_params, (list, tuple)):
        if len(sampling_params) != num_prompts:
            raise ValueError(f"sampling_params has {len(sampling_params)} entries for {num_prompts} prompts")
        return list(sampling_params)
    return [sampling_params] * num_prompts


def eos_token_ids(model) -> list[int]:
    """The model's EOS ids (generation config, else config): the default stop tokens."""
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if eos is not None:
            return [eos] if isinstance(eos, int) else list(eos)
    return []
