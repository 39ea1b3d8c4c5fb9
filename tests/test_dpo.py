"""The DPO adapter (TRL's DPOTrainer) really trains the tiny model: the log-probability margin of
the chosen over the rejected response rises; an explicit reference model is used; bad settings
are one-line errors."""

from __future__ import annotations

import random

import pytest
import torch

from selfimprove.engine.pipeline import Run, stage, write_jsonl
from selfimprove.engine.registry import ConfigError
from selfimprove.models import init_model, load_model
from selfimprove.tasks import load, spec
from selfimprove.training.dpo import dpo
from tests.conftest import compose_cfg

pytestmark = pytest.mark.slow

HARDWARE = {"device": "cpu", "dtype": "float32", "accelerate": None}
TRAIN = {
    "steps": 15,
    "batch_size": 8,
    "micro_batch_size": 8,
    "lr": 1.0e-3,
    "lr_scheduler": "constant",
    "warmup_ratio": 0.0,
    "weight_decay": 0.0,
    "max_length": 64,
    "lora": None,
    "beta": 0.1,
    "loss_type": "sigmoid",
}


@stage(name="make_pairs")
def make_pairs(out, count: int) -> dict:
    """Gold 2-digit scratchpads chosen, the same problems with one slip rejected."""
    cfg = compose_cfg(
        ["dataset.seed_levels=[2]", f"dataset.seed_per_level={count}", "dataset.few_shot_per_level=0"]
    )
    task, rng = load(spec(cfg.dataset)), random.Random(0)
    write_jsonl(
        out / "pairs.jsonl",
        [
            {
                "id": r["id"],
                "prompt": r["prompt"],
                "chosen": r["completion"],
                "rejected": task.corrupt(r, rng),
            }
            for r in task.seed_data()
        ],
    )
    return {"pairs": count}


def margin(model, pairs_path) -> float:
    """Mean over pairs of log p(chosen | prompt) - log p(rejected | prompt), summed over tokens."""
    from selfimprove.engine.pipeline import read_jsonl

    lm, tok = load_model(model, HARDWARE)

    def logp(prompt: str, completion: str) -> float:
        ids = tok(prompt + completion, return_tensors="pt", add_special_tokens=False).input_ids
        start = len(tok(prompt, add_special_tokens=False).input_ids)
        with torch.no_grad():
            logits = lm(ids).logits[0, :-1].log_softmax(-1)
        picked = logits.gather(1, ids[0, 1:, None])[:, 0]
        return picked[start - 1 :].sum().item()

    pairs = read_jsonl(pairs_path)
    return sum(logp(p["prompt"], p["chosen"]) - logp(p["prompt"], p["rejected"]) for p in pairs) / len(pairs)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    model_cfg = dict(compose_cfg(["debug=tiny"]).model)
    with Run(root, log=lambda _: None) as run:
        base = run.stage("init", init_model, model=model_cfg, seed=0)
        other = run.stage("other", init_model, model=model_cfg, seed=1)
        pairs = run.stage("pairs", make_pairs, count=32)
    return root, base, other, pairs


def test_dpo_raises_the_chosen_margin(setup):
    root, base, _, pairs = setup
    with Run(root, log=lambda _: None) as run:
        trained = run.stage("dpo", dpo, model=base, pairs=pairs, train=TRAIN, hardware=HARDWARE, seed=0)
    before, after = margin(base, pairs.file("pairs.jsonl")), margin(trained, pairs.file("pairs.jsonl"))
    assert after > before + 1.0, f"log-prob margin chosen - rejected went {before:.3f} -> {after:.3f}"
    counts = trained.done_record()["counts"]
    assert counts["steps"] == 15 and counts["pairs"] == 32
    assert counts["margin_last"] > counts["margin_first"]


def test_explicit_reference_and_its_errors(setup, tmp_path):
    root, base, other, pairs = setup
    train = {**TRAIN, "steps": 2}
    with Run(root, log=lambda _: None) as run:
        trained = run.stage(
            "dpo_ref", dpo, model=base, pairs=pairs, train=train, hardware=HARDWARE, seed=0, reference=other
        )
        assert trained.done_record()["counts"]["steps"] == 2
        assert trained.done_record()["inputs"]["reference"] == "other"
        lora = {**train, "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}}
        with pytest.raises(ConfigError, match="train.lora with a reference model"):
            run.stage(
                "dpo_lora",
                dpo,
                model=base,
                pairs=pairs,
                train=lora,
                hardware=HARDWARE,
                seed=0,
                reference=other,
            )
