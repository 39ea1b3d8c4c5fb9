"""Per-iteration monitors (what B-STaR tracks): exploration of the sampled train set and
exploitation -- how well the selection separates correct from wrong samples."""

from __future__ import annotations

from pathlib import Path

from selfimprove import tasks
from selfimprove.engine.pipeline import Artifact, read_jsonl, stage, write_json_atomic
from selfimprove.metrics import exploitation, exploration
from selfimprove.scoring import verify_records


@stage(name="monitor", version=1)
def monitor(out: Path, scored: Artifact, kept: Artifact, dataset: dict) -> dict:
    """Stage: exploration/exploitation metrics of one iteration; writes metrics.json.

    ``scored`` holds this iteration's samples with rewards (and ``certainty`` when a certainty
    stage made it); ``kept`` is the built SFT set, whose self-generated records are re-checked by
    the task's verifier for the kept-set precision."""
    task = tasks.load(dataset)
    records = read_jsonl(scored.file("scored.jsonl"))
    generated = [r for r in read_jsonl(kept.file("train.jsonl")) if "sample" in r.get("meta", {})]
    kept_rewards = [r["reward"] for r in verify_records(task, generated) if r["reward"] is not None]
    extract = task.extract if "extract" in task.capabilities else None  # else no distinct_answers
    metrics = {
        **exploration(records, extract, task.clean),
        **exploitation(records, kept_rewards),
    }
    write_json_atomic(out / "metrics.json", metrics)
    return {"monitored": len(records)}
