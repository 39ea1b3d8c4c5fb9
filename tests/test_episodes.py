"""Two-turn episodes: SCoRe's metrics on hand-made episodes (exact values), the correction format
of the arithmetic task (one slip, a wrong answer, only characters the tiny tokenizer knows) and the
two-turn warm-start data."""

from __future__ import annotations

import random

import pytest

from selfimprove.engine.pipeline import Artifact, read_jsonl, write_jsonl
from selfimprove.engine.registry import ConfigError
from selfimprove.metrics import self_correction
from selfimprove.models import CHARACTERS
from selfimprove.stages.episodes import episode_metrics, two_turn_seed_data
from selfimprove.tasks import load, spec
from selfimprove.tasks.arithmetic import rationale
from tests.conftest import compose_cfg


def episode(i: int, *rewards) -> dict:
    turns = [{"prompt": "p", "completion": "c", "reward": r, "tokens": 3, "feedback": None} for r in rewards]
    return {"id": str(i), "prompt": "p", "answer": "1", "meta": {"level": 3}, "turns": turns}


def test_self_correction_by_hand():
    # 5 problems: wrong->right, wrong->right, right->wrong, right->right, wrong->wrong
    got = self_correction([0, 0, 1, 1, 0], [1, 1, 0, 1, 0])
    assert got == {"acc@t1": 0.4, "acc@t2": 0.6, "delta": 0.2, "delta_i2c": 0.4, "delta_c2i": 0.2}
    assert self_correction([], []) == {}
    with pytest.raises(ConfigError, match="one second attempt per first"):
        self_correction([1], [1, 0])


def test_episode_metrics_first_against_last_turn_and_unjudged_skipped():
    episodes = [
        episode(0, 0.0, 1.0),  # i -> c
        episode(1, 1.0, 1.0),  # c -> c
        episode(2, 1.0, 0.0),  # c -> i
        episode(3, 0.0, 0.0),  # i -> i
        episode(4, 0.0, 0.0, 1.0),  # three turns: first wrong, last right -> i -> c
        episode(5, None, 1.0),  # the verifier could not judge attempt 1: left out
    ]
    assert episode_metrics(episodes, "/3") == {
        "acc@t1/3": 0.4,
        "acc@t2/3": 0.6,
        "delta/3": 0.2,
        "delta_i2c/3": 0.4,
        "delta_c2i/3": 0.2,
    }


@pytest.fixture
def task():
    return load(spec(compose_cfg([]).dataset))


def test_corrupted_attempt_slips_or_skips_a_column_and_is_wrong(task):
    rng = random.Random(0)
    kinds = set()
    for a, b in [(573, 885), (0, 0), (9, 9), (99, 10), (10, 90)] * 4:
        gold, wrong = rationale(a, b), task.corrupt({"meta": {"a": a, "b": b}}, rng)
        assert gold.endswith(f"ans {a + b}") and task.extract(wrong) != str(a + b)
        kind = "slip" if wrong.count(";") == gold.count(";") else "skip"
        kinds.add(kind)
        if kind == "skip":  # the scratchpad of the operands without one column: one step fewer
            assert wrong.count(";") == gold.count(";") - 1 and len(str(a)) > 1
        else:  # same steps up to the slip
            first_diff = next(i for i, (x, y) in enumerate(zip(gold, wrong)) if x != y)
            assert gold[:first_diff].count(";") == wrong[:first_diff].count(";")
    assert kinds == {"slip", "skip"}
    assert rationale(573, 885, slip=(1, 1)) == "3+5+0=08|8;57+88:7+8+0=16|68;5+8:5+8+1=14|468;ans 1468"


def test_two_turn_seed_data_formats(task, tmp_path):
    seeds_dir = tmp_path / "seeds"
    seeds_dir.mkdir()
    gold = task.seed_data()[:40]
    write_jsonl(seeds_dir / "train.jsonl", gold)
    out = tmp_path / "out"
    out.mkdir()
    counts = two_turn_seed_data(
        out, Artifact("seeds", seeds_dir, "fp"), spec(compose_cfg([]).dataset), 0.5, 0
    )
    data = read_jsonl(out / "train.jsonl")
    extra = [r for r in data if "two_turn" in r["meta"]]
    assert counts == {"examples": len(data), "two_turn": len(extra)} and len(data) == 40 + len(extra)
    assert len(extra) % 5 == 0 and 0 < len(extra) < 5 * 40
    vocab = set(CHARACTERS)
    for r in extra:
        assert set(r["prompt"] + r["completion"]) <= vocab
        kind, problem = r["meta"]["two_turn"], f"{r['meta']['a']}+{r['meta']['b']}:"
        attempt, instruction = r["prompt"][len(problem) :].rsplit("\n", 1)
        right = task.extract(attempt) == r["answer"]
        expected = {
            "fix": ("recheck:", False, r["completion"] == rationale(r["meta"]["a"], r["meta"]["b"])),
            "keep": ("recheck:", True, r["completion"] == attempt),
            "refine": ("wrong:", False, task.extract(r["completion"]) == r["answer"]),
            "verify_wrong": ("verify:", False, r["completion"] == "wrong"),
            "verify_ok": ("verify:", True, r["completion"] == "ok"),
        }[kind]
        assert r["prompt"].startswith(problem) and (instruction, right, True) == expected, r
