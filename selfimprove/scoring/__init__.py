"""Scoring: apply a task's verifier (TRL's reward-function contract) to sample records."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from selfimprove import tasks
from selfimprove.engine import progress
from selfimprove.engine.pipeline import Artifact, read_jsonl, stage, write_jsonl
from selfimprove.metrics import fraction


def verify_records(task: tasks.Task, records: list[dict]) -> list[dict]:
    """Records with ``reward`` filled in; a verifier that cannot judge leaves None."""
    rewards = task.reward(
        prompts=[r["prompt"] for r in records],
        completions=[r["completion"] for r in records],
        answer=[r["answer"] for r in records],
        meta=[r.get("meta", {}) for r in records],
    )
    return [{**r, "reward": rw} for r, rw in zip(records, rewards)]


def verify_in_chunks(task: tasks.Task, records: list[dict], advance: Callable[[int], None]) -> list[dict]:
    """:func:`verify_records` a twentieth at a time, so that a slow verifier (the code sandbox) shows
    progress; a chunk stays large enough for the verifier's own parallel workers."""
    size = max(64, -(-len(records) // 20))
    scored: list[dict] = []
    advance(0)  # the bar shows during the first chunk too
    for start in range(0, len(records), size):
        scored += verify_records(task, records[start : start + size])
        advance(len(records[start : start + size]))
    return scored


def coverage(records: list[dict]) -> dict:
    """Sample accuracy and the fraction of prompts with at least one correct sample."""
    by_prompt: dict[str, list[float]] = defaultdict(list)
    for r in records:
        if r["reward"] is not None:
            by_prompt[r["id"]].append(r["reward"])
    judged = [x for rs in by_prompt.values() for x in rs]
    return {
        "samples": len(records),
        "sample_accuracy": fraction(judged, 0.0),
        "prompts_solved": fraction([max(rs) >= 1.0 for rs in by_prompt.values()], 0.0),
    }


@stage(name="score", version=1)
def verify(out: Path, samples: Artifact, dataset: dict) -> dict:
    """Stage: verify every sample; writes scored.jsonl."""
    records = read_jsonl(samples.file("samples.jsonl"))
    with progress.bar("score", len(records), "samples") as advance:
        scored = verify_in_chunks(tasks.load(dataset), records, advance)
    write_jsonl(out / "scored.jsonl", scored)
    return coverage(scored)
