"""Tasks: prompts, reference answers and a verifier, selected by ``dataset.name``.

A task's data is deterministic given its config, and its ``version`` is part of every stage
fingerprint that reads it (the dataset config is passed to those stages), so a changed prompt
format never reuses old samples.
"""

from __future__ import annotations

from selfimprove.registry import Registry
from selfimprove.tasks.base import Task

TASKS = Registry(
    "dataset",
    {
        "arithmetic": "selfimprove.tasks.arithmetic:Arithmetic",
        "reversed_addition": "selfimprove.tasks.reversed_addition:ReversedAddition",
        "gsm8k": "selfimprove.tasks.hf_math:GSM8K",
        "math": "selfimprove.tasks.hf_math:MATH",
        "reasoning_gym": "selfimprove.tasks.gym:ReasoningGym",
        "humaneval": "selfimprove.tasks.humaneval:HumanEval",
    },
)


def spec(dataset: dict) -> dict:
    """The dataset config plus the task's code version: what stages that read the task receive,
    so that a changed prompt format or verifier changes their fingerprints."""
    from selfimprove.pipeline import plain

    task, settings = TASKS.get(dataset["name"]), plain(dataset)
    task.check(settings)
    return {**settings, "task_version": task.version}


def load(dataset: dict) -> Task:
    """Build the task named by ``dataset['name']`` from its config."""
    return TASKS.get(dataset["name"])(dataset)


__all__ = ["TASKS", "Task", "load", "spec"]
