"""Inspect (inspect_ai) model API ``hf_paged``: ``inspect eval TASK --model hf_paged/<model dir>``.

Inspect finds this module through the entry-point group ``inspect_ai`` and the ``@modelapi``
registration below. Every ``generate`` call becomes a request of one continuous-batching `Engine`
per (model, model args), driven by its `AsyncEngine`, and awaits its result: Inspect runs
samples concurrently, so they decode together in the same forwards. ``-M`` model args::

    inspect eval task.py --model hf_paged/./models/tiny -M dtype=float32 -M block_size=16 -M num_blocks=4096

Generation options map onto `SamplingParams`: ``max_tokens``, ``temperature``, ``top_p``,
``top_k``, ``seed``, ``stop_seqs``, ``num_choices``, ``frequency_penalty``, ``presence_penalty``.
Messages go through the tokenizer's chat template. Tools are not supported (no tool-call parsing).

The engines live until the last model API using them is closed (``async with get_model(...)``) or the
interpreter exits; `shutdown_engines` stops them all earlier.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import json
import logging
import threading
from typing import Any

from . import require

require("inspect_ai", "inspect")

from inspect_ai.model import (  # noqa: E402
    ChatCompletionChoice,
    ChatMessageAssistant,
    GenerateConfig,
    ModelAPI,
    ModelOutput,
    ModelUsage,
    modelapi,
)

from ..engine import AsyncEngine, Engine, GenerationOutput, SamplingParams  # noqa: E402
from ..engine.input_processor import render_chat  # noqa: E402
from ..loader import load_model  # noqa: E402

try:  # the api_key of the throwaway instance Inspect builds to look up a model's info
    from inspect_ai.model._model_info import MODEL_INFO_LOOKUP_API_KEY  # noqa: E402
except ImportError:  # pragma: no cover  (older Inspect)
    MODEL_INFO_LOOKUP_API_KEY = "__model_info_lookup__"

__all__ = ["HfPagedAPI", "shutdown_engines"]

logger = logging.getLogger(__name__)

_ENGINE_ARGS = {"block_size", "num_blocks", "memory_fraction", "max_num_seqs", "max_num_batched_tokens",
                "enable_prefix_caching"}
_LOAD_ARGS = {"dtype", "device", "trust_remote_code"}

# One engine per (model, args), shared by every ModelAPI instance Inspect creates for it; the
# count is how many open instances hold it (the last one to close shuts it down).
_RUNNERS: dict[str, AsyncEngine] = {}
_HOLDERS: dict[str, int] = {}
_RUNNERS_LOCK = threading.Lock()
_names = itertools.count()


def _runner_key(model_path: str, args: dict[str, Any]) -> str:
    return json.dumps([model_path, args], sort_keys=True, default=str)


def _acquire(model_path: str, args: dict[str, Any]) -> AsyncEngine:
    key = _runner_key(model_path, args)
    with _RUNNERS_LOCK:
        if key not in _RUNNERS:
            model, tokenizer = load_model(model_path, **{k: v for k, v in args.items() if k in _LOAD_ARGS})
            engine = Engine(model, tokenizer=tokenizer, **{k: v for k, v in args.items() if k in _ENGINE_ARGS})
            _RUNNERS[key] = AsyncEngine(engine, name=f"hf-paged-inspect-{next(_names)}")
            _HOLDERS[key] = 0
        _HOLDERS[key] += 1
        return _RUNNERS[key]


def _release(key: str, runner: AsyncEngine) -> None:
    with _RUNNERS_LOCK:
        if _RUNNERS.get(key) is not runner:  # shut down already (shutdown_engines)
            return
        _HOLDERS[key] -= 1
        if _HOLDERS[key] > 0:
            return
        del _HOLDERS[key], _RUNNERS[key]
    runner.shutdown()


@atexit.register
def shutdown_engines() -> None:
    """Shut down every engine this module started (requests in flight end aborted; KV pools freed)."""
    with _RUNNERS_LOCK:
        runners = list(_RUNNERS.values())
        _RUNNERS.clear()
        _HOLDERS.clear()
    for runner in runners:
        runner.shutdown(join_timeout=5.0)


class HfPagedAPI(ModelAPI):
    """Inspect model API over hf_paged's engine; ``model_name`` is the model directory (or hub id)."""

    def __init__(
        self,
        model_name: str,
        base_url: str | None = None,
        api_key: str | None = None,
        config: GenerateConfig = GenerateConfig(),
        **model_args: Any,
    ) -> None:
        super().__init__(model_name=model_name, base_url=base_url, api_key=api_key, config=config)
        unknown = set(model_args) - _ENGINE_ARGS - _LOAD_ARGS - {"max_connections"}
        if unknown:
            raise ValueError(f"hf_paged: unknown model args {sorted(unknown)}; known: {sorted(_ENGINE_ARGS | _LOAD_ARGS)}")
        self._max_connections = int(model_args.pop("max_connections", 0)) or int(model_args.get("max_num_seqs", 256))
        self._model_args = model_args
        self._runner: AsyncEngine | None = None
        # Inspect also builds a throwaway instance, without the -M args, to look up the model's
        # info (context window...): it never generates, so it must not load a second model.
        if api_key != MODEL_INFO_LOOKUP_API_KEY:
            self._runner = _acquire(model_name, model_args)

    @property
    def runner(self) -> AsyncEngine:
        """This model's `AsyncEngine` (loaded on first use when the constructor did not)."""
        if self._runner is None:
            self._runner = _acquire(self.model_name, self._model_args)
        return self._runner

    def close(self) -> None:
        """Let go of the engine; the last instance holding it shuts it down."""
        runner, self._runner = self._runner, None
        if runner is not None:
            _release(_runner_key(self.model_name, self._model_args), runner)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    def max_connections(self) -> int:
        # Inspect caps concurrent generate calls at this; the engine batches up to max_num_seqs.
        return self._max_connections

    async def generate(self, input, tools, tool_choice, config: GenerateConfig) -> ModelOutput:
        if tools:
            logger.warning("hf_paged: tools are not supported; generating without them")
        runner = self.runner
        messages = [{"role": m.role, "content": m.text} for m in input]
        try:
            ids = render_chat(runner.engine.tokenizer, messages)
        except ValueError as e:
            return ModelOutput.from_content(model=self.model_name, content="", stop_reason="unknown", error=str(e))
        out = await runner.agenerate(ids, _sampling_params(config))
        return _model_output(self.model_name, out)


def _sampling_params(config: GenerateConfig) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=config.max_tokens or 256,
        temperature=config.temperature if config.temperature is not None else 0.0,
        top_p=config.top_p if config.top_p is not None else 1.0,
        top_k=config.top_k or 0,
        seed=config.seed,
        stop=list(config.stop_seqs) if config.stop_seqs else None,
        n=config.num_choices or 1,
        frequency_penalty=config.frequency_penalty or 0.0,
        presence_penalty=config.presence_penalty or 0.0,
    )


def _model_output(model_name: str, out: GenerationOutput) -> ModelOutput:
    if out.error is not None:
        return ModelOutput.from_content(model=model_name, content="", stop_reason="unknown", error=out.error)
    choices = [
        ChatCompletionChoice(
            message=ChatMessageAssistant(content=sample.text or "", model=model_name, source="generate"),
            stop_reason="max_tokens" if sample.finish_reason == "length" else "stop",
        )
        for sample in out.samples
    ]
    output_tokens = sum(len(s.token_ids) for s in out.samples)
    usage = ModelUsage(input_tokens=len(out.prompt_token_ids), output_tokens=output_tokens,
                       total_tokens=len(out.prompt_token_ids) + output_tokens)
    return ModelOutput(model=model_name, choices=choices, usage=usage, time=out.total_time)


@modelapi(name="hf_paged")
def hf_paged() -> type[ModelAPI]:
    return HfPagedAPI
