"""Tasks: prompts, reference answers and a verifier, selected by ``dataset.name``.

A task's data is deterministic given its config, and its ``version`` is part of every stage
fingerprint that reads it (the dataset config is passed to those stages), so a changed prompt
format never reuses old samples.
"""

from __future__ import annotations

from dataclasses import dataclass

from selfimprove.engine.registry import ConfigError, Registry
from selfimprove.tasks.base import CAPABILITIES, Task

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
    from selfimprove.engine.pipeline import plain

    task, settings = TASKS.get(dataset["name"]), plain(dataset)
    task.check(settings)
    return {**settings, "task_version": task.version}


def load(dataset: dict) -> Task:
    """Build the task named by ``dataset['name']`` from its config."""
    return TASKS.get(dataset["name"])(dataset)


@dataclass(frozen=True)
class Need:
    """A capability (tasks.base.CAPABILITIES) a method uses, and where. ``without`` None: the run
    cannot go on without it (refused before it starts); else what the run does instead (said once)."""

    capability: str
    by: str
    without: str | None = None


def label(dataset: dict) -> str:
    """A dataset as users name it: reasoning-gym tasks by their task (countdown), others by name."""
    return f"{dataset['name']}:{dataset['task']}" if dataset.get("task") else dataset["name"]


def has(dataset: dict, capability: str) -> bool:
    """Whether the task of this dataset config has ``capability`` with these settings."""
    return capability not in TASKS.get(dataset["name"]).lacking(dataset)


def check_needs(method: str, dataset: dict, needs: list[Need]) -> list[str]:
    """Refuse (ConfigError, one line) a method whose required capabilities the dataset lacks, naming
    the datasets that have them; return one note per optional capability it lacks."""
    from selfimprove.engine.pipeline import plain

    dataset = plain(dataset)
    lacking = TASKS.get(dataset["name"]).lacking(dataset)
    notes = []
    for need in needs:
        if need.capability not in CAPABILITIES:
            raise ValueError(f"unknown capability {need.capability!r} in method {method}'s needs")
        if need.capability not in lacking:
            continue
        why = lacking[need.capability]
        if need.without is None:
            able = [n for n in TASKS.names() if need.capability in TASKS.get(n).capabilities]
            raise ConfigError(
                f"method={method} needs {CAPABILITIES[need.capability]} for {need.by}, which dataset "
                f"'{label(dataset)}' lacks ({why}); datasets with it: {', '.join(able)}"
            )
        notes.append(
            f"dataset '{label(dataset)}' lacks {CAPABILITIES[need.capability]} ({why}): {need.without}"
        )
    return notes


__all__ = ["CAPABILITIES", "TASKS", "Need", "Task", "check_needs", "has", "load", "spec"]
