"""B-STaR's balance search (Zeng et al. 2024): before an iteration, choose the sampling temperature,
sample count and reward threshold that maximise the balance score on a small query subset.

The paper's rule (§2.3 Eq. 2, Alg. 1 line 14): score = 1(correct) + reward in [-1, 1], kept when
score > tau, so a wrong answer with a high reward passes a low tau. Our reward is the generating
model's self-certainty, mapped onto [-1, 1] by the span seen in the search.

The chosen settings are an artifact (settings.json) that the generate and select stages read, so
their fingerprints follow the search's output."""

from __future__ import annotations

import json
import random
from pathlib import Path

from selfimprove import tasks
from selfimprove.engine.pipeline import Artifact, read_jsonl, stage, write_json_atomic, write_jsonl
from selfimprove.engine.registry import ConfigError
from selfimprove.generation import sample
from selfimprove.metrics import balance_score, by_prompt, fraction, pass_at_k_s, reward_at_k_s
from selfimprove.scoring import verify_records
from selfimprove.scoring.certainty import certainties


def reward_range(records: list[dict]) -> tuple[float, float]:
    """The (min, max) self-certainty of ``records``: the span mapped onto the paper's [-1, 1]."""
    known = [r["certainty"] for r in records if r.get("certainty") is not None]
    return (min(known), max(known)) if known else (0.0, 0.0)


def normalised(certainty: float | None, span: tuple[float, float]) -> float:
    """Self-certainty mapped linearly from ``span`` onto [-1, 1] and clipped, as the paper
    normalises its PRM score to [-1, 1] (App. A.1); no certainty (an empty completion) = -1."""
    lo, hi = span
    if certainty is None:
        return -1.0
    if hi <= lo:
        return 0.0
    return max(-1.0, min(1.0, 2 * (certainty - lo) / (hi - lo) - 1))


def with_scores(records: list[dict], span: tuple[float, float]) -> list[dict]:
    """Each record with B-STaR's ``score`` = 1(correct) + normalised reward (Eq. 2): a wrong answer
    scores in [-1, 1], a correct one in [0, 2]."""
    return [
        {**r, "score": round(float(r["reward"] == 1.0) + normalised(r.get("certainty"), span), 6)}
        for r in records
    ]


def selected(records: list[dict], threshold: float) -> list[dict]:
    """B-STaR's selection (Alg. 1 line 14): every scored sample with score > threshold, wrong
    answers with a high reward included -- the balance score's n'/n is what penalises those."""
    return [r for r in records if r["score"] > threshold]


def balance_terms(records: list[dict], threshold: float, clean) -> list[tuple[int, int]]:
    """Per query (n', n): unique correct selected responses, and selected responses (Eq. 3)."""
    groups = []
    for group in by_prompt(records).values():
        chosen = selected(group, threshold)
        correct = {clean(r["completion"]) for r in chosen if r["reward"] == 1.0}
        groups.append((len(correct), len(chosen)))
    return groups


def balance_of(records: list[dict], threshold: float, n_star: int, clean) -> float:
    """Average balance score of one setting (Eq. 3) over the queries of scored ``records``."""
    return balance_score(balance_terms(records, threshold, clean), n_star)


def exploit_factor(groups: list[tuple[int, int]]) -> float | None:
    """Mean n'/n over the queries with something selected: 1.0 = every selected response is a
    distinct correct one; below 1 when wrong answers (or duplicates) pass."""
    return fraction([nc / n for nc, n in groups if n])


@stage(name="balance_search", version=2)
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
    """Stage: grid search of (temperature, n, threshold) on ``search.queries`` prompts (Alg. 1
    line 4); writes search.jsonl (every setting and its balance score) and settings.json (the best
    one, with the certainty span that normalises the reward, so the select stage scores alike)."""
    if not search["temperatures"] or not search["n"] or not search["thresholds"]:
        raise ConfigError("method.search needs non-empty temperatures, n and thresholds")
    task = tasks.load(dataset)
    records = read_jsonl(prompts.file("prompts.jsonl"))
    records = random.Random(seed).sample(records, min(search["queries"], len(records)))
    n_max = max(search["n"])
    rows, tokens = [], 0
    for temperature in search["temperatures"]:
        drawn = verify_records(
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
        span = reward_range(drawn)
        drawn = with_scores(drawn, span)
        for n in search["n"]:
            subset = [r for r in drawn if r["meta"]["sample"] < n]  # the first n of n_max samples
            for threshold in sorted(search["thresholds"]):
                groups = balance_terms(subset, threshold, task.clean)
                rows.append(
                    {
                        "temperature": temperature,
                        "n": n,
                        "threshold": threshold,
                        "balance": round(balance_score(groups, search["n_star"]), 4),
                        "exploit_factor": exploit_factor(groups),
                        "selected": sum(n_sel for _, n_sel in groups),
                        "selected_wrong": sum(r["reward"] != 1.0 for r in selected(subset, threshold)),
                        "sample_accuracy": fraction([r["reward"] == 1.0 for r in subset]),
                        "reward_range": [round(x, 6) for x in span],
                    }
                )
    best = max(rows, key=lambda r: r["balance"])  # ties: the first in grid order (lowest threshold)
    write_jsonl(out / "search.jsonl", rows)
    write_json_atomic(out / "settings.json", best)
    return {
        "search/temperature": best["temperature"],
        "search/n": best["n"],
        "search/threshold": best["threshold"],
        "search/balance": best["balance"],
        "search/exploit_factor": best["exploit_factor"],
        "tokens/search": tokens,
    }


def settings_of(settings: Artifact) -> dict:
    return json.loads(settings.file("settings.json").read_text())


@stage(name="generate_searched", version=1)
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


@stage(name="select", version=2)
def select(out: Path, scored: Artifact, settings: Artifact, dataset: dict, monitor_s: list[int]) -> dict:
    """Stage: the samples whose score 1(correct) + normalised self-certainty exceeds the searched
    threshold (Alg. 1 line 14), best score first within each prompt (so a per-prompt cap keeps the
    best, as the official code does); logs n'/n and the paper's Pass@K-S and Reward@K-S (§2.2)
    over this iteration's samples."""
    chosen = settings_of(settings)
    clean = tasks.load(dataset).clean
    records = with_scores(read_jsonl(scored.file("scored.jsonl")), tuple(chosen["reward_range"]))
    records = [r for r in records if r["reward"] is not None]
    kept = []
    for group in by_prompt(records).values():
        kept += sorted(selected(group, chosen["threshold"]), key=lambda r: -r["score"])
    write_jsonl(out / "scored.jsonl", kept)
    groups = balance_terms(records, chosen["threshold"], clean)
    k = min((len(g) for g in by_prompt(records).values()), default=0)
    monitors = {}
    for s in monitor_s:
        if s <= k:
            monitors[f"explore/pass@K-{s}"] = pass_at_k_s(records, s, clean)
            monitors[f"exploit/reward@K-{s}"] = reward_at_k_s(records, s, "score")
    return {
        "selected": len(kept),
        "selected_correct": sum(r["reward"] == 1.0 for r in kept),
        "selected_wrong": sum(r["reward"] != 1.0 for r in kept),
        "select/exploit_factor": exploit_factor(groups),
        "select/K": k,
        **monitors,
    }
