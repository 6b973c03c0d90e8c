"""`SamplingParams`: how one request is decoded, validated when built."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

__all__ = ["SamplingParams"]


@dataclass
class SamplingParams:
    """Decoding parameters of one request.

    Args:
        max_new_tokens: tokens to generate at most (finish reason ``"length"``).
        temperature: ``0`` decodes greedily; otherwise logits are divided by it before sampling.
        top_k: keep the ``top_k`` most likely tokens (``0`` keeps all).
        top_p: keep the smallest set of tokens whose probability reaches ``top_p`` (``1`` keeps all).
        min_p: drop tokens less likely than ``min_p`` times the most likely one (``0`` keeps all).
        repetition_penalty: Transformers' penalty on tokens of the prompt and the output (``1``: off).
        presence_penalty: subtracted once from the logit of every token already generated.
        frequency_penalty: subtracted from a token's logit once per time it was generated.
        seed: seeds this request's own generator: its samples do not depend on the other requests
            of the batch. ``None`` draws from torch's global generator.
        stop_token_ids: token ids that end the request (finish reason ``"stop"``; the token is kept
            in ``token_ids``). ``None`` means the model's EOS ids (generation config, else config).
        stop: strings that end the request once the decoded output contains one (needs a
            tokenizer); the text is cut before the stop string.
        ignore_eos: do not stop at the model's EOS ids (explicit ``stop_token_ids`` still stop).
        n: independent samples of the prompt; they share the prompt's KV blocks.
        logprobs: ``None``: none; ``0``: the log-probability of each generated token; ``k > 0``: also
            the ``k`` most likely tokens per step (log-softmax of the model's unprocessed logits).
        prompt_logprobs: like ``logprobs`` for the prompt (as in vLLM): the log-probability of each
            prompt token given the tokens before it, in ``GenerationOutput.prompt_logprobs``
            (``None`` at position 0, which has no prefix). Used to score continuations.
        prompt_logprobs_start: first prompt position whose log-probability is wanted (positions
            before it are reported as ``None``). Tokens before ``prompt_logprobs_start - 1`` need no
            logits, so they may still come from the prefix cache: scoring several continuations
            of one context recomputes only the continuations.

    Invalid values raise ``ValueError`` naming the field.

    Example:
        >>> SamplingParams(max_new_tokens=32, temperature=0.0).greedy
        True
    """

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop_token_ids: list[int] | None = None
    stop: list[str] | None = field(default=None)
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    prompt_logprobs_start: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop_token_ids is not None and not isinstance(self.stop_token_ids, list):
            self.stop_token_ids = list(self.stop_token_ids) if _iterable(self.stop_token_ids) else self.stop_token_ids
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        _int_at_least("max_new_tokens", self.max_new_tokens, 1)
        _number_in("temperature", self.temperature, 0.0, math.inf)
        _int_at_least("top_k", self.top_k, 0)
        _number_in("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _number_in("min_p", self.min_p, 0.0, 1.0)
        _number_in("repetition_penalty", self.repetition_penalty, 0.0, math.inf, low_open=True)
        _number_in("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _number_in("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if self.seed is not None:
            _int_at_least("seed", self.seed, 0)
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, list) or not all(
                _is_int(t) and t >= 0 for t in self.stop_token_ids
            ):
                raise ValueError(f"stop_token_ids must be a list of non-negative ints, got {self.stop_token_ids!r}")
        if self.stop is not None:
            if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
                raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        _int_at_least("n", self.n, 1)
        if self.logprobs is not None:
            _int_at_least("logprobs", self.logprobs, 0)
        if self.prompt_logprobs is not None:
            _int_at_least("prompt_logprobs", self.prompt_logprobs, 0)
        _int_at_least("prompt_logprobs_start", self.prompt_logprobs_start, 1)

    @property
    def greedy(self) -> bool:
        """Whether decoding takes the arg-max token (``temperature == 0``)."""
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @classmethod
    def coerce(cls, value: SamplingParams | dict | None) -> SamplingParams:
        """A `SamplingParams` from itself, a dict of its fields, or ``None`` (the defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            value.validate()
            return value
        if isinstance(value, dict):
            unknown = set(value) - {f.name for f in fields(cls)}
            if unknown:
                raise ValueError(f"unknown sampling parameter(s): {sorted(unknown)}")
            return cls(**value)
        raise ValueError(f"sampling_params must be a SamplingParams or a dict, got {type(value).__name__}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _iterable(v) -> bool:
    try:
        iter(v)
    except TypeError:
        return False
    return not isinstance(v, (str, bytes))


def _int_at_least(name: str, value, low: int) -> None:
    if not _is_int(value) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _number_in(name: str, value, low: float, high: float, *, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        upper = f"{high}]" if math.isfinite(high) else "inf)"
        raise ValueError(f"{name} must be a finite number in {bracket}{low}, {upper}, got {value!r}")
