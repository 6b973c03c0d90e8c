"""lm-evaluation-harness model ``hf-paged``: every request list goes through one continuous-batching `Engine`.

* ``generate_until``: all requests are queued at once, each with its own ``until`` stop strings
  and ``max_gen_toks``; results come back in request order.
* ``loglikelihood`` / ``loglikelihood_rolling``: each (context, continuation) becomes a request
  with ``prompt_logprobs`` from the first continuation token on, so the engine scores only the
  continuation and serves the shared context from its prefix cache. The first request of every
  distinct context runs before the others, so the others find that context cached.

Use it from Python::

    import lm_eval
    from hf_paged.integrations.lm_eval import HfPagedLM

    lm_eval.simple_evaluate(model=HfPagedLM(pretrained="path/to/model"), tasks=["hellaswag"])

or by name (entry point ``hf-paged`` in the group ``lm_eval.models``): lm-eval versions that read
that group find it themselves; for the others, `register` adds it to lm-eval's model registry and
``python -m hf_paged.integrations.lm_eval run --model hf-paged --model_args pretrained=DIR --tasks ...``
runs lm-eval's own CLI after registering.
"""

from __future__ import annotations

import logging
import queue
import sys
from collections.abc import Iterable
from importlib import metadata

from . import require

require("lm_eval", "lm-eval")

import torch  # noqa: E402
from lm_eval.api.model import TemplateLM  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string  # noqa: E402

from ..engine import AsyncEngine, Engine, GenerationOutput, RequestUpdate, SamplingParams  # noqa: E402
from ..cache.geometry import max_model_len  # noqa: E402
from ..loader import load_model, resolve_device  # noqa: E402

__all__ = ["ENTRY_POINT_GROUP", "HfPagedLM", "register"]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "lm_eval.models"
_DEFAULT_MAX_LENGTH = 2048


class HfPagedLM(TemplateLM):
    """An lm-eval ``LM`` backed by hf_paged's continuous-batching engine.

    Args:
        pretrained: a model directory / hub id, or an already loaded causal LM (its weights are
            used in place).
        tokenizer: a tokenizer or its path (default: ``pretrained``'s).
        dtype: ``"auto"`` (the checkpoint's dtype), or a torch dtype name.
        device: where to load ``pretrained`` (default: CUDA when available). lm-eval passes
            ``"cuda:0"`` unasked, so a CUDA device that is not here falls back to the default, with a warning.
        max_length: longest sequence (default: the model's ``max_position_embeddings``).
        max_gen_toks: ``generate_until``'s default token limit.
        add_bos_token: force (``True``) or suppress (``False``) special tokens when encoding.
        block_size, num_blocks, memory_fraction, max_num_seqs, max_num_batched_tokens,
        enable_prefix_caching: `Engine` options.
        batch_size, max_batch_size: accepted for lm-eval's CLI and ignored: the engine batches
            continuously under ``max_num_seqs`` / ``max_num_batched_tokens``.
    """

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> HfPagedLM:
        """From lm-eval's CLI: ``--model_args`` win over the CLI's own settings (``--device``, ``--batch_size``)."""
        args = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**args, **simple_parse_args_string(arg_string)})

    def __init__(
        self,
        pretrained="",
        tokenizer=None,
        dtype="auto",
        device: str | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        add_bos_token: bool | None = None,
        trust_remote_code: bool = False,
        block_size: int = 16,
        num_blocks: int | None = None,
        memory_fraction: float | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        enable_prefix_caching: bool = True,
        batch_size=None,
        max_batch_size=None,
        **unused,
    ) -> None:
        super().__init__()
        if unused:
            logger.warning("hf-paged ignores model_args %s", sorted(unused))
        if isinstance(pretrained, str):
            if not pretrained:
                raise ValueError("hf-paged needs model_args pretrained=<model directory or id>")
            model, tok = load_model(pretrained, dtype=dtype, device=_available_device(device),
                                    trust_remote_code=trust_remote_code)
            self._name = pretrained
        else:
            model, tok = pretrained, None
            self._name = getattr(getattr(model, "config", None), "_name_or_path", type(model).__name__)
        if isinstance(tokenizer, str):
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(tokenizer, trust_remote_code=trust_remote_code)
        elif tokenizer is not None:
            tok = tokenizer
        if tok is None:
            raise ValueError("hf-paged needs a tokenizer (pass tokenizer=... with an already loaded model)")
        self.model = model
        self.tokenizer = tok
        self.add_bos_token = add_bos_token
        self._max_length = max_length or max_model_len(model) or _DEFAULT_MAX_LENGTH
        self._max_gen_toks = max_gen_toks
        self.engine = Engine(
            model, tokenizer=tok, block_size=block_size, num_blocks=num_blocks, memory_fraction=memory_fraction,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            enable_prefix_caching=enable_prefix_caching,
        )
        # Every request list goes through the engine's one client (its thread owns the engine;
        # `stats` / `reset_stats` are read between lists, when nothing is in flight).
        self.client = AsyncEngine(self.engine, name="hf-paged-lm-eval")
        # Engine statistics of the last loglikelihood / generate_until call (prefix-cache hit rate...).
        self.last_stats = None

    def close(self) -> None:
        """Stop the engine's thread and free its KV pool."""
        self.client.shutdown()

    def _generate(self, prompts: list, params: list[SamplingParams], progress: bool) -> list[GenerationOutput]:
        """`AsyncEngine.generate` (outputs in input order), with lm-eval's progress bar."""
        if not progress:
            return self.client.generate(prompts, params)
        from tqdm.auto import tqdm

        done: queue.SimpleQueue[GenerationOutput] = queue.SimpleQueue()

        def collect(update: RequestUpdate) -> None:
            if update.finished:
                done.put(update.output)

        ids = [self.client.submit(p, sp, collect) for p, sp in zip(prompts, params)]
        results: dict[str, GenerationOutput] = {}
        with tqdm(total=len(ids), desc="hf_paged", unit="req", dynamic_ncols=True) as bar:
            while len(results) < len(ids):
                out = done.get()
                results[out.request_id] = out
                bar.update(1)
        return [results[i] for i in ids]

    # -- what TemplateLM asks of a model ----------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "tokenizer").replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None, **kwargs):
        """Token ids of ``string`` (encoded as lm-eval's ``HFLM`` does, so scores agree)."""
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
            bos = self.tokenizer.bos_token
            if bos and string.startswith(bos):
                add_special_tokens = False  # the prompt carries its BOS already
        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        ids = self.tokenizer.encode(string, **kw)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    # -- scoring ----------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """Sum of continuation log-probabilities and whether each token was the arg-max."""
        pairs = [(list(ctx), list(cont)) for _, ctx, cont in requests]
        results = self._score(pairs, disable_tqdm)
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents, in windows of at most ``max_length`` tokens."""
        windows: list[tuple[list[int], list[int]]] = []
        owners: list[int] = []
        for i, req in enumerate(requests):
            (text,) = req.args
            for ctx, cont in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1,
                ),
            ):
                windows.append((list(ctx), list(cont)))
                owners.append(i)
        scores = self._score(windows, disable_tqdm)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, scores):
            totals[owner] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def _score(self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool) -> list[tuple[float, bool]]:
        prompts, params = [], []
        for ctx, cont in pairs:
            if not cont:
                raise ValueError("hf-paged: a loglikelihood request has an empty continuation")
            # As HFLM: keep the last max_length + 1 tokens (the scored input is max_length long).
            full = (ctx + cont)[-(self.max_length + 1) :]
            start = max(1, len(full) - len(cont))
            prompts.append(full)
            params.append(SamplingParams(
                max_new_tokens=1, temperature=0.0, ignore_eos=True, prompt_logprobs=1, prompt_logprobs_start=start,
            ))
        # Leaders (the first request of each distinct context) fill the prefix cache, then the
        # followers run and reuse it: queued together, they would all compute the context at once.
        seen: set[tuple[int, ...]] = set()
        leaders, followers = [], []
        for i, (full, p) in enumerate(zip(prompts, params)):
            key = tuple(full[: p.prompt_logprobs_start])
            (followers if key in seen else leaders).append(i)
            seen.add(key)
        self.engine.reset_stats()
        outputs: dict[int, GenerationOutput] = {}
        for wave in (leaders, followers):
            if wave:
                outs = self._generate([prompts[i] for i in wave], [params[i] for i in wave], not disable_tqdm)
                outputs.update(zip(wave, outs))
        self.last_stats = self.engine.stats()
        logger.info("hf-paged loglikelihood: %d requests, prefix-cache hit rate %.1f%%",
                    len(pairs), 100 * self.last_stats.prefix_hit_rate)
        results = []
        for i in range(len(prompts)):
            out = _checked(outputs[i])
            scored = out.prompt_logprobs[params[i].prompt_logprobs_start :]
            total = sum(entry[0] for entry in scored)
            greedy = all(_is_argmax(tok, entry) for tok, entry in zip(prompts[i][params[i].prompt_logprobs_start :], scored))
            results.append((total, greedy))
        return results

    # -- generation -------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Generate for every request at once; each stops at its own ``until`` strings or ``max_gen_toks``."""
        eos = self.tokenizer.decode([self.eot_token_id]) if self.eot_token_id is not None else None
        prompts, params, stops = [], [], []
        for req in requests:
            context, gen_kwargs = req.args
            sp, until = self._sampling_params(dict(gen_kwargs or {}), eos)
            max_ctx = self.max_length - sp.max_new_tokens
            if max_ctx <= 0:
                raise ValueError(f"max_gen_toks={sp.max_new_tokens} leaves no room for a prompt (max_length={self.max_length})")
            ids = self.tok_encode(context, left_truncate_len=max_ctx)
            prompts.append(ids or [self.prefix_token_id])
            params.append(sp)
            stops.append(until)
        outs = self._generate(prompts, params, not disable_tqdm) if prompts else []
        self.last_stats = self.engine.stats()
        texts = []
        for req, out, until in zip(requests, outs, stops):
            # The engine's text: decode(prompt + output) minus decode(prompt), cut before a stop string.
            text = _cut_at_stops(_checked(out).text or "", until)
            self.cache_hook.add_partial("generate_until", req.args, text)
            texts.append(text)
        return texts

    def _sampling_params(self, kwargs: dict, eos: str | None) -> tuple[SamplingParams, list[str]]:
        """lm-eval generation kwargs -> (`SamplingParams`, stop strings)."""
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        if eos and eos not in until:
            until.append(eos)
        max_new = self.max_gen_toks
        for alias in ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens"):
            if kwargs.get(alias) is not None:
                max_new = int(kwargs[alias])
                break
        do_sample = bool(kwargs.get("do_sample", False))
        temperature = float(kwargs.get("temperature", 0.0) or 0.0)
        sp = SamplingParams(
            max_new_tokens=max_new,
            temperature=temperature if do_sample or (temperature > 0 and "do_sample" not in kwargs) else 0.0,
            top_p=float(kwargs.get("top_p", 1.0) or 1.0),
            top_k=int(kwargs.get("top_k", 0) or 0),
            seed=kwargs.get("seed"),
            stop=[s for s in until if s] or None,
        )
        return sp, until


def _available_device(device: str | None) -> torch.device:
    """``device``, or the default device when it names a CUDA device this machine lacks (lm-eval's default)."""
    try:
        return resolve_device(device)
    except ValueError as e:
        if not str(device).startswith("cuda"):
            raise
        fallback = resolve_device(None)
        logger.warning("%s; using %s instead", e, fallback)
        return fallback


def _checked(out: GenerationOutput) -> GenerationOutput:
    if out.error is not None:
        raise RuntimeError(f"hf-paged request failed: {out.error}")
    return out


def _is_argmax(token: int, entry) -> bool:
    _, top = entry
    return bool(top) and next(iter(top)) == token


def _cut_at_stops(text: str, stops: Iterable[str]) -> str:
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:cut]


def register() -> list[str]:
    """Add the ``lm_eval.models`` entry points to lm-eval's model registry; returns their names.

    For lm-eval versions whose registry does not read that group itself (0.4.13 and older), so that
    ``--model hf-paged`` and ``simple_evaluate(model="hf-paged")`` resolve. Names lm-eval knows
    already are left alone.
    """
    from lm_eval.api.registry import model_registry

    import lm_eval.models  # noqa: F401  fills the registry with the built-in models first

    added = []
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in model_registry:
            model_registry.register(ep.name, target=ep)
            added.append(ep.name)
    return added


def main(argv: list[str] | None = None) -> None:
    """lm-eval's CLI with the ``lm_eval.models`` entry points registered (``python -m hf_paged.integrations.lm_eval``)."""
    from lm_eval.__main__ import cli_evaluate

    register()
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
