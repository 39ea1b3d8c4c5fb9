"""Held-out evaluation: greedy accuracy per difficulty level."""

from __future__ import annotations

from pathlib import Path

from selfimprove import tasks
from selfimprove.generation import sample
from selfimprove.pipeline import Artifact, stage, write_json_atomic, write_jsonl
from selfimprove.scoring import score_records


@stage(version=1)
def evaluate(out: Path, model: Artifact, dataset: dict, generator: dict, hardware: dict, seed: int) -> dict:
    """Stage: greedy accuracy on each held-out set; writes metrics.json and samples.jsonl."""
    task = tasks.load(dataset)
    metrics, all_scored = {}, []
    for level, records in task.test_sets().items():
        greedy = {
            "n": 1,
            "temperature": 0.0,
            "top_p": 1.0,
            "max_tokens": task.max_new_tokens(records[0]),
            "stop": [],
        }
        scored = score_records(task, sample(model, records, greedy, generator, hardware, seed))
        judged = [r["reward"] for r in scored if r["reward"] is not None]
        metrics[f"acc/{level}"] = round(sum(judged) / max(1, len(judged)), 4)
        all_scored += scored
    write_json_atomic(out / "metrics.json", metrics)
    write_jsonl(out / "samples.jsonl", all_scored)
    return {"test_items": len(all_scored)}
