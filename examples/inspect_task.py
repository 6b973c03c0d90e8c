"""A tiny offline Inspect task for trying the hf_paged model API:

    inspect eval examples/inspect_task.py --model hf_paged/./my-model -M dtype=float32 --max-tokens 64
"""

from inspect_ai import Task, task
from inspect_ai.dataset import Sample
from inspect_ai.scorer import includes
from inspect_ai.solver import generate

QUESTIONS = [
    ("What is the capital of France?", "Paris"),
    ("How many days are in a week? Answer with a number.", "7"),
    ("What color is the sky on a clear day?", "blue"),
    ("What do bees make?", "honey"),
    ("What is frozen water called?", "ice"),
]


@task
def simple_facts():
    """Five one-line questions; a sample is correct when the answer contains the target (case-insensitive)."""
    return Task(
        dataset=[Sample(input=question, target=answer) for question, answer in QUESTIONS],
        solver=generate(),
        scorer=includes(),
    )
