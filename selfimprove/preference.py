"""Preference-pair stages for DPO-style methods: SPIN's (gold vs own) and Self-Rewarding's (best vs
worst by the model's own judge). Both write ``pairs.jsonl`` records
``{"id", "prompt", "chosen", "rejected", "meta"}`` (training/dpo.py) and ``metrics.json``."""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

from selfimprove import tasks
from selfimprove.metrics import fraction
from selfimprove.pipeline import Artifact, read_jsonl, stage, write_json_atomic, write_jsonl


@stage(version=1)
def sft_prompts(out: Path, seeds: Artifact, size: int | None, seed: int) -> dict:
    """Stage: SPIN's prompts -- ``size`` records drawn from the SFT data (None = all), each carrying
    its gold response in ``meta.gold`` (generation copies meta into every sample)."""
    records = read_jsonl(seeds.file("train.jsonl"))
    if size is not None and size < len(records):
        records = random.Random(seed).sample(records, size)
    prompts = [
        {
            "id": r["id"],
            "prompt": r["prompt"],
            "answer": r["answer"],
            "meta": {**r["meta"], "gold": r["completion"]},
        }
        for r in records
    ]
    write_jsonl(out / "prompts.jsonl", prompts)
    return {"prompts": len(prompts)}


@stage(version=1)
def spin_pairs(out: Path, samples: Artifact, dataset: dict, previous: Artifact | None) -> dict:
    """Stage: SPIN's pairs -- the gold response chosen, the model's own response rejected. A response
    identical to the gold one is dropped (its DPO gradient is zero). With ``previous`` the previous
    iteration's new pairs are mixed in (the authors' recipe). new.jsonl keeps this iteration's own."""
    task = tasks.load(dataset)
    records = read_jsonl(samples.file("samples.jsonl"))
    own = [task.clean(r["completion"]) for r in records]
    rewards = task.reward(
        prompts=[r["prompt"] for r in records],
        completions=own,
        answer=[r["answer"] for r in records],
        meta=[r.get("meta", {}) for r in records],
    )
    new = [
        {
            "id": r["id"],
            "prompt": r["prompt"],
            "chosen": r["meta"]["gold"],
            "rejected": rejected,
            "meta": {k: v for k, v in r["meta"].items() if k != "gold"} | {"rejected_reward": reward},
        }
        for r, rejected, reward in zip(records, own, rewards)
        if rejected != r["meta"]["gold"]
    ]
    mixed = read_jsonl(previous.file("new.jsonl")) if previous is not None else []
    write_jsonl(out / "new.jsonl", new)
    write_jsonl(out / "pairs.jsonl", new + mixed)
    metrics = {
        "pairs/new": len(new),
        "pairs/from_previous": len(mixed),
        "pairs/own_equals_gold": fraction([o == r["meta"]["gold"] for o, r in zip(own, records)]),
        "pairs/rejected_correct": fraction([p["meta"]["rejected_reward"] == 1.0 for p in new]),
    }
    write_json_atomic(out / "metrics.json", metrics)
    return metrics


def best_vs_worst(judged: list[dict], anchors: list[dict] | None = None) -> tuple[list[dict], int]:
    """Self-Rewarding's pairs: per prompt, the response with the highest judge score is chosen and
    the one with the lowest rejected; a tie (equal scores) gives no pair. Responses the judge could
    not score (``judge`` None) take no part. With ``anchors`` (Temporal Self-Rewarding's anchored
    rejection) the rejected one is the lowest-scored of the anchor model's responses to the prompt.
    The first response wins among equal scores. Returns (pairs, ties dropped)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in judged:
        if r["judge"] is not None:
            groups[r["id"]].append(r)
    rejects: dict[str, list[dict]] = defaultdict(list)
    for r in anchors if anchors is not None else judged:
        if r["judge"] is not None:
            rejects[r["id"]].append(r)
    pairs, ties = [], 0
    for rid, group in groups.items():
        if not rejects[rid]:
            continue
        best = max(group, key=lambda r: r["judge"])
        worst = min(rejects[rid], key=lambda r: r["judge"])
        if best["judge"] <= worst["judge"]:
            ties += 1
            continue
        pairs.append(
            {
                "id": rid,
                "prompt": best["prompt"],
                "chosen": best["completion"],
                "rejected": worst["completion"],
                "meta": {
                    "chosen_judge": best["judge"],
                    "rejected_judge": worst["judge"],
                    "chosen_reward": best["reward"],
                    "rejected_reward": worst["reward"],
                },
            }
        )
    return pairs, ties


def pair_metrics(pairs: list[dict], ties: int) -> dict:
    """Pair accuracy against the verifier: the chosen response correct and the rejected one wrong."""
    m = [p["meta"] for p in pairs]
    return {
        "pairs/count": len(pairs),
        "pairs/ties": ties,
        "pairs/accuracy": fraction([x["chosen_reward"] == 1.0 and x["rejected_reward"] == 0.0 for x in m]),
        "pairs/chosen_correct": fraction([x["chosen_reward"] == 1.0 for x in m]),
        "pairs/rejected_correct": fraction([x["rejected_reward"] == 1.0 for x in m]),
    }


@stage(version=1)
def judged_pairs(out: Path, judged: Artifact, anchor: Artifact | None, dataset: dict) -> dict:
    """Stage: best-vs-worst pairs from judged responses (``anchor``: rejected from the anchor
    model's judged responses), completions cut after the answer; writes pairs.jsonl, metrics.json."""
    task = tasks.load(dataset)
    clean = lambda rs: [{**r, "completion": task.clean(r["completion"])} for r in rs]  # noqa: E731
    anchors = clean(read_jsonl(anchor.file("judged.jsonl"))) if anchor is not None else None
    pairs, ties = best_vs_worst(clean(read_jsonl(judged.file("judged.jsonl"))), anchors)
    write_jsonl(out / "pairs.jsonl", pairs)
    metrics = pair_metrics(pairs, ties)
    write_json_atomic(out / "metrics.json", metrics)
    return metrics
