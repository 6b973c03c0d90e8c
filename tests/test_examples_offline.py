"""The offline examples the README runs: `examples/lm_eval_task` (lm-eval) and `examples/inspect_task.py` (Inspect).

The lm-eval task runs on a tiny random model (always) and on the real SmolLM2 (when it can be had);
the Inspect task runs its first three samples on the real model. Each part skips without its harness.
"""

from __future__ import annotations

from pathlib import Path

import pytest


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
LM_EVAL_TASK = "hf_paged_mini_qa"




def _lm_eval(pretrained: str, limit: int | None) -> dict:
    pytest.importorskip("lm_eval")
    import lm_eval
    from lm_eval.tasks import TaskManager

    from hf_paged.integrations.lm_eval import HfPagedLM

    lm = HfPagedLM(pretrained=pretrained, dtype="float32", device="cpu", num_blocks=256)
    manager = TaskManager(include_path=str(EXAMPLES / "lm_eval_task"), include_defaults=False)
    results = lm_eval.simple_evaluate(model=lm, tasks=[LM_EVAL_TASK], task_manager=manager, limit=limit,
                                      log_samples=False)
    return results


def test_lm_eval_task_runs_on_a_tiny_model(tmp_path):
    pytest.importorskip("lm_eval")
    from tiny_model_dir import save_tiny_model

    results = _lm_eval(str(save_tiny_model(tmp_path / "tiny")), limit=3)
    assert results["n-samples"][LM_EVAL_TASK]["effective"] == 3
    assert 0.0 <= results["results"][LM_EVAL_TASK]["acc,none"] <= 1.0


def test_lm_eval_task_is_answered_by_the_real_model(smol_dir):
    results = _lm_eval(str(smol_dir), limit=None)
    assert results["n-samples"][LM_EVAL_TASK]["effective"] == 10
    assert results["results"][LM_EVAL_TASK]["acc,none"] >= 0.5  # chance is 0.25


def test_inspect_task_first_three_are_answered(smol_dir, tmp_path):
    pytest.importorskip("inspect_ai")
    import importlib.util

    from inspect_ai import eval as inspect_eval

    # Loaded as a module: Inspect's own file lookup wants a path relative to the working directory.
    spec = importlib.util.spec_from_file_location("inspect_task_example", EXAMPLES / "inspect_task.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (log,) = inspect_eval(module.simple_facts(), model=f"hf_paged/{smol_dir}",
                          model_args={"dtype": "float32", "device": "cpu"}, limit=3, temperature=0.0,
                          max_tokens=32, display="none", log_dir=str(tmp_path))
    assert log.status == "success", log.error
    assert len(log.samples) == 3
    assert log.results.scores[0].metrics["accuracy"].value == 1.0
