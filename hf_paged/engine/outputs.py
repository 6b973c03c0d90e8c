"""What the engine hands back (per-step updates, finished outputs, run statistics) and what its sampler hands on."""

from __future__ import annotations

from dataclasses import dataclass, field

from .sequence import Request

__all__ = ["EngineStats", "GenerationOutput", "RequestUpdate", "SampleOutput", "SamplerOutput"]


@dataclass
class SampleOutput:
    """One sample of a request (a request with ``n > 1`` has several).

    ``logprobs`` (when requested): per generated token, ``(logprob of the token, {token: logprob}
    of the top ``k``)``.
    """

    index: int
    token_ids: list[int]
    text: str | None
    finish_reason: str | None
    logprobs: list[tuple[float, dict[int, float]]] | None = None


@dataclass
class GenerationOutput:
    """The result of one finished request.

    ``token_ids``, ``text``, ``finish_reason`` and ``logprobs`` are those of the first sample;
    ``samples`` holds all ``n``. ``finish_reason`` is ``"length"``, ``"stop"``, ``"abort"`` or
    ``"error"`` (then ``error`` says why and no tokens were generated). Times are seconds since
    the request was added. ``prompt_logprobs`` (when requested) has one entry per prompt token:
    ``None`` for position 0 and positions before ``prompt_logprobs_start``, else
    ``(logprob of the token given its prefix, {token: logprob} of the top k)``.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    samples: list[SampleOutput] = field(default_factory=list)
    error: str | None = None
    time_to_first_token: float | None = None
    total_time: float = 0.0
    num_cached_tokens: int = 0
    prompt_logprobs: list[tuple[float, dict[int, float]] | None] | None = None

    @property
    def token_ids(self) -> list[int]:
        return self.samples[0].token_ids if self.samples else []

    @property
    def text(self) -> str | None:
        return self.samples[0].text if self.samples else None

    @property
    def finish_reason(self) -> str:
        if self.error is not None:
            return "error"
        return self.samples[0].finish_reason if self.samples else "abort"

    @property
    def logprobs(self) -> list[tuple[float, dict[int, float]]] | None:
        return self.samples[0].logprobs if self.samples else None


@dataclass(slots=True)  # one per sample per step: the hot path of output processing
class RequestUpdate:
    """New tokens of one sample after a step (what a streaming server forwards).

    ``text_delta`` is set when the engine has a tokenizer. ``finish_reason`` is set when this
    sample ended; ``output`` when the whole request did.
    """

    request_id: str
    sample_index: int
    new_token_ids: list[int]
    text_delta: str | None = None
    finish_reason: str | None = None
    output: GenerationOutput | None = None

    @property
    def finished(self) -> bool:
        return self.output is not None


@dataclass
class EngineStats:
    """Accounting of an engine since it was built (or since `Engine.reset_stats`).

    ``kv_waste`` is the share of reserved KV slots holding no token, averaged over steps;
    ``prefix_hit_rate`` the share of prompt tokens served from the prefix cache.
    """

    requests_finished: int
    prompt_tokens: int
    output_tokens: int
    steps: int
    elapsed_s: float
    num_blocks: int
    block_size: int
    kv_pool_bytes: int
    peak_blocks_used: int
    kv_waste: float
    prefix_hit_rate: float
    prefix_hit_tokens: int
    preemptions: int

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["output_tokens_per_s"] = self.output_tokens_per_s
        return d


@dataclass
class SamplerOutput:
    """Sampled token per row; with logprobs, ``(token logprob, {token: logprob} top-k)`` per row (else ``None``).

    ``prompt_logprobs``: per request that asked for them this step, ``(request, first position,
    values)`` with one ``(logprob, top-k dict)`` per scored prompt position.
    """

    token_ids: list[int]
    logprobs: list[tuple[float, dict[int, float]] | None] | None = None
    prompt_logprobs: list[tuple[Request, int, list]] | None = None
