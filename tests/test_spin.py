"""SPIN and Self-Rewarding end to end on very small configs (the tiny model really trained with
TRL's DPOTrainer), and a run killed in the middle of an iteration: the same command finishes it
without recomputing the stages that were done."""

from __future__ import annotations

import json

import pytest

from selfimprove import tasks
from selfimprove.app import run
from selfimprove.engine.pipeline import DONE, read_jsonl
from tests.conftest import compose_cfg, kill_when, selfimprove

pytestmark = pytest.mark.slow

SMALL = [
    "debug=tiny",
    "dataset.seed_per_level=40",
    "dataset.train_per_iteration=12",
    "dataset.test_levels=[2]",
    "dataset.test_per_level=8",
]
SPIN = ["method=spin", "method.prompts_per_iteration=24", *SMALL]
SELF_REWARDING = [
    "method=self_rewarding",
    "method.anchored_rejection=true",
    "method.future_guided_chosen=true",
    "method.sampling.n=3",
    # three sampled judgements averaged (the paper's): scores between 0 and 1, so fewer ties
    "method.judge.samples=3",
    "method.judge.temperature=1.0",
    *SMALL,
]


def test_spin_end_to_end(tmp_path):
    rows = run(compose_cfg([*SPIN, f"run_dir={tmp_path}"]))
    assert [r["iteration"] for r in rows] == [0, 1, 2] and all("acc/2" in r for r in rows)
    first, second = (read_jsonl(tmp_path / f"iter_0{i}" / "pairs" / "pairs.jsonl") for i in (1, 2))
    assert first and rows[1]["pairs/new"] == len(first) and rows[1]["pairs/from_previous"] == 0
    assert rows[2]["pairs/from_previous"] == len(first), "iteration 2 mixes in iteration 1's pairs"
    gold = {r["id"]: r["completion"] for r in read_jsonl(tmp_path / "warmstart" / "data" / "train.jsonl")}
    assert all(p["chosen"] == gold[p["id"]] != p["rejected"] for p in first)
    counts = [json.loads((tmp_path / f"iter_0{i}" / "train" / DONE).read_text()) for i in (1, 2)]
    assert [c["counts"]["steps"] for c in counts] == [4, 4]
    assert counts[1]["inputs"] == {
        "model": "iter_01/train",
        "reference": "iter_01/train",
        "pairs": "iter_02/pairs",
        "train": counts[1]["inputs"]["train"],
        "hardware": counts[1]["inputs"]["hardware"],
        "seed": 2,
    }, "each iteration trains from the previous iterate, which is also the reference"


def test_self_rewarding_end_to_end(tmp_path):
    rows = run(compose_cfg([*SELF_REWARDING, f"run_dir={tmp_path}"]))
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    for key in (
        "acc/2",
        "judge/parsed",
        "judge/agreement",
        "pairs/count",
        "pairs/accuracy",
        "sample_accuracy",
    ):
        assert key in rows[1] and key in rows[2], key
    eft = [
        r
        for r in read_jsonl(tmp_path / "warmstart" / "judge_data" / "train.jsonl")
        if "judge_example" in r["meta"]
    ]
    assert {r["completion"] for r in eft} == {" 0", " 1"} and all(
        r["prompt"].endswith("\njudge:") for r in eft
    )
    judged = read_jsonl(tmp_path / "iter_01" / "judge" / "judged.jsonl")
    assert len(judged) == 12 * 3 and all("judge" in r and "judgements" in r["meta"] for r in judged)
    # each pair rejects the lowest-judged response (cut after its answer) of the source it names: the
    # anchor M_1's where that scores below the current model's worst, else the current model's own
    task = tasks.load(tasks.spec(compose_cfg(SELF_REWARDING).dataset))
    worst = {}
    for source, name in (("current", "judge"), ("anchor", "anchor_judge")):
        for r in read_jsonl(tmp_path / "iter_01" / name / "judged.jsonl"):
            if r["judge"] is not None and (
                (source, r["id"]) not in worst or r["judge"] < worst[source, r["id"]]["judge"]
            ):
                worst[source, r["id"]] = r
    pairs = read_jsonl(tmp_path / "iter_01" / "pairs" / "pairs.jsonl")
    assert pairs, "this config yields pairs (else the checks below would be empty)"
    for pair in pairs:
        own, rejected = worst["current", pair["id"]], worst[pair["meta"]["rejected_from"], pair["id"]]
        assert pair["rejected"] == task.clean(rejected["completion"]), pair
        assert pair["meta"]["rejected_judge"] == rejected["judge"] < pair["meta"]["chosen_judge"], pair
        if pair["meta"]["rejected_from"] == "anchor":
            assert rejected["judge"] < own["judge"], pair
    # phase 2: a temporary model trained on those pairs proposes chosen responses, judged by M_1; its
    # best is chosen where it beats M_1's own best, and the iterate is trained on the rebuilt pairs
    best = {}
    for name in ("judge", "future_judge"):
        for r in read_jsonl(tmp_path / "iter_01" / name / "judged.jsonl"):
            if r["judge"] is not None:
                best[name, r["id"]] = max(best.get((name, r["id"]), -1.0), r["judge"])
    rebuilt = read_jsonl(tmp_path / "iter_01" / "future_pairs" / "pairs.jsonl")
    assert rebuilt, "this config yields pairs (else the checks below would be empty)"
    for pair in rebuilt:
        own, future = best["judge", pair["id"]], best.get(("future_judge", pair["id"]), -1.0)
        if pair["meta"]["chosen_from"] == "future":
            assert pair["meta"]["chosen_judge"] == future > own, pair
        else:
            assert pair["meta"]["chosen_judge"] == own >= future, pair
    from_future = sum(p["meta"]["chosen_from"] == "future" for p in rebuilt)
    assert rows[1]["pairs/count"] == len(rebuilt), "the iterate's pairs are the rebuilt ones"
    assert rows[1]["pairs/chosen_from_future"] == round(from_future / len(rebuilt), 4)


def test_killed_mid_iteration_resumes_without_recomputing(tmp_path):
    kill_in = "iter_01/train"  # after the iteration's generate and pairs stages are done
    settings = ["method.iterations=1", "method.train.steps=30", "out_root=outputs", "store=false"]
    command = ["run", *SPIN, *settings, "hardware.num_threads=1"]
    kill_when(command, tmp_path, f"outputs/*/{kill_in}.partial/trainer")
    (root,) = [p for p in (tmp_path / "outputs").iterdir() if p.is_dir()]
    assert not (root / kill_in / DONE).exists()

    selfimprove(*command, cwd=tmp_path)
    actions: dict[str, list[str]] = {}
    for e in read_jsonl(root / "events.jsonl"):
        actions.setdefault(e["stage"], []).append(e["action"])
    done_before = [
        "warmstart/train",
        "warmstart/eval",
        "iter_01/prompts",
        "iter_01/generate",
        "iter_01/pairs",
    ]
    for stage_name in done_before:
        assert actions[stage_name] == ["computed", "reused"], (stage_name, actions[stage_name])
    assert actions[kill_in] == ["computed"] and (root / kill_in / DONE).exists()
    assert [r["iteration"] for r in read_jsonl(root / "metrics.jsonl")] == [0, 1]
