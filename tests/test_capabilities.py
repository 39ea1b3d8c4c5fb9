"""Every task's capabilities, called on real records: what a task claims works, and what it does not
claim is declared in ``lacking`` with a reason (and the fix when a setting is the cause).

Tasks are built from the real config tree; GSM8K and MATH read small local jsonl files in the hub's
column layout (no hub access)."""

from __future__ import annotations

import random

import pytest

from selfimprove import tasks
from selfimprove.engine.pipeline import plain
from selfimprove.scoring.mathverify import canonical_answer
from selfimprove.tasks.arithmetic import rationale
from selfimprove.tasks.base import CAPABILITIES
from tests.conftest import compose_cfg
from tests.test_tasks import GSM8K_ROWS, MATH_ROWS, gsm8k_row, write_jsonl

# MATH-500's test layout: an answer column and the level as an int (the train split says "Level 1")
MATH_TEST_ROWS = [
    {
        "problem": "What is $10-3$?",
        "solution": "$10-3=\\boxed{7}$",
        "answer": "7",
        "subject": "Prealgebra",
        "level": 1,
        "unique_id": "test/prealgebra/1.json",
    },
    {
        "problem": "What is $5 \\cdot 5$?",
        "solution": "$\\boxed{25}$",
        "answer": "25",
        "subject": "Prealgebra",
        "level": 2,
        "unique_id": "test/prealgebra/2.json",
    },
]
# train rows: MATH_ROWS, one more level-1 problem, and a test problem leaked into the train split
MATH_TRAIN_ROWS = [
    *MATH_ROWS,
    {"problem": "What is $2+2$?", "solution": "$\\boxed{4}$", "level": "Level 1", "type": "Prealgebra"},
    {**{k: MATH_TEST_ROWS[0][k] for k in ("problem", "solution")}, "level": "Level 1", "type": "Prealgebra"},
]
GSM8K_TEST_ROWS = [gsm8k_row(20, 22), gsm8k_row(5, 5), GSM8K_ROWS[0]]  # the last also a train row

SMALL = {
    "arithmetic": ["dataset.seed_per_level=20", "dataset.train_per_iteration=8", "dataset.test_per_level=30"],
    "reversed_addition": [
        "dataset.seed_per_level=5",
        "dataset.train_per_iteration=4",
        "dataset.test_per_level=30",
    ],
    "reasoning_gym": ["dataset.seed_size=4", "dataset.train_per_iteration=4", "dataset.test_size=20"],
    "countdown": ["dataset.seed_size=4", "dataset.train_per_iteration=4", "dataset.test_size=10"],
    "humaneval": ["dataset.train_size=4", "dataset.test_size=2"],
}
NAMES = ["arithmetic", "reversed_addition", "gsm8k", "math", "reasoning_gym", "countdown", "humaneval"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Every task (name -> (task, its dataset config)), built once for the module."""
    root = tmp_path_factory.mktemp("data")
    files = {
        "gsm8k": (
            write_jsonl(root / "g_train.jsonl", GSM8K_ROWS),
            write_jsonl(root / "g_test.jsonl", GSM8K_TEST_ROWS),
        ),
        "math": (
            write_jsonl(root / "m_train.jsonl", MATH_TRAIN_ROWS),
            write_jsonl(root / "m_test.jsonl", MATH_TEST_ROWS),
        ),
    }
    overrides = {
        **SMALL,
        "gsm8k": ["dataset.seed_size=2", "dataset.train_per_iteration=2"],
        "math": ["dataset.seed_size=3", "dataset.train_per_iteration=2"],
    }
    for name, (train, test) in files.items():
        overrides[name] += [f"dataset.train.path={train}", f"dataset.test.path={test}"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        out = {}
        for name in NAMES:
            cfg = plain(compose_cfg([f"dataset={name}", *overrides[name]]).dataset)
            out[name] = (tasks.load(cfg), cfg)
        yield out


def score(task, records: list[dict], completions: list[str]) -> list[float | None]:
    """The task's own reward, given the records' columns as TRL passes them."""
    return task.reward(
        [r["prompt"] for r in records],
        completions,
        [r["answer"] for r in records],
        meta=[r["meta"] for r in records],
    )


def gold_completion(task, record: dict) -> str:
    """A right completion for any record, gold or not: the task's own format with the answer."""
    if "completion" in record:
        return record["completion"]
    name = task.cfg["name"]
    if name == "arithmetic":
        return rationale(record["meta"]["a"], record["meta"]["b"])
    if name == "reasoning_gym":
        return f"<answer>{record['answer']}</answer>"
    if name in ("gsm8k", "math"):
        return f"So the final answer is \\boxed{{{record['answer']}}}."
    return record["answer"]


def extracted(task, answer: str) -> str | None:
    """What ``extract`` gives for a completion with this reference answer (math: canonical)."""
    return canonical_answer(answer) if task.cfg["name"] in ("gsm8k", "math") else str(answer)


def test_test_records_have_every_column_the_reward_needs(built):
    """Every task scores records when their columns are passed (reasoning-gym needs ``meta``)."""
    for name, (task, _) in built.items():
        if name == "humaneval":
            continue  # its reward is exercised once, in the humaneval test below (sandbox calls)
        records = [r for rs in task.test_sets().values() for r in rs][:2]
        assert score(task, records, [gold_completion(task, r) for r in records]) == [1.0] * len(records), name


@pytest.mark.parametrize("name", NAMES)
def test_capabilities_not_claimed_are_declared_with_a_reason(built, name):
    task, cfg = built[name]
    lacking = type(task).lacking(cfg)
    assert set(lacking) <= set(CAPABILITIES) and set(task.capabilities) <= set(CAPABILITIES)
    assert set(lacking) == set(CAPABILITIES) - task.capabilities, "default settings remove nothing"
    assert all(isinstance(why, str) and why.strip() for why in lacking.values())


def test_only_arithmetic_checks_steps_and_only_reversed_addition_pairs_labels():
    classes = {n: tasks.TASKS.get(n) for n in tasks.TASKS.names()}
    owners = {c: {n for n, t in classes.items() if c in t.capabilities} for c in CAPABILITIES}
    assert owners["step_checker"] == {"arithmetic"} and owners["label_pairs"] == {"reversed_addition"}


@pytest.mark.parametrize("name", [n for n in NAMES if n != "humaneval"])
def test_demonstrations_are_gold(built, name):
    task = built[name][0]
    assert "demonstrations" in task.capabilities
    seeds = task.seed_data()
    assert seeds and all(r["completion"] for r in seeds)
    assert score(task, seeds, [r["completion"] for r in seeds]) == [1.0] * len(seeds)


@pytest.mark.parametrize("name", NAMES)
def test_train_prompts_are_unlabelled(built, name):
    task = built[name][0]
    assert "train_prompts" in task.capabilities
    prompts = task.train_prompts(1)
    assert prompts and all("completion" not in r and r["prompt"] for r in prompts)


@pytest.mark.parametrize("name", [n for n in NAMES if n != "humaneval"])
def test_extract_reads_the_gold_answer_and_none_without_one(built, name):
    task = built[name][0]
    for rec in task.seed_data()[:3]:
        assert task.extract(rec["completion"]) == extracted(task, rec["answer"]) is not None
        assert task.final(rec["completion"]) == task.extract(rec["completion"])
    assert task.extract("no answer here") is None


def test_extract_agrees_on_equivalent_answers(built):
    for name in ("gsm8k", "math"):
        task = built[name][0]
        assert task.extract("so \\boxed{0.5}") == task.extract("It is $\\boxed{\\frac{1}{2}}$.") == "1/2"
        assert task.extract("\\boxed{\\frac{2}{4}}") == canonical_answer("\\frac{1}{2}")
        assert task.extract("so \\boxed{15.0}") == task.extract("The final answer is \\boxed{15}.") == "15"
        assert task.extract("\\boxed{1,234}") == task.extract("\\boxed{1234}")
        assert task.extract("\\boxed{(1, 2)}") == task.extract("\\boxed{(1,2)}") == canonical_answer("(1,2)")
        assert task.extract("\\boxed{16}") != task.extract("\\boxed{15}")
    gym, rev = built["reasoning_gym"][0], built["reversed_addition"][0]
    assert gym.extract("think <answer> 42 </answer> junk") == gym.extract("<answer>42</answer>") == "42"
    assert rev.extract(" 8541\n") == "8541" and rev.extract("85a1") is None and rev.extract("") is None


@pytest.mark.parametrize("name", [n for n in NAMES if n != "humaneval"])
def test_hint_prompts_carry_the_answer_after_the_prompt(built, name):
    task = built[name][0]
    for rec in task.train_prompts(1)[:3]:
        hint = task.hint_prompt(rec)
        assert hint.startswith(rec["prompt"][:-1]) and rec["answer"] in hint and hint != rec["prompt"]
    rev = built["reversed_addition"][0]
    assert rev.hint_prompt({"prompt": "375+588=", "answer": "8541"}) == "375+588|8541="


@pytest.mark.parametrize("name", [n for n in NAMES if n != "humaneval"])
def test_corrupted_attempts_score_below_gold(built, name):
    task = built[name][0]
    rng = random.Random(0)
    for rec in task.seed_data()[:4]:
        wrong = [task.corrupt(rec, rng) for _ in range(3)]
        assert score(task, [rec] * 4, [rec["completion"], *wrong])[0] == 1.0
        assert all(s < 1.0 for s in score(task, [rec] * 3, wrong)), (rec["answer"], wrong)


def test_reasoning_gym_corrupt_falls_back_to_an_empty_answer_when_perturbing_fails(built, monkeypatch):
    task = built["countdown"][0]
    rec = task.seed_data()[0]
    monkeypatch.setattr("selfimprove.tasks.gym.perturbed", lambda answer, rng: answer)  # always right
    assert task.corrupt(rec, random.Random(0)) == "<answer></answer>"


@pytest.mark.parametrize("name", [n for n in NAMES if n != "humaneval"])
def test_similar_problems_are_new_answered_and_not_held_out(built, name):
    task = built[name][0]
    test = [r for rs in task.test_sets().values() for r in rs]
    held_out = {r["prompt"] for r in test}
    rec = max(test, key=lambda r: str(r["meta"]["level"]))
    count = 2 if name in ("gsm8k", "math") else 3
    similar = task.similar(rec, count, seed=0)
    assert len(similar) == count and similar == task.similar(rec, count, seed=0)
    assert not {r["prompt"] for r in similar} & (held_out | {rec["prompt"]})
    assert len({r["prompt"] for r in similar}) == count
    assert all(r["meta"]["level"] == rec["meta"]["level"] for r in similar)
    assert score(task, similar, [gold_completion(task, r) for r in similar]) == [1.0] * count


def problem(name: str, record: dict):
    """What makes two records one problem: a+b and b+a for the addition tasks, else the prompt."""
    if name in ("arithmetic", "reversed_addition"):
        a, b = record["meta"]["a"], record["meta"]["b"]
        return min(a, b), max(a, b)
    return record["prompt"]


def assert_held_out(name: str, task) -> None:
    """No seed demonstration, train prompt (three iterations) or similar problem is a test problem
    (nor, for addition, its b+a twin), at any level."""
    test = [r for rs in task.test_sets().values() for r in rs]
    trained = task.seed_data() + [r for i in range(3) for r in task.train_prompts(i)]
    if "similar" in task.capabilities:
        trained += [s for rec in test[:: max(1, len(test) // 8)] for s in task.similar(rec, 3, seed=0)]
    assert test and trained, "nothing to compare"
    held_out = {problem(name, r) for r in test}
    leaked = [r["prompt"] for r in trained if problem(name, r) in held_out]
    assert not leaked, f"{len(leaked)} training problems are test problems: {leaked[:5]}"


@pytest.mark.parametrize("name", NAMES)
def test_no_test_problem_is_ever_trained_on(built, name):
    """Every task with a train and a test split (the local GSM8K/MATH files leak one test question
    into the train split: it must be left out)."""
    assert_held_out(name, built[name][0])


@pytest.mark.parametrize("name", ["arithmetic", "reversed_addition"])
def test_addition_test_sets_are_held_out_with_their_twins_at_the_default_sizes(name):
    """At the default sizes (the demo's 1000 seeds per level), where 1-digit addition has only 100
    problems: the test set takes at most half of a level's problems, and no twin is trained on."""
    task = tasks.load(plain(compose_cfg([f"dataset={name}"]).dataset))
    assert_held_out(name, task)
    sizes = {level: len(records) for level, records in task.test_sets().items()}
    assert sizes["1"] == 27 and sizes["2"] == 200  # 55 distinct 1-digit problems (a+b = b+a)


def test_math_similar_prefers_the_test_records_level_across_level_spellings(built):
    """MATH-500 says level 1, MATH-lighteval's train split "Level 1": both are level 1."""
    task = built["math"][0]
    rec = next(r for r in task.test_sets()["1"] if r["answer"] == "7")
    similar = task.similar(rec, 2, seed=3)
    assert {task.rows("train")[r["meta"]["index"]]["level"] for r in similar} == {"Level 1"}
    everything = task.similar(rec, 10, seed=3)  # every train problem but the leaked test one
    assert len(everything) == len(MATH_TRAIN_ROWS) - 1
    assert all(MATH_TEST_ROWS[0]["problem"] not in r["prompt"] for r in everything)
    levels = [task.rows("train")[r["meta"]["index"]]["level"] for r in everything]
    assert levels[:3] == ["Level 1"] * 3 and "Level 1" not in levels[3:]  # the record's group first


def test_arithmetic_step_checker_finds_the_first_wrong_step(built):
    task = built["arithmetic"][0]
    rng = random.Random(1)
    for rec in task.seed_data()[-4:]:
        gold = rec["completion"]
        assert task.steps(gold) and task.first_error(rec, gold) is None
        assert task.first_error(rec, task.corrupt(rec, rng)) is not None


def test_reversed_addition_train_prompts_come_as_label_pairs(built):
    task = built["reversed_addition"][0]
    by_pair: dict[int, list[dict]] = {}
    for r in task.train_prompts(1):
        by_pair.setdefault(r["meta"]["pair"], []).append(r)
    for first, second in by_pair.values():
        assert (first["meta"]["a"], first["meta"]["b"]) == (second["meta"]["b"], second["meta"]["a"])
        assert (first["meta"]["swapped"], second["meta"]["swapped"]) == (False, True)
        assert first["answer"] == second["answer"]


def test_humaneval_has_train_prompts_only_with_train_size(built):
    task, cfg = built["humaneval"]
    assert "train_prompts" not in type(task).lacking(cfg) and len(task.train_prompts(1)) == 4
    fix = type(task).lacking({**cfg, "train_size": 0})["train_prompts"]
    assert "dataset.train_size=0" in fix and "set dataset.train_size=N" in fix
    assert tasks.load({**cfg, "train_size": 0}).train_prompts(1) == []
    for call in (lambda: task.extract("x"), lambda: task.hint_prompt({}), lambda: task.similar({}, 1, 0)):
        with pytest.raises(NotImplementedError):
            call()
    assert task.final("    return 1\ndef junk(): pass") == "    return 1"
    rec = task.test_sets()["humaneval"][0]
    canonical = task._problems[rec["id"]]["canonical_solution"]
    assert score(task, [rec, rec], [canonical, ""]) == [1.0, 0.0]


def test_settings_that_remove_demonstrations_say_so(built):
    _, gsm8k_cfg = built["gsm8k"]
    no_solutions = {**gsm8k_cfg, "solution_key": None, "answer_key": "answer"}
    why = tasks.TASKS.get("gsm8k").lacking(no_solutions)["demonstrations"]
    assert "dataset.solution_key is null" in why and tasks.load(no_solutions).seed_data() == []
    _, gym_cfg = built["reasoning_gym"]
    why = tasks.TASKS.get("reasoning_gym").lacking({**gym_cfg, "seed_size": 0})["demonstrations"]
    assert "dataset.seed_size=0" in why and tasks.load({**gym_cfg, "seed_size": 0}).seed_data() == []
    _, rev_cfg = built["reversed_addition"]
    assert "demonstrations" in tasks.TASKS.get("reversed_addition").lacking({**rev_cfg, "seed_per_level": 0})


def test_two_turn_prompts_fit_each_task(built):
    """Feedback is one short word everywhere; natural-language tasks put a sentence on its own
    paragraph after the attempt; arithmetic keeps its character-model layout."""
    for name, (task, _) in built.items():
        assert task.feedback_ok == "ok" and task.feedback_wrong == "wrong", name
    arithmetic = built["arithmetic"][0]
    assert arithmetic.turn_prompt("1+2:", "ans 3;junk", "recheck") == "1+2:ans 3\nrecheck:"
    for name in ("gsm8k", "math", "reasoning_gym", "humaneval"):
        task = built[name][0]
        turn = task.turn_prompt("P", "A", task.correction_instruction)
        assert turn == f"PA\n\n{task.correction_instruction}\n" and len(task.correction_instruction) > 40
        assert "ok" in task.verify_instruction and "wrong" in task.verify_instruction
    assert "Python program" in built["humaneval"][0].correction_instruction
    assert "<answer></answer>" in built["reasoning_gym"][0].correction_instruction


def test_the_docs_capability_table_is_the_code():
    """docs/tasks.md's task x capability table says exactly what each task class claims."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "tasks.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| task | demonstrations"))
    columns = [c.strip() for c in header.strip("|").split("|")][1:]
    assert columns == list(CAPABILITIES)
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == len(columns) + 1 and set(cells[1:]) <= {"✓", "–"}:
            rows[cells[0].split(" ")[0]] = {c for c, v in zip(columns, cells[1:]) if v == "✓"}
    assert rows == {n: set(tasks.TASKS.get(n).capabilities) for n in tasks.TASKS.names()}
