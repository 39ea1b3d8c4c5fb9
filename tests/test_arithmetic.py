"""The arithmetic task: gold rationales, the verifier on malformed text, and its data splits."""

from __future__ import annotations

import pytest

from selfimprove import tasks
from selfimprove.tasks.arithmetic import extract_answer, rationale
from tests.conftest import compose_cfg


@pytest.fixture(scope="module")
def task():
    return tasks.load(compose_cfg([]).dataset)


def test_rationale_adds_column_by_column_with_carries():
    assert rationale(573, 885) == "3+5+0=08|8;57+88:7+8+0=15|58;5+8:5+8+1=14|458;ans 1458"
    assert rationale(9, 9) == "9+9+0=18|8;ans 18"
    assert rationale(50, 50) == "0+0+0=00|0;5+5:5+5+0=10|00;ans 100"


@pytest.mark.parametrize(
    ("completion", "reward"),
    [
        ("3+5+0=08|8;57+88:7+8+0=15|58;5+8:5+8+1=14|458;ans 1458", 1.0),
        ("ans 1458", 1.0),  # the verifier checks the answer, not the steps
        ("3+5+0=08;ans 1458;ans 1459", 1.0),  # the first answer counts
        ("3+5+0=08|8;57+88:7+8+0=15|58;5+8:5+8+1=14|458;ans 1459", 0.0),
        ("", 0.0),
        ("ans ", 0.0),
        ("ans -1458", 0.0),
        ("1458", 0.0),
        ("\x00\uffff ans\n1458", 0.0),
        ("ans 14581", 0.0),
        ("x" * 10_000, 0.0),
    ],
)
def test_verifier_scores_malformed_text_zero_without_crashing(task, completion, reward):
    assert task.reward(prompts=["573+885:"], completions=[completion], answer=["1458"]) == [reward]


def test_extract_and_clean_cut_junk_after_the_answer(task):
    assert extract_answer("no answer here") is None
    assert task.clean("9+9+0=18;ans 18;9+9+0=junk") == "9+9+0=18;ans 18"
    assert task.clean("garbage") == "garbage"


def test_hint_prompt_carries_the_answer(task):
    rec = task.train_prompts(1)[0]
    assert task.hint_prompt(rec) == rec["prompt"][:-1] + "|" + rec["answer"] + ":"


def test_train_prompts_have_answers_but_no_rationales(task):
    prompts = task.train_prompts(1)
    assert len(prompts) == 256 and all("completion" not in p for p in prompts)
    assert {p["meta"]["level"] for p in prompts} == {3}
    assert all(int(p["answer"]) == p["meta"]["a"] + p["meta"]["b"] for p in prompts)


def test_seed_data_is_gold_and_only_few_exemplars_at_the_hard_level(task):
    seeds = task.seed_data()
    levels = [s["meta"]["level"] for s in seeds]
    # 100 distinct 1-digit sums, less the 27 test problems and their b+a twins (52 of them)
    assert levels.count(1) == 48 and levels.count(2) == 1000 and levels.count(3) == 64  # few_shot_per_level
    assert all(s["completion"] == rationale(s["meta"]["a"], s["meta"]["b"]) for s in seeds)


def test_held_out_sets_are_disjoint_from_training_and_fixed(task):
    test = {(r["meta"]["a"], r["meta"]["b"]) for r in task.test_sets()["3"]}
    train = {(r["meta"]["a"], r["meta"]["b"]) for i in (1, 2, 3) for r in task.train_prompts(i)}
    seeds = {(r["meta"]["a"], r["meta"]["b"]) for r in task.seed_data() if r["meta"]["level"] == 3}
    assert len(test) > 190 and not (test & train) and not (test & seeds)
    other_seed = tasks.load(compose_cfg(["seed=7"]).dataset)
    assert other_seed.test_sets() == task.test_sets()
    assert other_seed.train_prompts(1) != task.train_prompts(1)


def test_unknown_dataset_name_lists_available():
    with pytest.raises(ValueError, match="unknown dataset 'gsm9k'.*available: arithmetic"):
        tasks.load({"name": "gsm9k"})


def test_task_code_version_feeds_stage_fingerprints():
    from selfimprove.engine.pipeline import fingerprint_of
    from selfimprove.stages.data import task_prompts
    from selfimprove.tasks.arithmetic import Arithmetic

    dataset = compose_cfg([]).dataset
    before = fingerprint_of(task_prompts, {"dataset": tasks.spec(dataset), "iteration": 1})
    Arithmetic.version += 1
    try:
        after = fingerprint_of(task_prompts, {"dataset": tasks.spec(dataset), "iteration": 1})
    finally:
        Arithmetic.version -= 1
    assert before != after
