"""Inspect model API ``hf_paged``: a two-sample task, offline, on a tiny model saved to a temp dir.

Skipped when inspect_ai is not installed (``pip install -e ".[inspect]"``).
"""

from __future__ import annotations

from importlib import metadata

import pytest

pytest.importorskip("inspect_ai")

from inspect_ai import Task, eval as inspect_eval  # noqa: E402
from inspect_ai.dataset import Sample  # noqa: E402
from inspect_ai.model import GenerateConfig, get_model  # noqa: E402
from inspect_ai.scorer import includes  # noqa: E402
from inspect_ai.solver import generate  # noqa: E402
from tiny_model_dir import save_tiny_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from hf_paged import SamplingParams, generate_batch  # noqa: E402

PROMPTS = ["w5 w6 w7", "w9 w4"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def expected(model_dir) -> list[str]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="paged")
    tok = AutoTokenizer.from_pretrained(model_dir)
    outs = generate_batch(model, PROMPTS, SamplingParams(max_new_tokens=12, temperature=0.0), tokenizer=tok,
                          progress=False)
    from tiny_models import continuation_text

    assert all(o.text == continuation_text(tok, o.prompt_token_ids, o.token_ids) for o in outs)
    return [o.text for o in outs]


def test_entry_point_and_lookup(model_dir):
    (ep,) = [ep for ep in metadata.entry_points(group="inspect_ai") if ep.name == "hf_paged"]
    assert ep.value == "hf_paged.integrations.inspect_ai"
    # Inspect's own lookup: the "hf_paged" API is found by loading the inspect_ai entry points.
    model = get_model(f"hf_paged/{model_dir}", dtype="float32")
    assert type(model.api).__name__ == "HfPagedAPI"


def test_two_sample_task_batches_in_one_engine(model_dir, expected):
    from hf_paged.integrations import inspect_ai as plugin

    task = Task(
        dataset=[Sample(input=p, target=e.split()[0]) for p, e in zip(PROMPTS, expected)],
        solver=generate(), scorer=includes(),
    )
    (log,) = inspect_eval(task, model=f"hf_paged/{model_dir}", model_args={"block_size": 8},
                          max_tokens=12, temperature=0.0, display="none", log_dir=str(model_dir / "logs"))
    assert log.status == "success", log.error
    outputs = {s.input: s.output.completion for s in log.samples}
    assert [outputs[p] for p in PROMPTS] == expected
    assert log.results.scores[0].metrics["accuracy"].value == 1.0
    # Both samples ran as requests of one shared engine thread, decoding in the same steps.
    (runner,) = [r for key, r in plugin._RUNNERS.items() if '"block_size": 8' in key]
    stats = runner.engine.stats()
    assert stats.requests_finished == 2
    assert stats.steps < stats.output_tokens


def test_one_engine_per_model_and_args(model_dir, monkeypatch):
    """Inspect also builds the API without the -M args (to look up model info): that must not load a second engine."""
    from hf_paged.integrations import inspect_ai as plugin

    built = []

    class CountingEngine(plugin.Engine):
        def __init__(self, *args, **kwargs):
            built.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(plugin, "Engine", CountingEngine)
    monkeypatch.setattr(plugin, "_RUNNERS", {})  # engines of earlier tests would be reused
    monkeypatch.setattr(plugin, "_HOLDERS", {})
    # Inspect memoizes models and model-info lookups: those of an earlier test would hide a second build.
    import inspect_ai.model._model as inspect_model
    import inspect_ai.model._model_info as inspect_model_info

    monkeypatch.setattr(inspect_model, "_models", {})
    monkeypatch.setattr(inspect_model_info, "_result_cache", {})
    task = Task(dataset=[Sample(input=p, target="w") for p in PROMPTS], solver=generate(), scorer=includes())
    try:
        (log,) = inspect_eval(task, model=f"hf_paged/{model_dir}", model_args={"block_size": 4, "num_blocks": 96},
                              max_tokens=4, temperature=0.0, display="none", log_dir=str(model_dir / "logs"))
        assert log.status == "success", log.error
        # Inspect's model-info lookup (its live display asks it of every model event) builds the API
        # without the -M args; called here too, as the display may not run under pytest.
        from inspect_ai.model import get_model_info

        get_model_info(f"hf_paged/{model_dir}")
    finally:
        plugin.shutdown_engines()  # those of this test (the registry is restored afterwards)
    assert len(built) == 1, built
    assert {k: v for k, v in built[0].items() if k != "tokenizer"} == {"block_size": 4, "num_blocks": 96}


def test_closing_the_model_shuts_its_engine_down(model_dir):
    import asyncio

    from hf_paged.integrations import inspect_ai as plugin

    async def run():
        async with get_model(f"hf_paged/{model_dir}", block_size=2, memoize=False) as model:
            runner = model.api.runner
            out = await model.generate("w5 w6", config=GenerateConfig(max_tokens=3, temperature=0.0))
            assert out.completion and runner.alive
        return runner

    runner = asyncio.run(run())
    assert not runner.alive
    assert runner not in plugin._RUNNERS.values()
