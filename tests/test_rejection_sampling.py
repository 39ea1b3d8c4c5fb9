"""The rejection-sampling family end to end on a tiny config (the model really trains; the run
directory shows which model each stage read), and STaR's options: rationalization, restart vs
continue, growing steps, dedupe, per-prompt cap, reward threshold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selfimprove.app import run
from selfimprove.engine.pipeline import DONE, Artifact, read_jsonl, write_jsonl
from selfimprove.stages.data import keep_correct
from tests.conftest import TINY_RUN, compose_cfg

pytestmark = pytest.mark.slow

DATASET = {
    "name": "arithmetic",
    "task_version": 3,
    "seed": 0,
    "test_seed": 1,
    "test_levels": [2],
    "test_per_level": 1,
}


def done(root: Path, stage: str) -> dict:
    return json.loads((root / stage / DONE).read_text())


# -- keep_correct: threshold, dedupe, cap, hint dropped ------------------------------------------------
def scored_artifact(tmp_path: Path, records: list[dict]) -> Artifact:
    folder = tmp_path / "scored"
    folder.mkdir()
    write_jsonl(folder / "scored.jsonl", records)
    return Artifact("score", folder, "fp")


def rec(pid: str, completion: str, reward: float | None, **meta) -> dict:
    return {
        "id": pid,
        "prompt": "12+30:",
        "completion": completion,
        "answer": "42",
        "reward": reward,
        "meta": meta,
    }


@pytest.fixture
def scored(tmp_path):
    return scored_artifact(
        tmp_path,
        [
            rec("a", "2+0+0=02|2;ans 42", 1.0, sample=0),
            rec("a", "2+0+0=02|2;ans 42;junk", 1.0, sample=1),  # a duplicate once cut after the answer
            rec("a", "2+0+0=02|2;1+3+0=04|42;ans 42", 1.0, sample=2),
            rec("a", "ans 41", 0.0, sample=3),
            rec("b", "x;ans 42", 0.5, sample=0),  # a partial reward
            rec("c", "y;ans 42", None, sample=0),  # the verifier could not judge: never kept
            {**rec("d", "z;ans 42", 1.0, sample=0, unhinted_prompt="12+30:"), "prompt": "12+30|42:"},
        ],
    )


def build(out: Path, scored: Artifact, **kwargs) -> list[dict]:
    out.mkdir()
    args = {"dataset": DATASET, "max_per_prompt": 4, "replay": None, "seed": 0, **kwargs}
    keep_correct(out, scored=[scored], **args)
    return read_jsonl(out / "train.jsonl")


def test_keep_correct_dedupes_cuts_and_drops_hints(tmp_path, scored):
    kept = build(tmp_path / "out", scored)
    by_id = sorted((r["id"], r["completion"]) for r in kept)
    assert by_id == [
        ("a", "2+0+0=02|2;1+3+0=04|42;ans 42"),
        ("a", "2+0+0=02|2;ans 42"),
        ("d", "z;ans 42"),
    ]
    assert next(r for r in kept if r["id"] == "d")["prompt"] == "12+30:", "the hint is dropped"


def test_keep_correct_caps_per_prompt_and_applies_the_threshold(tmp_path, scored):
    capped = build(tmp_path / "capped", scored, max_per_prompt=1)
    assert [r["id"] for r in capped] == ["a"], "one cap for the prompt, whatever the ids (d is a's, hinted)"
    lenient = build(tmp_path / "lenient", scored, min_reward=0.5)
    assert sorted(r["id"] for r in lenient) == ["a", "a", "b", "d"]


def test_the_cap_holds_across_iterations_whose_ids_differ(tmp_path):
    """GSM8K asks the same question again in a later iteration under a new id (train<n>-<row>):
    with accumulate, both iterations' rationales for it share one cap."""
    iterations = []
    for it in (1, 2):
        folder = tmp_path / f"scored{it}"
        folder.mkdir()
        write_jsonl(folder / "scored.jsonl", [rec(f"train{it}-7", f"s{it}-{k};ans 42", 1.0) for k in (0, 1)])
        iterations.append(Artifact("score", folder, f"fp{it}"))
    (tmp_path / "out").mkdir()
    keep_correct(tmp_path / "out", scored=iterations, dataset=DATASET, max_per_prompt=3, replay=None, seed=0)
    kept = read_jsonl(tmp_path / "out" / "train.jsonl")
    assert sorted(r["completion"] for r in kept) == ["s1-0;ans 42", "s1-1;ans 42", "s2-0;ans 42"]


def test_star_gsm8k_is_the_papers_algorithm_1():
    """experiment=star_gsm8k: the original model trained on this iteration's data only, for
    40 steps then 20 % more each iteration compounded (STaR's iteration_train.py, --exponential_grow)."""
    from selfimprove.methods.star import iteration_steps

    m = compose_cfg(["experiment=star_gsm8k"]).method
    assert (m.restart_from_base, m.accumulate, m.replay_seed_data) == (True, False, False)
    assert [iteration_steps(m, n) for n in range(1, 6)] == [40, 48, 57, 69, 82]
    linear = compose_cfg(["method.train.steps=40", "method.train.steps_growth=8"]).method
    assert [iteration_steps(linear, n) for n in range(1, 6)] == [40, 48, 56, 64, 72]


# -- STaR's options, end to end --------------------------------------------------------------------------
def test_star_rationalize_restart_and_growing_steps(tmp_path):
    root = tmp_path / "run"
    rows = run(
        compose_cfg(
            [
                *TINY_RUN,
                "method.rationalize=true",
                "method.restart_from_base=true",
                "method.train.steps_growth=5",
                f"run_dir={root}",
            ]
        )
    )
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert done(root, "warmstart/data")["counts"]["hinted"] > 0, "hinted demonstrations teach the hint format"
    hinted = read_jsonl(root / "iter_01/hint_prompts/prompts.jsonl")
    unsolved = {r["id"] for r in read_jsonl(root / "iter_01/score/scored.jsonl")} - {
        r["id"] for r in read_jsonl(root / "iter_01/score/scored.jsonl") if r["reward"] == 1.0
    }
    assert hinted and {r["id"] for r in hinted} == unsolved and all("|" in r["prompt"] for r in hinted)
    assert (root / "iter_01/rationalize_score/scored.jsonl").exists()
    for it, steps in ((1, 10), (2, 15)):  # train.steps + steps_growth * (iteration - 1)
        train = done(root, f"iter_{it:02d}/train")
        assert train["inputs"]["model"] == "warmstart/train", "restart_from_base trains the warm start"
        assert train["counts"]["steps"] == steps
    assert {"explore/pass@1", "explore/distinct_correct", "exploit/bon_certainty"} <= set(rows[1])


# -- ReST-EM ------------------------------------------------------------------------------------------------
def test_rest_em_trains_from_base_on_a_fixed_prompt_set(tmp_path):
    root = tmp_path / "run"
    # debug=tiny's 30-step warm start solves no 3-digit prompt; 300 small steps, 2-digit train prompts
    # and 16 samples each make both E-steps keep samples, and some prompt find two distinct correct
    # ones, so that the cap of one per prompt has something to drop (measured: 2 and 1 such prompts)
    keeps = [
        "method.warmstart.steps=300",
        "method.warmstart.batch_size=16",
        "dataset.train_levels=[2]",
        "method.sampling.n=16",
    ]
    rows = run(
        compose_cfg([*TINY_RUN, "method=rest_em", "method.max_per_prompt=1", *keeps, f"run_dir={root}"])
    )
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    first, second = (read_jsonl(root / f"iter_0{i}/prompts/prompts.jsonl") for i in (1, 2))
    assert first == second, "fixed_prompts: the same training set every iteration"
    assert done(root, "iter_02/generate")["inputs"]["model"] == "iter_01/train", (
        "E-step samples the latest model"
    )
    for it in (1, 2):
        assert done(root, f"iter_0{it}/train")["inputs"]["model"] == "warmstart/train", (
            "M-step starts at the base"
        )
        kept = [r for r in read_jsonl(root / f"iter_0{it}/build/train.jsonl") if "sample" in r["meta"]]
        assert kept and len({r["id"] for r in kept}) == len(kept), "at most max_per_prompt=1 per prompt"
    correct = {}
    for r in read_jsonl(root / "iter_01/score/scored.jsonl"):
        if r["reward"] == 1.0:
            correct.setdefault(r["id"], set()).add(r["completion"])
    assert any(len(c) >= 2 for c in correct.values()), "the cap had a second correct sample to drop"
    assert rows[1]["samples"] == 16 * 16 and rows[1]["tokens"] > 0


# -- B-STaR ---------------------------------------------------------------------------------------------------
def test_bstar_samples_with_the_searched_settings(tmp_path):
    root = tmp_path / "run"
    search = [
        "method.search.queries=4",
        "method.search.temperatures=[0.5,1.0]",
        "method.search.n=[1,2]",
        "method.search.thresholds=[-1.0,0.5]",
    ]
    rows = run(compose_cfg([*TINY_RUN, "method=bstar", *search, f"run_dir={root}"]))
    for it in (1, 2):
        grid = read_jsonl(root / f"iter_0{it}/search/search.jsonl")
        chosen = json.loads((root / f"iter_0{it}/search/settings.json").read_text())
        assert len(grid) == 2 * 2 * 2 and chosen == max(grid, key=lambda r: r["balance"])
        samples = read_jsonl(root / f"iter_0{it}/generate/samples.jsonl")
        assert len(samples) == 16 * chosen["n"], "the generate stage reads the chosen sample count"
        assert rows[it]["search/temperature"] == chosen["temperature"] and "search/balance" in rows[it]
        selected = read_jsonl(root / f"iter_0{it}/select/scored.jsonl")
        assert selected and all(r["score"] > chosen["threshold"] for r in selected), (
            "B-STaR keeps score > tau"
        )
        assert rows[it]["selected"] == len(selected) and 0 <= rows[it]["explore/pass@K-1"] <= 1
        assert "exploit/reward@K-1" in rows[it] and "select/exploit_factor" in rows[it]
    assert done(root, "iter_02/train")["inputs"]["model"] == "iter_01/train", "B-STaR continues training"
