"""Inspect model API ``hf_paged``: a two-sample task, offline, on a tiny model saved to a temp dir.

Skipped when inspect_ai is not installed (``pip install -e ".[inspect]"``).
"""

from __future__ import annotations

from importlib import metadata

import pytest

pytest.importorskip("inspect_ai")

from inspect_ai import Task, eval as inspect_eval  # noqa: E402
from inspect_ai.dataset import Sample  # noqa: E402
from inspect_ai.model import get_model  # noqa: E402
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
