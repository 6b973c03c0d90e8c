"""Plugin for Simon Willison's ``llm`` CLI: local model directories as streaming ``llm`` models.

Models are listed in ``hf-paged-models.json`` in llm's user directory (``llm`` prints it with
``dirname "$(llm logs path)"``; ``LLM_USER_PATH`` moves it)::

    {"tiny": "/models/tiny-llama",
     "qwen": {"path": "/models/qwen2.5-0.5b", "dtype": "bfloat16", "aliases": ["q"], "max_tokens": 512}}

or in the environment: ``HF_PAGED_LLM_MODELS=tiny=/models/tiny-llama:/models/qwen`` (entries separated by
``os.pathsep``; without ``name=`` the directory's name is used). Each becomes ``hf-paged/<name>``::

    llm -m hf-paged/tiny "Tell me a joke" -o max_tokens 64 -o temperature 0

The model is loaded on first use; every prompt is a request of one `Engine` per model, driven by its
`AsyncEngine` thread, so prompts from several threads batch together. Defaults for sampling come from
the model's generation config (greedy unless it samples). The engines are shut down when the
interpreter exits (`shutdown_engines` does it earlier).
"""

from __future__ import annotations

import atexit
import json
import os
import threading
from pathlib import Path

from . import require

llm = require("llm", "llm")

from pydantic import Field  # noqa: E402

from ..engine import AsyncEngine, Engine, SamplingParams  # noqa: E402
from ..engine.input_processor import render_chat  # noqa: E402
from ..loader import load_model  # noqa: E402

__all__ = ["CONFIG_FILE", "ENV_VAR", "HfPagedModel", "configured_models", "register_models", "shutdown_engines"]

CONFIG_FILE = "hf-paged-models.json"
ENV_VAR = "HF_PAGED_LLM_MODELS"
MODEL_PREFIX = "hf-paged/"
# Keys of a model entry that configure loading or the engine (the rest are rejected).
_ENGINE_KEYS = {"block_size", "num_blocks", "memory_fraction", "max_num_seqs", "max_num_batched_tokens"}
_KEYS = {"path", "dtype", "device", "aliases", "max_tokens", "trust_remote_code"} | _ENGINE_KEYS


def configured_models() -> dict[str, dict]:
    """``name -> settings`` from ``hf-paged-models.json`` in llm's user directory, then ``HF_PAGED_LLM_MODELS``."""
    models: dict[str, dict] = {}
    path = Path(llm.user_dir()) / CONFIG_FILE
    if path.exists():
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected an object of name -> directory or settings")
        for name, spec in data.items():
            spec = {"path": spec} if isinstance(spec, str) else dict(spec)
            unknown = set(spec) - _KEYS
            if "path" not in spec or unknown:
                raise ValueError(f"{path}: model {name!r} needs a 'path' and takes only {sorted(_KEYS)}")
            models[name] = spec
    for item in filter(None, os.environ.get(ENV_VAR, "").split(os.pathsep)):
        name, sep, directory = item.partition("=")
        if not sep:
            name, directory = Path(item).name, item
        models[name] = {"path": directory}
    return models


@llm.hookimpl
def register_models(register) -> None:
    for name, spec in configured_models().items():
        register(HfPagedModel(name, spec), aliases=tuple(spec.get("aliases", ())))


# One engine per loaded model, shared by every prompt (and every HfPagedModel instance:
# llm rebuilds its model list on each lookup).
_RUNNERS: dict[str, AsyncEngine] = {}
_RUNNERS_LOCK = threading.Lock()


@atexit.register
def shutdown_engines() -> None:
    """Shut down every engine this module started (requests in flight end aborted; KV pools freed)."""
    with _RUNNERS_LOCK:
        runners = list(_RUNNERS.values())
        _RUNNERS.clear()
    for runner in runners:
        runner.shutdown(join_timeout=5.0)


class HfPagedModel(llm.Model):
    """A local causal LM served by hf_paged's continuous-batching engine; streams text as it decodes."""

    can_stream = True

    class Options(llm.Options):
        max_tokens: int | None = Field(None, description="Tokens to generate at most (default 256)", ge=1)
        temperature: float | None = Field(None, description="0 decodes greedily", ge=0)
        top_p: float | None = Field(None, gt=0, le=1)
        top_k: int | None = Field(None, ge=0)
        seed: int | None = Field(None, ge=0)

    def __init__(self, name: str, spec: dict) -> None:
        self.model_id = MODEL_PREFIX + name
        self.spec = spec

    def runner(self) -> AsyncEngine:
        """The `AsyncEngine` of this model, loading the model on first use."""
        key = json.dumps(self.spec, sort_keys=True)
        with _RUNNERS_LOCK:
            if key not in _RUNNERS:
                model, tokenizer = load_model(
                    self.spec["path"], dtype=self.spec.get("dtype"), device=self.spec.get("device"),
                    trust_remote_code=bool(self.spec.get("trust_remote_code", False)),
                )
                engine = Engine(model, tokenizer=tokenizer, **{k: v for k, v in self.spec.items() if k in _ENGINE_KEYS})
                _RUNNERS[key] = AsyncEngine(engine, name=f"hf-paged-{self.model_id}")
            return _RUNNERS[key]

    def execute(self, prompt, stream, response, conversation):
        runner = self.runner()
        engine = runner.engine
        try:
            ids = render_chat(engine.tokenizer, _messages(prompt, conversation))
        except ValueError as e:
            raise llm.ModelError(f"hf-paged: {e}") from e
        params = self._sampling_params(prompt.options, engine)
        # The deltas (held back around stop strings, the rest on the last update) add up to the text.
        for update in runner.stream(ids, params, stream_text=True):
            if update.text_delta:
                yield update.text_delta
            if update.finished:
                out = update.output
                if out.error is not None:
                    raise llm.ModelError(f"hf-paged: {out.error}")
                response.set_usage(input=len(ids), output=len(out.token_ids))

    def _sampling_params(self, options, engine: Engine) -> SamplingParams:
        gen = getattr(engine.model, "generation_config", None)
        sampling = bool(getattr(gen, "do_sample", False))
        temperature = options.temperature
        if temperature is None:
            temperature = float(getattr(gen, "temperature", None) or 1.0) if sampling else 0.0
        top_p = options.top_p if options.top_p is not None else (getattr(gen, "top_p", None) or 1.0) if sampling else 1.0
        top_k = options.top_k if options.top_k is not None else (getattr(gen, "top_k", None) or 0) if sampling else 0
        return SamplingParams(
            max_new_tokens=options.max_tokens or int(self.spec.get("max_tokens", 256)),
            temperature=temperature, top_p=float(top_p), top_k=int(top_k), seed=options.seed,
        )


def _messages(prompt, conversation) -> list[dict[str, str]]:
    """System prompt, earlier turns of the conversation, then this prompt, as chat messages."""
    messages = []
    if prompt.system:
        messages.append({"role": "system", "content": prompt.system})
    for earlier in getattr(conversation, "responses", None) or []:
        if earlier.prompt.prompt:
            messages.append({"role": "user", "content": earlier.prompt.prompt})
        messages.append({"role": "assistant", "content": earlier.text_or_raise()})
    messages.append({"role": "user", "content": prompt.prompt or ""})
    return messages
