"""B-STaR's balance search (Zeng et al. 2024): before an iteration, choose the sampling temperature,
sample count and reward threshold that maximise the balance score on a small query subset.

The chosen settings are an artifact (settings.json) that the generate and select stages read, so
their fingerprints follow the search's output."""

from __future__ import annotations

import json
import random
from pathlib import Path

from selfimprove import tasks
from selfimprove.generation import sample
from selfimprove.metrics import balance_score, by_prompt, fraction
from selfimprove.pipeline import Artifact, read_jsonl, stage, write_json_atomic, write_jsonl
from selfimprove.registry import ConfigError
from selfimprove.scoring import score_records
from selfimprove.scoring.certainty import certainties


def quantile(values: list[float], q: float) -> float:
    """The q-quantile of ``values`` (nearest rank below)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def selected(records: list[dict], threshold: float | None) -> list[dict]:
    """B-STaR's selection: a correct final answer and a reward (self-certainty) >= threshold."""
    return [
        r
        for r in records
        if r["reward"] == 1.0
        and (threshold is None or (r["certainty"] is not None and r["certainty"] >= threshold))
    ]


def balance_of(records: list[dict], threshold: float | None, n_star: int, clean) -> float:
    """Balance score of one setting: per query, unique correct selected / selected."""
    groups = []
    for group in by_prompt(records).values():
        chosen = selected(group, threshold)
        groups.append((len({clean(r["completion"]) for r in chosen}), len(chosen)))
    return balance_score(groups, n_star)


@stage(version=1)
def balance_search(
    out: Path,
    model: Artifact,
    prompts: Artifact,
    dataset: dict,
    search: dict,
    sampling: dict,
    generator: dict,
    hardware: dict,
    seed: int,
) -> dict:
    """Stage: grid search of (temperature, n, threshold) on ``search.queries`` prompts; writes
    search.jsonl (every setting and its balance score) and settings.json (the best one)."""
    if not search["temperatures"] or not search["n"] or not search["threshold_quantiles"]:
        raise ConfigError("method.search needs non-empty temperatures, n and threshold_quantiles")
    task = tasks.load(dataset)
    records = read_jsonl(prompts.file("prompts.jsonl"))
    records = random.Random(seed).sample(records, min(search["queries"], len(records)))
    n_max = max(search["n"])
    rows, tokens = [], 0
    for temperature in search["temperatures"]:
        drawn = score_records(
            task,
            sample(
                model,
                records,
                {**sampling, "n": n_max, "temperature": temperature},
                generator,
                hardware,
                seed,
            ),
        )
        drawn = [{**r, "certainty": c} for r, c in zip(drawn, certainties(model, drawn, hardware))]
        tokens += sum(r["meta"]["tokens"] for r in drawn)
        for n in search["n"]:
            subset = [r for r in drawn if r["meta"]["sample"] < n]  # the first n of n_max samples
            known = [r["certainty"] for r in selected(subset, None)]
            for q in search["threshold_quantiles"]:
                threshold = quantile(known, q) if known and q > 0 else None
                rows.append(
                    {
                        "temperature": temperature,
                        "n": n,
                        "threshold_quantile": q,
                        "threshold": threshold,
                        "balance": round(balance_of(subset, threshold, search["n_star"], task.clean), 4),
                        "sample_accuracy": fraction([r["reward"] == 1.0 for r in subset]),
                    }
                )
    best = max(rows, key=lambda r: r["balance"])  # ties: the first in grid order
    write_jsonl(out / "search.jsonl", rows)
    write_json_atomic(out / "settings.json", best)
    return {
        "search/temperature": best["temperature"],
        "search/n": best["n"],
        "search/threshold_quantile": best["threshold_quantile"],
        "search/threshold": best["threshold"],
        "search/balance": best["balance"],
        "tokens/search": tokens,
    }


def settings_of(settings: Artifact) -> dict:
    return json.loads(settings.file("settings.json").read_text())


@stage(version=1)
def generate_searched(
    out: Path,
    model: Artifact,
    prompts: Artifact,
    settings: Artifact,
    sampling: dict,
    generator: dict,
    hardware: dict,
    seed: int,
) -> dict:
    """Stage: the generate stage with the searched temperature and sample count."""
    chosen = settings_of(settings)
    records = read_jsonl(prompts.file("prompts.jsonl"))
    samples = sample(
        model,
        records,
        {**sampling, "n": chosen["n"], "temperature": chosen["temperature"]},
        generator,
        hardware,
        seed,
    )
    write_jsonl(out / "samples.jsonl", samples)
    return {
        "prompts": len(records),
        "samples": len(samples),
        "tokens": sum(s["meta"]["tokens"] for s in samples),
    }


@stage(version=1)
def select(out: Path, scored: Artifact, settings: Artifact) -> dict:
    """Stage: the samples whose self-certainty reaches the searched threshold (scored.jsonl)."""
    threshold = settings_of(settings)["threshold"]
    records = read_jsonl(scored.file("scored.jsonl"))
    kept = [
        r
        for r in records
        if threshold is None or (r["certainty"] is not None and r["certainty"] >= threshold)
    ]
    write_jsonl(out / "scored.jsonl", kept)
    return {"selected": len(kept), "selected_correct": sum(r["reward"] == 1.0 for r in kept)}
