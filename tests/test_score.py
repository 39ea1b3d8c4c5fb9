"""SCoRe and the baselines of its table end to end on a very small config (one shared warm start):
Stage I / Stage II are on-policy two-turn RL stages through TRL's GRPOTrainer, the baselines SFT on
correction traces; every variant reports the two-turn metrics, and the table's report shows each
row's last evaluation; the shaped reward by hand."""

from __future__ import annotations

import json

import pytest

from selfimprove.app import run
from selfimprove.pipeline import DONE, read_jsonl
from selfimprove.registry import ConfigError
from selfimprove.report import report
from selfimprove.tasks import load, spec
from selfimprove.training.score import shaped_reward
from tests.conftest import compose_cfg

SMALL = [
    "method=score",
    "method.warmstart.steps=30",
    "method.train.steps=3",
    "method.train.batch_size=8",
    "hardware.checkpoint_steps=2",
    "method.rl.max_completion_length=24",
    "method.traces.n=2",
    "method.traces.max_tokens=24",
    "method.sft.steps=4",
    "dataset.seed_per_level=100",
    "dataset.train_per_iteration=8",
    "dataset.test_levels=[2]",
    "dataset.test_per_level=8",
    "model.intermediate_size=128",
]
TWO_TURN = {"acc@t1/2", "acc@t2/2", "delta/2", "delta_i2c/2", "delta_c2i/2"}


def test_shaped_reward_by_hand():
    task = load(spec(compose_cfg([]).dataset))
    right, wrong = "ans 3", "ans 4"
    args = dict(prompts=["1+2:"] * 4, completions=[""] * 4, answer=["3"] * 4)
    attempts = dict(attempt1=[wrong, right, right, wrong], attempt2=[right, right, wrong, wrong])
    assert shaped_reward(task, 1, 10.0)(**args, **attempts) == [1.0, 1.0, 0.0, 0.0]
    logged = {}
    stage2 = shaped_reward(task, 2, 10.0)(**args, **attempts, log_metric=logged.__setitem__)
    assert stage2 == [11.0, 2.0, -9.0, 0.0]  # r1 + r2 + alpha (r2 - r1)
    assert logged == {"acc_t1": 0.5, "acc_t2": 0.5}


@pytest.mark.slow
def test_every_variant_end_to_end_and_the_table(tmp_path):
    rows = {
        v: run(compose_cfg([*SMALL, f"method.variant={v}", f"run_dir={tmp_path / v}"]))
        for v in ("base", "star_sft", "pair_sft", "score")
    }
    assert [r["iteration"] for r in rows["base"]] == [0]
    assert [r["iteration"] for r in rows["star_sft"]] == [0, 1]
    assert [r["iteration"] for r in rows["score"]] == [0, 1, 2]
    for variant_rows in rows.values():
        assert all(TWO_TURN <= set(r) for r in variant_rows)
    score = tmp_path / "score"
    for name in ("iter_01/stage1", "iter_02/stage2"):
        counts = json.loads((score / name / DONE).read_text())["counts"]
        assert counts["steps"] == 3
        history = json.loads((score / name / "log_history.json").read_text())
        assert all("acc_t1" in h and "acc_t2" in h for h in history if "reward" in h)
        assert all(("kl" in h) for h in history if "reward" in h), "Stage I and II keep a KL to their start"
    episodes = read_jsonl(tmp_path / "pair_sft" / "iter_01" / "traces" / "episodes.jsonl")
    assert len(episodes) == 8 * 2 and all(len(e["turns"]) == 2 for e in episodes)
    assert all(e["turns"][1]["prompt"].endswith("\nrecheck:") for e in episodes)
    shared = read_jsonl(tmp_path / "score" / "events.jsonl")
    assert [e["action"] for e in shared if e["stage"] == "warmstart/train"] == ["shared"]

    for variant in rows:  # as the sweep would have written them
        (tmp_path / variant / "overrides.yaml").write_text(f"- method.variant={variant}\n")
    text, _, _ = report(tmp_path)
    lines = {line.split("|")[1].strip(): line for line in text.splitlines() if "method.variant=" in line}
    assert set(lines) == {f"method.variant={v}" for v in rows}
    assert "–" not in lines["method.variant=base"], "the base row shows its only (warm start) evaluation"


def test_unknown_variant_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="method.variant='rl' is not allowed; use one of base, star_sft"):
        run(compose_cfg([*SMALL, "method.variant=rl", f"run_dir={tmp_path}"]))
