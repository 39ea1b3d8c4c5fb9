"""Data stages: task prompts, seed demonstrations, hinted prompts and the filtered training set."""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

from selfimprove import tasks
from selfimprove.engine.pipeline import Artifact, read_jsonl, stage, write_jsonl


@stage(name="task_prompts", version=1)
def task_prompts(out: Path, dataset: dict, iteration: int, digits: int | None = None) -> dict:
    """Stage: the unlabelled train prompts of one iteration (answers only, no rationales); ``digits``
    asks a task with lengths (reversed_addition) for another length than the iteration's."""
    task = tasks.load(dataset)
    records = (
        task.train_prompts(iteration) if digits is None else task.train_prompts(iteration, digits=digits)
    )
    write_jsonl(out / "prompts.jsonl", records)
    return {"prompts": len(records)}


@stage(name="seed_data", version=1)
def seed_data(out: Path, dataset: dict, hint_fraction: float, seed: int) -> dict:
    """Stage: gold demonstrations for the warm start. With ``hint_fraction`` > 0 a copy of that
    fraction is written with the answer as a hint in the prompt, so that the model learns to use
    hints (needed by STaR's rationalization)."""
    task = tasks.load(dataset)
    records = task.seed_data()
    rng = random.Random(seed)
    hinted = [
        {**r, "id": r["id"] + "-hint", "prompt": task.hint_prompt(r), "meta": {**r["meta"], "hinted": True}}
        for r in records
        if hint_fraction > 0 and rng.random() < hint_fraction
    ]
    write_jsonl(out / "train.jsonl", records + hinted)
    return {"examples": len(records) + len(hinted), "hinted": len(hinted)}


@stage(name="hint_prompts", version=1)
def hint_prompts(out: Path, scored: Artifact, dataset: dict) -> dict:
    """Stage: prompts that got no correct sample, rewritten with the answer as a hint (STaR's
    rationalization). The original prompt is kept in ``meta`` so the hint can be dropped later."""
    task = tasks.load(dataset)
    solved, failed = set(), {}
    for r in read_jsonl(scored.file("scored.jsonl")):
        if r["reward"] == 1.0:
            solved.add(r["id"])
        else:
            failed.setdefault(r["id"], r)
    records = [
        {
            "id": r["id"],
            "prompt": task.hint_prompt(r),
            "answer": r["answer"],
            "meta": {**r["meta"], "unhinted_prompt": r["prompt"]},
        }
        for rid, r in failed.items()
        if rid not in solved
    ]
    write_jsonl(out / "prompts.jsonl", records)
    return {"prompts": len(records)}


@stage(name="keep_correct", version=2)  # 2: the per-prompt cap counts by prompt text, not by record id
def keep_correct(
    out: Path,
    scored: list[Artifact],
    dataset: dict,
    max_per_prompt: int,
    replay: Artifact | None,
    seed: int,
    min_reward: float = 1.0,
) -> dict:
    """Stage: the SFT set of one iteration -- samples whose reward is at least ``min_reward``
    (hint dropped, cut after the answer, deduplicated, at most ``max_per_prompt`` per prompt) plus
    the replayed seed demonstrations. The cap counts by the prompt's text, not the record id: a
    question asked again in a later iteration gets a new id (GSM8K's ``train<n>-<row>``), and
    with ``accumulate`` its rationales from every iteration share one cap."""
    task = tasks.load(dataset)
    kept: dict[str, list[dict]] = defaultdict(list)
    seen = set()
    rationalized = 0
    for artifact in scored:
        for r in read_jsonl(artifact.file("scored.jsonl")):
            if r["reward"] is None or r["reward"] < min_reward:
                continue
            prompt = r["meta"].get("unhinted_prompt", r["prompt"])
            completion = task.clean(r["completion"])
            if (prompt, completion) in seen or len(kept[prompt]) >= max_per_prompt:
                continue
            seen.add((prompt, completion))
            rationalized += "unhinted_prompt" in r["meta"]
            kept[prompt].append(
                {
                    "id": r["id"],
                    "prompt": prompt,
                    "completion": completion,
                    "answer": r["answer"],
                    "meta": r["meta"],
                }
            )
    records = [x for group in kept.values() for x in group]
    replayed = read_jsonl(replay.file("train.jsonl")) if replay is not None else []
    data = records + replayed
    random.Random(seed).shuffle(data)
    write_jsonl(out / "train.jsonl", data)
    return {
        "kept": len(records),
        "kept_prompts": len(kept),
        "rationalized": rationalized,
        "replayed": len(replayed),
        "examples": len(data),
    }
