"""Held-out evaluation: greedy accuracy per difficulty level, and (``eval.sampled``) pass@k,
maj@k and best-of-n with each configured selector, plus the tokens spent.

An item the verifier cannot score (reward None) counts as wrong, in every metric: leaving it out of
the denominator would raise the accuracy of a model whose answers cannot be read."""

from __future__ import annotations

from pathlib import Path

from selfimprove import tasks
from selfimprove.engine import progress
from selfimprove.engine.pipeline import Artifact, stage, write_json_atomic, write_jsonl
from selfimprove.engine.registry import ConfigError
from selfimprove.generation import sample
from selfimprove.metrics import by_prompt, fraction, maj_at_k, pass_at_k
from selfimprove.scoring import verify_records
from selfimprove.stages.episodes import greedy

SELECTORS = ("oracle", "self_certainty")


def accuracy(scored: list[dict]) -> float:
    """Mean reward over every item, an unscorable one (reward None) counted as 0."""
    return fraction([r["reward"] or 0.0 for r in scored], 0.0)


def sampled_metrics(
    task, model: Artifact, level: str, eval: dict, scored: list[dict], hardware: dict
) -> tuple[dict, list[dict]]:
    """pass@k, maj@k and best-of-n (bon_<selector>@n) over ``scored``: n samples per record."""
    n = eval["n"]
    bad = [k for k in eval["k"] if not 0 < k <= n]
    if bad:
        raise ConfigError(f"eval.k={list(eval['k'])} has values outside 1..eval.n={n}: {bad}")
    unknown = [s for s in eval["selectors"] if s not in SELECTORS]
    if unknown:
        raise ConfigError(f"eval.selectors has unknown {unknown}; allowed: {', '.join(SELECTORS)}")
    if "self_certainty" in eval["selectors"]:
        from selfimprove.scoring.certainty import certainties

        scored = [{**r, "certainty": c} for r, c in zip(scored, certainties(model, scored, hardware))]
    groups = list(by_prompt(scored).values())
    out = {}
    for k in eval["k"]:
        out[f"pass@{k}/{level}"] = fraction(
            [pass_at_k(len(g), sum(r["reward"] == 1.0 for r in g), k) for g in groups], 0.0
        )
        if "extract" in task.capabilities:  # else maj@k is left out (said once when the run starts)
            votes = [
                maj_at_k([task.extract(r["completion"]) for r in g], [r["reward"] for r in g], k)
                for g in groups
            ]
            out[f"maj@{k}/{level}"] = fraction(votes, 0.0)
    for selector in eval["selectors"]:
        if selector == "oracle":  # a perfect verifier picks a correct sample whenever there is one
            picks = [max(g, key=lambda r: r["reward"] or 0.0) for g in groups]
        else:
            picks = [
                max(g, key=lambda r: r["certainty"] if r["certainty"] is not None else float("-inf"))
                for g in groups
            ]
        out[f"bon_{selector}@{n}/{level}"] = fraction([p["reward"] == 1.0 for p in picks], 0.0)
    return out, scored


@stage(
    name="evaluate", version=2
)  # 2: an unscorable item counts as wrong (was: left out of acc's denominator)
def evaluate(
    out: Path,
    model: Artifact,
    dataset: dict,
    generator: dict,
    hardware: dict,
    seed: int,
    eval: dict | None = None,
) -> dict:
    """Stage: greedy accuracy on each held-out set (and sampled metrics when ``eval.sampled``);
    writes metrics.json and samples.jsonl."""
    task = tasks.load(dataset)
    metrics, all_scored, tokens = {}, [], 0
    test_sets = task.test_sets()
    passes = 2 if eval and eval["sampled"] else 1  # greedy, then sampled
    with progress.bar("eval", passes * sum(map(len, test_sets.values())), "items") as advance:
        for level, records in test_sets.items():
            budget = task.max_new_tokens(records[0])
            scored = verify_records(
                task, sample(model, records, greedy(budget), generator, hardware, seed, advance)
            )
            metrics[f"acc/{level}"] = accuracy(scored)
            unscored = sum(r["reward"] is None for r in scored)
            if unscored:  # said, so that a low accuracy from unreadable answers is told apart
                metrics[f"unscored/{level}"] = unscored
            tokens += sum(r["meta"]["tokens"] for r in scored)
            all_scored += scored
            if eval and eval["sampled"]:
                sampling = {
                    "n": eval["n"],
                    "temperature": eval["temperature"],
                    "top_p": eval["top_p"],
                    "max_tokens": budget,
                    "stop": [],
                }
                drawn = verify_records(
                    task, sample(model, records, sampling, generator, hardware, seed, advance)
                )
                extra, drawn = sampled_metrics(task, model, level, eval, drawn, hardware)
                metrics.update(extra)
                tokens += sum(r["meta"]["tokens"] for r in drawn)
                all_scored += [{**r, "meta": {**r["meta"], "sampled": True}} for r in drawn]
    metrics["tokens/eval"] = tokens
    write_json_atomic(out / "metrics.json", metrics)
    write_jsonl(out / "samples.jsonl", all_scored)
    return {"test_items": sum(not r["meta"].get("sampled") for r in all_scored)}
