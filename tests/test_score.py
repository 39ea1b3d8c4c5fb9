"""SCoRe and the baselines of its table end to end on a very small config (one shared warm start):
Stage I / Stage II are on-policy two-turn RL stages through TRL's GRPOTrainer, the baselines SFT on
correction traces; every variant reports the two-turn metrics, and the table's report shows each
row's last evaluation; each turn's reward, advantage and KL weight by hand."""

from __future__ import annotations

import json

import pytest
import torch

from selfimprove.app import run
from selfimprove.engine.pipeline import DONE, read_jsonl
from selfimprove.engine.registry import ConfigError
from selfimprove.engine.report import report
from selfimprove.methods.score.two_turn_rl import (
    TokenBeta,
    first_attempt,
    token_advantages,
    turn_advantages,
    turn_rewards,
)
from selfimprove.tasks import load, spec
from tests.conftest import compose_cfg

SMALL = [
    "method=score",
    "debug=tiny",
    "hardware.checkpoint_steps=2",
    "dataset.train_per_iteration=8",
    "dataset.test_levels=[2]",
    "dataset.test_per_level=8",
]
TWO_TURN = {"acc@t1/2", "acc@t2/2", "delta/2", "delta_i2c/2", "delta_c2i/2"}


def group_advantages(task, phase, attempt1, attempt2, alpha=10.0):
    """One hand-made group of episodes -> (per-turn rewards, per-turn advantages, logged accuracies)."""
    n = len(attempt1)
    args = dict(
        prompts=["1+2:"] * n, completions=[""] * n, answer=["3"] * n, attempt1=attempt1, attempt2=attempt2
    )
    logged = {}
    turn1, turn2 = turn_rewards(task, phase, alpha)
    rewards = torch.tensor([turn1(**args, log_metric=logged.__setitem__), turn2(**args)]).T
    return rewards, turn_advantages(rewards, group=n, scale=True), logged


def test_each_turn_is_credited_its_own_reward():
    task = load(spec(compose_cfg([]).dataset))
    right, wrong = "ans 3", "ans 4"
    # wrong -> right, right -> right, right -> wrong, wrong -> wrong
    first, second = [wrong, right, right, wrong], [right, right, wrong, wrong]
    rewards, advantages, logged = group_advantages(task, 2, first, second)
    print("Stage II rewards (turn1, turn2):", rewards.tolist(), "\nadvantages:", advantages.tolist())
    assert rewards.tolist() == [[0, 11], [1, 1], [1, -10], [0, 0]]  # r1 | r2 + alpha (r2 - r1)
    assert logged == {"acc_t1": 0.5, "acc_t2": 0.5}
    assert advantages[1, 0] > 0 > advantages[0, 0], "attempt 1 is paid for being right, not for being wrong"
    assert advantages[0, 1] > advantages[1, 1] > advantages[2, 1], "attempt 2 is paid for progress"
    for other in ([wrong] * 4, [right] * 4, [right, wrong, right, wrong]):  # any second attempts
        _, again, _ = group_advantages(task, 2, first, other)
        assert torch.equal(again[:, 0], advantages[:, 0]), "attempt 1's advantage does not depend on r2"
        assert not torch.equal(again[:, 1], advantages[:, 1])

    rewards, advantages, _ = group_advantages(task, 1, first, second)
    print("Stage I rewards:", rewards.tolist(), "\nadvantages:", advantages.tolist())
    assert rewards.tolist() == [[0, 1], [0, 1], [0, 0], [0, 0]]
    assert advantages[:, 0].tolist() == [0.0] * 4, "Stage I: no reward advantage on attempt 1"
    assert advantages[:2, 1].min() > 0 > advantages[2:, 1].max()


def test_advantages_reach_each_attempts_tokens():
    # y1 (3 tokens) | instruction (2 tokens, env_mask 0) | y2 (2 tokens), and a shorter episode, padded with 1
    tool_mask = torch.tensor([[1, 1, 1, 0, 0, 1, 1], [1, 0, 0, 1, 1, 1, 1]])
    per_turn = torch.tensor([[-1.0, 2.0], [0.5, -3.0]])
    assert token_advantages(per_turn, tool_mask).tolist() == [
        [-1.0, -1.0, -1.0, 2.0, 2.0, 2.0, 2.0],
        [0.5, -3.0, -3.0, -3.0, -3.0, -3.0, -3.0],
    ]
    kl = torch.ones(2, 7)
    weights = torch.where(first_attempt(tool_mask), 0.5, 0.05)
    assert TokenBeta(0.05, weights) != 0.0, "TRL's `beta != 0` tests still see a KL"
    assert torch.equal(TokenBeta(0.05, weights) * kl, weights), "beta_2 on attempt 1, beta_1 elsewhere"


def test_stage1_kl_holds_attempt_one_with_beta2(tmp_path):
    """TRL's own loss through ScoreTrainer: with zero advantages the loss is the KL term alone, and the
    same KL costs beta_2 / beta_1 = 10 times more on attempt-1 tokens than on attempt-2 tokens."""
    from datasets import Dataset
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selfimprove.methods.score.two_turn_rl import score_trainer_class
    from selfimprove.models import build_tiny
    from selfimprove.training.grpo import grpo_config

    cfg = OmegaConf.to_container(compose_cfg(["method=score"]), resolve=True)
    build_tiny(cfg["model"], tmp_path, seed=0)
    lm, tokenizer = (cls.from_pretrained(tmp_path / "model") for cls in (AutoModelForCausalLM, AutoTokenizer))
    train = {**cfg["method"]["train"], "steps": 1, "batch_size": 2}
    rl = {**cfg["method"]["rl"], "num_generations": 2, "beta": 0.5}
    trainer = score_trainer_class(beta_first=0.5, beta=0.05)(
        model=lm,
        reward_funcs=turn_rewards(load(spec(compose_cfg([]).dataset)), 1, 10.0),
        args=grpo_config(train, rl, cfg["hardware"], tmp_path, 0),
        train_dataset=Dataset.from_list([{"prompt": "1+2:", "answer": "3"}] * 2),
        processing_class=tokenizer,
    )
    trainer.model.eval()  # no gradient-accumulation scaling: the loss is the masked KL sum
    encode = lambda text: torch.tensor([tokenizer.encode(text, add_special_tokens=False)])  # noqa: E731
    prompt, completion = encode("1+2:"), encode("ans 4\nrecheck:ans 3")
    tool_mask = torch.tensor([[1] * 5 + [0] * 9 + [1] * 5])  # y1 | instruction | y2
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            lm, torch.cat([prompt, completion], 1), torch.ones(1, 23, dtype=torch.long), completion.shape[1]
        )

    def loss(moved):  # the reference moved away from the policy on the ``moved`` tokens only
        inputs = {
            "prompt_ids": prompt,
            "prompt_mask": torch.ones_like(prompt),
            "completion_ids": completion,
            "completion_mask": torch.ones_like(completion),
            "tool_mask": tool_mask,
            "advantages": torch.zeros(1),
            "ref_per_token_logps": logps - 0.3 * moved,
            "num_items_in_batch": torch.tensor(10.0),
        }
        with torch.no_grad():
            return trainer._compute_loss(lm, inputs).item()

    first = first_attempt(tool_mask).float()
    on_first, on_second = loss(first), loss(tool_mask * (1 - first))
    assert on_second > 0
    assert on_first / on_second == pytest.approx(10.0, rel=1e-4)


@pytest.mark.slow
def test_every_variant_end_to_end_and_the_table(tmp_path):
    rows = {
        v: run(compose_cfg([*SMALL, f"method.variant={v}", f"run_dir={tmp_path / v}"]))
        for v in ("base", "star_sft", "pair_sft", "score")
    }
    assert [r["iteration"] for r in rows["base"]] == [0]
    assert [r["iteration"] for r in rows["star_sft"]] == [0, 1, 2], "STaR: rounds, Pair-SFT: one"
    assert [r["iteration"] for r in rows["pair_sft"]] == [0, 1]
    assert [r["iteration"] for r in rows["score"]] == [0, 1, 2]
    for variant_rows in rows.values():
        assert all(TWO_TURN <= set(r) for r in variant_rows)
    score = tmp_path / "score"
    for name in ("iter_01/stage1", "iter_02/stage2"):
        counts = json.loads((score / name / DONE).read_text())["counts"]
        assert counts["steps"] == 3
        history = json.loads((score / name / "log_history.json").read_text())
        assert all("acc_t1" in h and "acc_t2" in h for h in history if "reward" in h)
        assert all({"rewards/turn1/mean", "rewards/turn2/mean"} <= set(h) for h in history if "reward" in h)
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
