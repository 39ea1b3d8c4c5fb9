"""GSM8K / MATH (real `datasets` loaders on local jsonl/parquet files), reasoning-gym, HumanEval.
No hub access: every file is written here."""

from __future__ import annotations

import json

import pytest

from selfimprove import tasks
from selfimprove.engine.pipeline import plain
from selfimprove.engine.registry import ConfigError
from tests.conftest import compose_cfg


def gsm8k_row(a: int, b: int) -> dict:
    """A row in openai/gsm8k's layout: the question, and a solution ending in "#### answer"."""
    return {
        "question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
        "answer": f"Tom has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}",
    }


GSM8K_ROWS = [gsm8k_row(a, b) for a, b in [(3, 4), (10, 5), (7, 8), (1200, 34), (2, 2), (6, 1)]]
# MATH-lighteval's train layout: problem, solution (ending in \boxed{}), level as "Level N", type
MATH_ROWS = [
    {
        "problem": "What is $1/2 + 0$?",
        "solution": "It is $\\boxed{\\frac{1}{2}}$.",
        "level": "Level 1",
        "type": "Prealgebra",
    },
    {"problem": "Solve $x+1=3$.", "solution": "So $x = \\boxed{2}$.", "level": "Level 2", "type": "Algebra"},
    {
        "problem": "Compute $\\sqrt{16}$.",
        "solution": "We get $\\boxed{4}$.",
        "level": "Level 1",
        "type": "Prealgebra",
    },
    {"problem": "Give $(1,2)$.", "solution": "$\\boxed{(1,2)}$", "level": "Level 3", "type": "Algebra"},
]


def reworded(rows: list[dict]) -> list[dict]:
    """MATH rows as other problems (a train split must not hold the test split's questions)."""
    return [{**r, "problem": r["problem"] + " Again."} for r in rows]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path, rows):
    from datasets import Dataset

    Dataset.from_list(rows).to_parquet(str(path))
    return path


def load(overrides):
    return tasks.load(plain(compose_cfg(overrides).dataset))


def test_gsm8k_from_local_jsonl_and_parquet(tmp_path):
    more = [(20, 22), (5, 5), (9, 9)]  # the train split's questions that are not test questions too
    train = write_jsonl(tmp_path / "train.jsonl", GSM8K_ROWS + [gsm8k_row(a, b) for a, b in more])
    test = write_parquet(tmp_path / "test.parquet", GSM8K_ROWS[:3])
    task = load(
        [
            "dataset=gsm8k",
            f"dataset.train.path={train}",
            f"dataset.test.path={test}",
            "dataset.seed_size=2",
            "dataset.train_per_iteration=3",
        ]
    )
    seeds = task.seed_data()
    assert len(seeds) == 2
    assert "<<" not in seeds[0]["completion"] and seeds[0]["completion"].endswith(
        f"\\boxed{{{seeds[0]['answer']}}}."
    )
    assert "\\boxed{}" in seeds[0]["prompt"] and "apples" in seeds[0]["prompt"]
    assert seeds[0]["answer"] in {str(a + b) for a, b in [(1200, 34), (2, 2), (6, 1), *more]}
    prompts1, prompts2 = task.train_prompts(1), task.train_prompts(2)
    assert len(prompts1) == 3 and "completion" not in prompts1[0]
    seed_q = {s["prompt"] for s in seeds}
    assert not seed_q & {p["prompt"] for p in prompts1 + prompts2}  # seeds are never train prompts
    test_set = task.test_sets()["test"]
    assert not {r["prompt"] for r in test_set} & {p["prompt"] for p in seeds + prompts1 + prompts2}
    assert [r["answer"] for r in test_set] == ["7", "15", "15"]
    # the gold completions themselves score 1; math-verify accepts other spellings too
    assert task.reward([], [s["completion"] for s in seeds], [s["answer"] for s in seeds]) == [1.0, 1.0]
    assert task.reward([], ["so \\boxed{15.0}", "\\boxed{16}", "no answer here", ""], ["15"] * 4) == [
        1.0,
        0.0,
        0.0,
        0.0,
    ]
    assert task.clean("x \\boxed{7}. Done.\nQuestion: junk") == "x \\boxed{7}. Done."


def test_math_answers_from_boxed_solutions_and_levels(tmp_path):
    data = write_jsonl(tmp_path / "math.jsonl", MATH_ROWS)
    train = write_jsonl(tmp_path / "train.jsonl", reworded(MATH_ROWS))
    task = load(
        [
            "dataset=math",
            f"dataset.train.path={train}",
            f"dataset.test.path={data}",
            "dataset.seed_size=1",
            "dataset.train_per_iteration=2",
        ]
    )
    sets = task.test_sets()
    assert sorted(sets) == ["Level 1", "Level 2", "Level 3"]
    assert [r["answer"] for r in sets["Level 1"]] == ["\\frac{1}{2}", "4"]
    assert task.seed_data()[0]["completion"].endswith("$") or "\\boxed" in task.seed_data()[0]["completion"]
    rewards = task.reward(
        [],
        ["The answer is \\boxed{0.5}", "\\boxed{\\frac{2}{4}}", "\\boxed{3}", "\\boxed{(1, 2)}"],
        ["\\frac{1}{2}", "\\frac{1}{2}", "2", "(1,2)"],
    )
    assert rewards == [1.0, 1.0, 0.0, 1.0]


def test_local_file_with_unknown_suffix_or_missing_column_is_one_line(tmp_path):
    bad = tmp_path / "data.txt"
    bad.write_text("x")
    with pytest.raises(ConfigError, match="suffix '.txt'"):
        load(["dataset=gsm8k", f"dataset.train.path={bad}"]).seed_data()
    data = write_jsonl(tmp_path / "d.jsonl", MATH_ROWS)
    with pytest.raises(ConfigError, match="no column 'question'"):
        load(["dataset=gsm8k", f"dataset.train.path={data}"]).seed_data()
    with pytest.raises(ConfigError, match="must contain '\\{question\\}'"):
        load(["dataset=gsm8k", "dataset.prompt_template=hello"])


def test_countdown_through_reasoning_gym():
    task = load(
        ["dataset=countdown", "dataset.seed_size=4", "dataset.train_per_iteration=5", "dataset.test_size=6"]
    )
    test = task.test_sets()["countdown"]
    assert len(test) == 6 and "<answer>" in test[0]["prompt"] and "Calculate" in test[0]["prompt"]
    assert len(task.train_prompts(1)) == 5 and task.train_prompts(1) != task.train_prompts(2)
    seeds = task.seed_data()
    assert seeds and seeds[0]["completion"].startswith("<answer>")
    records = test[:2]
    completions = [f"thinking... <answer>{records[0]['answer']}</answer> junk", "<answer>1+1</answer>"]
    rewards = task.reward(
        [r["prompt"] for r in records],
        completions,
        [r["answer"] for r in records],
        meta=[r["meta"] for r in records],
    )
    assert rewards[0] == 1.0 and rewards[1] < 1.0
    assert task.clean(completions[0]).endswith("</answer>")
    # the same records after a JSON round trip (as stages store them) score the same
    back = json.loads(json.dumps(records))
    assert (
        task.reward([], completions, [r["answer"] for r in back], meta=[r["meta"] for r in back]) == rewards
    )


def test_any_reasoning_gym_task_by_name_and_unknown_name():
    task = load(["dataset=reasoning_gym", "dataset.task=basic_arithmetic", "dataset.test_size=3"])
    rec = task.test_sets()["basic_arithmetic"][0]
    assert task.reward([], [f"<answer>{rec['answer']}</answer>"], [rec["answer"]], meta=[rec["meta"]]) == [
        1.0
    ]
    with pytest.raises(ConfigError, match="did you mean 'countdown'"):
        load(["dataset=reasoning_gym", "dataset.task=countdwn"]).test_sets()


# Samples that exit with status 0 instead of letting the tests run (issue 18): each must fail.
EXIT_TRICKS = {
    "sys.exit(0) in the body": "    import sys\n    sys.exit(0)\n",
    "os._exit(0) registered at exit": "    import atexit, os\n    atexit.register(os._exit, 0)\n    return None\n",
    "exit(0) in the body": "    exit(0)\n",
    "raise SystemExit(0) in the body": "    raise SystemExit(0)\n",
    "os._exit(0) at the top level": "    return None\nimport os\nos._exit(0)\n",
}


def test_humaneval_canonical_all_pass_and_exit_tricks_all_fail(capsys):
    """All 164 canonical solutions pass; each exit trick exits 0 on all 164 and passes none."""
    import time

    task = load(["dataset=humaneval", "dataset.workers=6"])
    records = task.test_sets()["humaneval"]
    assert len(records) == 164 and task.seed_data() == []
    ids = [r["id"] for r in records]
    kinds = {"canonical": [task._problems[i]["canonical_solution"] for i in ids]}
    kinds |= {trick: [body] * len(ids) for trick, body in EXIT_TRICKS.items()}
    passed, exit_zero = {}, {}
    with capsys.disabled():
        print(f"\nHumanEval, 164 problems per row, {task.cfg['workers']} sandbox workers")
        for kind, completions in kinds.items():
            started = time.monotonic()
            results = task.run_tests(completions, ids)
            passed[kind] = sum(r.passed for r in results)
            exit_zero[kind] = sum(r.returncode == 0 for r in results)
            print(
                f"  {kind:<34} passed {passed[kind]:>3}/164   exited 0: {exit_zero[kind]:>3}/164"
                f"   {time.monotonic() - started:5.1f} s"
            )
            if kind == "canonical":
                assert not [(i, r.stderr[-200:]) for i, r in zip(ids, results) if not r.passed]
    assert {kind: n for kind, n in passed.items() if kind != "canonical"} == dict.fromkeys(EXIT_TRICKS, 0)
    assert all(exit_zero[trick] == 164 for trick in EXIT_TRICKS)  # they all did exit 0
    assert task.reward([], [""] * 20, ids[:20]) == [0.0] * 20  # an empty body fails too


def test_humaneval_instruct_style_fenced_answers_and_train_split():
    task = load(["dataset=humaneval", "dataset.train_size=10", "dataset.test_size=2"])
    assert len(task.train_prompts(1)) == 10 and len(task.test_sets()["humaneval"]) == 2
    p = task._problems["HumanEval/0"]
    whole = f"Here you go:\n```python\n{p['prompt']}{p['canonical_solution']}```\nHope it helps."
    body_then_junk = p["canonical_solution"] + "\n\ndef unrelated():\n    raise SystemExit(1)\n"
    wrong = "```python\ndef has_close_elements(numbers, threshold):\n    return True\n```"
    assert task.reward([], [whole, body_then_junk, wrong], ["HumanEval/0"] * 3) == [1.0, 1.0, 0.0]


def test_math_two_turn_prompts_and_corrupted_attempts_for_score(tmp_path):
    """SCoRe on MATH: the second turn shows the attempt cut after its box and SCoRe's instruction;
    a corrupted gold attempt keeps the reasoning but math-verify rejects its answer."""
    import random

    data = write_jsonl(tmp_path / "math.jsonl", MATH_ROWS)
    train = write_jsonl(tmp_path / "train.jsonl", reworded(MATH_ROWS))
    task = load(
        ["dataset=math", f"dataset.train.path={train}", f"dataset.test.path={data}", "dataset.seed_size=4"]
    )
    seeds = task.seed_data()
    rng = random.Random(0)
    wrong = [task.corrupt(r, rng) for r in seeds]
    assert task.reward([], wrong, [r["answer"] for r in seeds]) == [0.0] * 4
    assert task.reward([], [r["completion"] for r in seeds], [r["answer"] for r in seeds]) == [1.0] * 4
    assert [w.split("\\boxed")[0] for w in wrong] == [r["completion"].split("\\boxed")[0] for r in seeds]
    turn = task.turn_prompt(
        seeds[0]["prompt"], seeds[0]["completion"] + "\nQuestion: junk", task.correction_instruction
    )
    assert turn == (
        f"{seeds[0]['prompt']}{seeds[0]['completion']}\n\nThere might be an error in the solution above because of "
        "lack of understanding of the question. Please correct the error, if any, and rewrite the solution. "
        "Only output the final solution!\n"
    )


def test_score_math_two_turn_warm_start_data(tmp_path):
    """experiment=score_math's warm-start data stages on local MATH files: every gold solution is
    kept, and the two-turn examples pair a wrong (or right) attempt plus SCoRe's instruction with
    the gold solution."""
    from selfimprove.engine.pipeline import Run, read_jsonl
    from selfimprove.stages.data import seed_data
    from selfimprove.stages.episodes import two_turn_seed_data

    data = write_jsonl(tmp_path / "math.jsonl", MATH_ROWS)
    train = write_jsonl(tmp_path / "train.jsonl", reworded(MATH_ROWS))
    cfg = compose_cfg(["experiment=score_math", f"dataset.train.path={train}", f"dataset.test.path={data}"])
    assert (cfg.method.name, cfg.dataset.name, cfg.model.chat_template) == ("score", "math", False)
    dataset = plain(cfg.dataset)
    with Run(tmp_path / "run", log=lambda _: None) as run:
        seeds = run.stage("warmstart/data", seed_data, dataset=dataset, hint_fraction=0.0, seed=0)
        both = run.stage(
            "warmstart/two_turn", two_turn_seed_data, seeds=seeds, dataset=dataset, fraction=1.0, seed=0
        )
    rows = read_jsonl(both.file("train.jsonl"))
    kinds = [r["meta"].get("two_turn") for r in rows]
    assert kinds.count(None) == 4 and kinds.count("fix") == 4 and kinds.count("keep") == 4
    task = tasks.load(dataset)
    for r in rows:
        if r["meta"].get("two_turn") in ("fix", "keep"):
            assert (
                r["prompt"].endswith(task.correction_instruction + "\n")
                and r["completion"].count("\\boxed") == 1
            )
            assert task.reward([], [r["completion"]], [r["answer"]]) == [1.0]
