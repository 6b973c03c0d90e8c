"""The engine's loops run with the heap frozen and young collections rare, and leave the collector as they found it.

The collector's settings belong to the process, and a loop of an earlier test may still run (an engine
thread kept for the session), so the checks run in a fresh interpreter (one for all: each costs an import of
torch and Transformers), the collector reset between them.
"""

from __future__ import annotations

import gc
import subprocess
import sys
import threading
from pathlib import Path

import torch
from tiny_models import VOCAB, make_pair

from hf_paged import Engine, SamplingParams
from hf_paged.engine.gc_pauses import quiet_gc

_HERE = Path(__file__).resolve().parent


_CHECKS = ["freezes_raises_threshold_and_restores", "keeps_a_freeze_of_the_process",
           "restores_only_after_the_last_of_overlapping_threads", "engine_generate_steps_under_quiet_gc_and_restores"]


def test_quiet_gc_in_a_fresh_interpreter():
    code = (f"import sys; sys.path[:0] = [{str(_HERE)!r}, {str(_HERE.parent)!r}]; "
            f"import test_gc_pauses; test_gc_pauses._run_checks()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == _CHECKS, done.stdout


def _run_checks() -> None:
    """Each check with the collector as a fresh process has it; prints each name once it passed."""
    threshold = gc.get_threshold()
    for name in _CHECKS:
        gc.set_threshold(*threshold)
        gc.unfreeze()
        globals()[f"_{name}"]()
        print(name, flush=True)


def _freezes_raises_threshold_and_restores():
    gc.set_threshold(700, 10, 10)
    with quiet_gc():
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (50_000, 10, 10)
        with quiet_gc():  # nested (another loop, another thread): no second save
            assert gc.get_threshold() == (50_000, 10, 10)
        assert gc.get_threshold() == (50_000, 10, 10), "the inner exit restored too early"
    assert gc.get_threshold() == (700, 10, 10)
    assert gc.get_freeze_count() == 0


def _keeps_a_freeze_of_the_process():
    gc.freeze()
    frozen = gc.get_freeze_count()
    with quiet_gc():
        pass
    assert gc.get_freeze_count() >= frozen, "the process's own frozen objects were unfrozen"


def _restores_only_after_the_last_of_overlapping_threads():
    gc.set_threshold(700, 10, 10)
    entered, release = threading.Event(), threading.Event()

    def other():
        with quiet_gc():
            entered.set()
            release.wait(10)

    t = threading.Thread(target=other)
    t.start()
    assert entered.wait(10)
    with quiet_gc():
        pass
    assert gc.get_threshold() == (50_000, 10, 10), "the other thread's loop lost its setting"
    release.set()
    t.join(10)
    assert gc.get_threshold() == (700, 10, 10)


def _engine_generate_steps_under_quiet_gc_and_restores():
    model, _ = make_pair("llama-gqa")
    engine = Engine(model, num_blocks=64)
    gc.set_threshold(700, 10, 10)
    seen = []
    step = engine.step

    def recording_step():
        seen.append((gc.get_threshold()[0], gc.get_freeze_count() > 0))
        return step()

    engine.step = recording_step
    prompts = [torch.randint(4, VOCAB, (n,)).tolist() for n in (5, 9)]
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [4, 4]
    assert seen and all(s == (50_000, True) for s in seen)
    assert gc.get_threshold() == (700, 10, 10) and gc.get_freeze_count() == 0
