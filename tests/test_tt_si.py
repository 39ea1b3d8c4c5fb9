"""Test-time self-improvement: the paper's relative softmax margin by hand and over a real model's
candidate answers; the LoRA adapter really trains and really resets; the method end to end (TT-SI),
and TT-D recomputes only the synthesis with the teacher."""

from __future__ import annotations

import json
import math

import pytest

from selfimprove.app import run
from selfimprove.engine.pipeline import DONE, read_jsonl
from selfimprove.methods.tt_si.testtime import (
    candidate_margins,
    fine_tune,
    lora_model,
    relative_softmax_margin,
)
from selfimprove.models import build_tiny
from tests.conftest import compose_cfg

pytestmark = pytest.mark.slow

TINY_TT = ["method=tt_si", "debug=tiny", "dataset.test_levels=[2]", "dataset.test_per_level=6"]
# debug=tiny's 30-step warm start leaves a degenerate model (every item certain, nothing solved), so
# the end-to-end run trains longer (300 small steps) and synthesises more, enough that some items are
# uncertain, some certain, and some synthesised solutions are verified
TT_ITEMS = [
    "method.warmstart.steps=300",
    "method.warmstart.batch_size=16",
    "method.synthesis.problems=4",
    "method.synthesis.solutions=8",
]


def test_relative_softmax_margin_by_hand():
    assert relative_softmax_margin([0.0, -math.log(3)]) == pytest.approx(0.5)  # p = 0.75, 0.25
    assert relative_softmax_margin([-5.0, -5.0, -9.0]) == pytest.approx(0.0)  # two equally likely
    # p ∝ e^-1, 1, 1/2, ~0: the margin is (1 - 1/2) over the sum
    margin = relative_softmax_margin([-2.0, -1.0, -1.0 - math.log(2), -50.0])
    assert margin == pytest.approx(0.5 / (1.5 + math.exp(-1)), rel=1e-9)
    assert relative_softmax_margin([-40.0]) == 1.0  # one candidate: nothing to doubt


def test_candidate_margins_score_each_distinct_answer_by_its_likeliest_completion(tmp_path):
    import torch

    from selfimprove import tasks
    from selfimprove.models import load_model

    build_tiny(dict(compose_cfg(["debug=tiny"]).model), tmp_path, seed=0)
    task = tasks.load(tasks.spec(compose_cfg([]).dataset))
    hardware = {"device": "cpu", "dtype": "float32"}
    lm, tok = load_model(tmp_path, hardware)

    def loglik(prompt: str, completion: str) -> float:
        ids = tok(prompt + completion, add_special_tokens=False)["input_ids"]
        n = len(tok(prompt, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            logp = torch.log_softmax(lm(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
        return float(sum(logp[t, ids[t + 1]] for t in range(n - 1, len(ids) - 1)))

    prompt = "12+30:"
    right, wrong, other_right = "2+0+0=02|2;ans 42", "2+0+0=02|2;ans 52", "2+0+0=02|4;ans 42"
    greedy = [
        {"id": "a", "prompt": prompt, "completion": right},
        {"id": "b", "prompt": prompt, "completion": right},
    ]
    drawn = [
        {"id": "a", "prompt": prompt, "completion": wrong},
        {
            "id": "a",
            "prompt": prompt,
            "completion": other_right,
        },  # answer 42 again: its likelier completion counts
        {"id": "b", "prompt": prompt, "completion": other_right},  # one answer only
    ]
    margins = candidate_margins(task, tmp_path, greedy, drawn, hardware)
    forty_two = max(loglik(prompt, right), loglik(prompt, other_right))
    assert margins[0] == pytest.approx(relative_softmax_margin([forty_two, loglik(prompt, wrong)]), rel=1e-4)
    assert 0.0 < margins[0] < 1.0 and margins[1] == 1.0


def test_lora_adapter_trains_then_resets(tmp_path):
    import torch

    build_tiny(dict(compose_cfg(["debug=tiny"]).model), tmp_path, seed=0)
    adapt = {"rank": 4, "alpha": 8, "target_modules": "all-linear", "lr": 1e-2, "steps": 5}
    lm, tok, initial = lora_model(tmp_path, adapt, {"device": "cpu", "dtype": "float32"})
    ids = torch.tensor([tok("12+30:2+0+0=02", add_special_tokens=False)["input_ids"]])
    lm.eval()
    with torch.no_grad():
        before = lm(input_ids=ids).logits
    examples = [{"prompt": "12+30:", "completion": "2+0+0=02|2;ans 42"}]
    fine_tune(lm, tok, {}, initial, examples, adapt)
    with torch.no_grad():
        trained = lm(input_ids=ids).logits
    fine_tune(lm, tok, {}, initial, examples, {**adapt, "steps": 0})  # reset only
    with torch.no_grad():
        reset = lm(input_ids=ids).logits
    assert not torch.allclose(before, trained, atol=1e-4), "the adapter changed the model"
    assert torch.allclose(before, reset, atol=1e-6), "resetting restores the base model"


def test_tt_si_end_to_end_and_tt_d_with_a_teacher(tmp_path):
    root = tmp_path / "run"
    rows = run(compose_cfg([*TINY_TT, *TT_ITEMS, f"run_dir={root}"]))
    assert [r["iteration"] for r in rows] == [0, 1]
    items = read_jsonl(root / "tt/uncertainty/items.jsonl")
    assert rows[1]["tt/uncertain"] == sum(r["uncertain"] for r in items) and len(items) == 6
    assert rows[1]["tt/uncertain"] > 0 and rows[1]["tt/adapted_items"] > 0, "some items are adapted"
    synthesized = read_jsonl(root / "tt/synthesize/train.jsonl")
    assert synthesized and all(r["reward"] == 1.0 for r in synthesized), (
        "verify=true keeps verified solutions only"
    )
    assert rows[1]["tt/train_samples_used"] == len(synthesized)
    answers = read_jsonl(root / "tt/adapt/answers.jsonl")
    certain = {r["id"]: r["completion"] for r in items if not r["uncertain"]}
    assert certain and all(r["completion"] == certain[r["id"]] for r in answers if r["id"] in certain)
    assert {r["id"] for r in answers} >= set(certain), "a certain item keeps its greedy answer"

    teacher = root / "warmstart" / "train"  # any model folder; here the student's own warm start
    run(compose_cfg([*TINY_TT, *TT_ITEMS, f"method.synthesis.teacher={teacher}", f"run_dir={root}"]))
    events = [json.loads(line) for line in (root / "events.jsonl").read_text().splitlines()][-6:]
    actions = {e["stage"]: e["action"] for e in events}
    assert actions["tt/uncertainty"] == "reused" and actions["tt/synthesize"] == "computed"
    marker = json.loads((root / "tt/synthesize" / DONE).read_text())
    assert marker["inputs"]["synthesis"]["teacher"] == str(teacher)
