"""Preference-pair stages for DPO-style methods: SPIN's (gold vs own) and Self-Rewarding's (best vs
worst by the model's own judge). Both write ``pairs.jsonl`` records
``{"id", "prompt", "chosen", "rejected", "meta"}`` (training/dpo.py) and ``metrics.json``."""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

from selfimprove import tasks
from selfimprove.engine.pipeline import Artifact, read_jsonl, stage, write_json_atomic, write_jsonl
from selfimprove.metrics import fraction


@stage(name="sft_prompts", version=1)
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


@stage(name="spin_pairs", version=1)
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


def best_vs_worst(
    judged: list[dict], anchors: list[dict] | None = None, future: list[dict] | None = None
) -> tuple[list[dict], int]:
    """Self-Rewarding's pairs: per prompt, the response with the highest judge score is chosen and
    the one with the lowest rejected; a tie (equal scores) gives no pair. Responses the judge could
    not score (``judge`` None) take no part; the first response wins among equal scores.

    Temporal Self-Rewarding's two phases, each an option: with ``anchors`` (anchored rejection) the
    anchor model's lowest-scored response is rejected when it scores *below* the current model's
    worst, else the current worst stays; with ``future`` (future-guided chosen) the future model's
    highest-scored response is chosen when it scores *above* the current model's best. Each pair's
    meta says where its two responses came from. Returns (pairs, ties dropped)."""

    def by_id(records: list[dict] | None) -> dict[str, list[dict]]:
        groups: dict[str, list[dict]] = defaultdict(list)
        for r in records or []:
            if r["judge"] is not None:
                groups[r["id"]].append(r)
        return groups

    groups, anchor_groups, future_groups = by_id(judged), by_id(anchors), by_id(future)
    pairs, ties = [], 0
    for rid, group in groups.items():
        best, chosen_from = max(group, key=lambda r: r["judge"]), "current"
        worst, rejected_from = min(group, key=lambda r: r["judge"]), "current"
        if future_groups[rid]:
            candidate = max(future_groups[rid], key=lambda r: r["judge"])
            if candidate["judge"] > best["judge"]:
                best, chosen_from = candidate, "future"
        if anchor_groups[rid]:
            candidate = min(anchor_groups[rid], key=lambda r: r["judge"])
            if candidate["judge"] < worst["judge"]:
                worst, rejected_from = candidate, "anchor"
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
                    "chosen_from": chosen_from,
                    "rejected_from": rejected_from,
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
        "pairs/rejected_from_anchor": fraction([x["rejected_from"] == "anchor" for x in m]),
        "pairs/chosen_from_future": fraction([x["chosen_from"] == "future" for x in m]),
    }


@stage(name="judged_pairs", version=2)
def judged_pairs(
    out: Path, judged: Artifact, anchor: Artifact | None, dataset: dict, future: Artifact | None = None
) -> dict:
    """Stage: best-vs-worst pairs from judged responses (``anchor``, ``future``: the anchor's and
    the future model's judged responses, Temporal Self-Rewarding), completions cut after the answer;
    writes pairs.jsonl, metrics.json. Version 2: the anchor's worst replaces the current worst only
    when it scores lower (version 1 always took it)."""
    task = tasks.load(dataset)
    clean = lambda rs: [{**r, "completion": task.clean(r["completion"])} for r in rs]  # noqa: E731
    other = lambda a: clean(read_jsonl(a.file("judged.jsonl"))) if a is not None else None  # noqa: E731
    pairs, ties = best_vs_worst(clean(read_jsonl(judged.file("judged.jsonl"))), other(anchor), other(future))
    write_jsonl(out / "pairs.jsonl", pairs)
    metrics = pair_metrics(pairs, ties)
    write_json_atomic(out / "metrics.json", metrics)
    return metrics
