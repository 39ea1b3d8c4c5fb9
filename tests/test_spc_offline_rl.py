"""SPC's offline-RL update rule (``method.update_rule=offline_rl``, methods/spc/offline_rl.py, the
paper's released code): the loss on hand-made tensors (each outcome's gradient sign, the clip, the
NLL term); a real tiny model trained on hand-made rows (+1 moves' log-probs rise, -1 moves' fall,
replayed rows rise); a round's data hold every move with its outcome, won and lost, and the replay;
the plan-time refusals; the default's fingerprints unchanged. The shrunk SPC run with offline_rl end
to end is in tests/test_spc.py (test_offline_rl_update_rule_end_to_end), where it shares the warm
start and round 1's game of that module's run instead of training its own."""

from __future__ import annotations

import json
import math

import pytest
import torch

from selfimprove.app import plan
from selfimprove.engine.pipeline import Artifact, Run, read_jsonl, stage, write_jsonl
from selfimprove.engine.registry import ConfigError
from selfimprove.methods.spc.offline_rl import offline_rl, offline_rl_loss
from selfimprove.methods.spc.selfplay import game_rl_data, sneaky_prompt
from selfimprove.models import init_model, load_model
from selfimprove.tasks import load, spec
from tests.conftest import compose_cfg
from tests.test_fingerprints import SAVED, fingerprints

RL = {"kl_coeff": 0.1, "sft_coeff": 0.15, "clip": 0.2}  # the released code's (conf/method/spc.yaml)


def loss_and_grad(logprob, ref, reward, sft, **rl):
    lp = torch.tensor(logprob, requires_grad=True)
    loss, stats = offline_rl_loss(
        lp, torch.tensor(ref), torch.tensor(reward), torch.tensor(sft), **{**RL, **rl}
    )
    loss.backward()
    return loss.item(), lp.grad.tolist(), stats


def test_loss_on_a_hand_made_batch_sign_clip_and_nll():
    approx = pytest.approx
    # at the reference (ratio 1) d loss / d logprob = -(reward - kl_coeff) / game rows: a won move is
    # pushed up, a lost one down (a little harder: the KL term is not detached, as in SPAG's code)
    loss, grad, _ = loss_and_grad([-1.0, -1.0], [-1.0, -1.0], [1.0, -1.0], [0.0, 0.0])
    assert loss == approx(0.0) and grad == approx([-0.9 / 2, 1.1 / 2])

    # the clip: a won move whose ratio rose to 1.5 and a lost one whose ratio fell to 0.5 are past the
    # range; min() picks the clipped term, so only the KL inside the advantage still moves them
    up, down = math.log(1.5), math.log(0.5)
    loss, grad, stats = loss_and_grad([up, down], [0.0, 0.0], [1.0, -1.0], [0.0, 0.0])
    a_up, a_down = 1 - 0.1 * up, -1 - 0.1 * down
    assert loss == approx(-(a_up * 1.2 + a_down * 0.8) / 2)
    assert grad == approx([0.1 * 1.2 / 2, 0.1 * 0.8 / 2]) and stats["ratio_outside"] == 1.0
    # without the KL a clipped row has no gradient; inside the range the gradient is -reward * ratio;
    # a lost move whose ratio rose (1.5) is not clipped (PPO's pessimistic bound): it is pushed down
    _, grad, stats = loss_and_grad(
        [up, math.log(1.1), up], [0.0] * 3, [1.0, 1.0, -1.0], [0.0] * 3, kl_coeff=0.0
    )
    assert grad == approx([0.0, -1.1 / 3, 1.5 / 3]) and stats["ratio_outside"] == approx(2 / 3)

    # the replayed rows: sft_coeff x their mean NLL, whatever their reward; the game rows' mean apart
    loss, grad, stats = loss_and_grad(
        [-2.0, -1.0, -3.0], [-1.0, -1.0, -3.0], [5.0, 1.0, -7.0], [1.0, 0.0, 1.0]
    )
    assert stats["nll"] == approx(2.5) and loss == approx(-1.0 + 0.15 * 2.5)
    assert grad == approx([-0.15 / 2, -0.9, -0.15 / 2])
    loss, grad, _ = loss_and_grad([-2.0], [-1.0], [1.0], [1.0])  # a batch of replay only: the NLL alone
    assert loss == approx(0.15 * 2.0) and grad == approx([-0.15])


# -- a real tiny model trained by the stage on hand-made rows ---------------------------------------
HARDWARE = {"device": "cpu", "dtype": "float32", "accelerate": None}
TRAIN = {
    "steps": 10,
    "batch_size": 12,
    "micro_batch_size": 12,
    "lr": 1e-3,
    "lr_scheduler": "constant",
    "warmup_ratio": 0.0,
    "weight_decay": 0.0,
    "max_length": 64,
    "lora": None,
}


@stage(name="hand_made_moves")
def hand_made_moves(out, count: int) -> dict:
    """2-digit problems in three groups: the gold scratchpad won (+1), the scratchpad reversed lost
    (-1), the gold scratchpad replayed (sft)."""
    cfg = compose_cfg(
        ["dataset.seed_levels=[2]", f"dataset.seed_per_level={count}", "dataset.few_shot_per_level=0"]
    )
    rows = []
    for i, r in enumerate(load(spec(cfg.dataset)).seed_data()):
        group = ("won", "lost", "replay")[i % 3]
        completion = r["completion"][::-1] if group == "lost" else r["completion"]
        reward = -1.0 if group == "lost" else 1.0
        rows.append(
            {
                **r,
                "completion": completion,
                "meta": {"group": group},
                "reward": reward,
                "sft": group == "replay",
            }
        )
    write_jsonl(out / "train.jsonl", rows)
    return {"rows": len(rows)}


def mean_logprobs(model: Artifact, rows: list[dict]) -> dict[str, float]:
    """Per group, the mean over rows of the completion's mean token log-prob (computed here, not by
    the module under test)."""
    lm, tok = load_model(model, HARDWARE)
    groups: dict[str, list[float]] = {}
    for r in rows:
        ids = tok(r["prompt"] + r["completion"], return_tensors="pt", add_special_tokens=False).input_ids
        start = len(tok(r["prompt"], add_special_tokens=False).input_ids)
        with torch.no_grad():
            token = lm(ids).logits[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0]
        groups.setdefault(r["meta"]["group"], []).append(token[start - 1 :].mean().item())
    return {g: sum(v) / len(v) for g, v in groups.items()}


@pytest.mark.slow
def test_offline_rl_raises_won_moves_and_lowers_lost_ones(tmp_path):
    model_cfg = dict(compose_cfg(["debug=tiny"]).model)
    with Run(tmp_path, log=lambda _: None) as pipeline:
        base = pipeline.stage("init", init_model, model=model_cfg, seed=0)
        moves = pipeline.stage("moves", hand_made_moves, count=24)
        trained = pipeline.stage(
            "rl", offline_rl, model=base, data=moves, train=TRAIN, rl=RL, hardware=HARDWARE, seed=0
        )
    rows = read_jsonl(moves.file("train.jsonl"))
    before, after = mean_logprobs(base, rows), mean_logprobs(trained, rows)
    assert after["won"] > before["won"] + 0.2, (before, after)
    assert after["lost"] < before["lost"] - 0.2, (before, after)
    assert after["replay"] > before["replay"] + 0.2, (before, after)
    counts = trained.done_record()["counts"]
    assert counts["steps"] == 10 and counts["examples"] == 24 and counts["game_rows"] == 16
    logged = [
        h for h in json.loads((trained.path / "log_history.json").read_text()) if "rl/ratio_outside" in h
    ]
    assert logged and max(h["rl/ratio_outside"] for h in logged) > 0, (
        "the ratio left the clip range in training"
    )


# -- a round's data ---------------------------------------------------------------------------------
def test_round_data_hold_every_move_with_its_outcome(tmp_path):
    dataset = spec(compose_cfg([]).dataset)
    task = load(dataset)

    def line(i, kind, verdicts=(), rewards=(), sneaky=None):
        meta = {"rewrite": f"w{i}", "step": 1, "original": f"gold{i}"}
        out = {
            "id": str(i),
            "prompt": f"p{i}",
            "answer": "1",
            "kind": kind,
            "meta": meta,
            "critic_prompt": f"c{i}",
        }
        out |= {"verdicts": list(verdicts), "critic_rewards": list(rewards)} if kind != "invalid" else {}
        return out | ({"sneaky_reward": sneaky} if kind != "plain" else {})

    games = [
        line(0, "plain", ["ok", "ok", "0"], [1, 1, -1]),  # both "ok"s are kept: two samples of the policy
        line(1, "sneaky", ["1", "ok"], [1, -1], sneaky=0.0),  # a draw: the rewrite's reward is 0
        line(2, "sneaky", ["ok", "x"], [-1, -1], sneaky=1.0),  # fooled the critic (x: unparseable, a loss)
        line(3, "invalid", sneaky=-1.0),  # the step was not wrong: a lost move, not dropped
    ]
    replay = [
        {"id": f"r{i}", "prompt": "q", "completion": "a", "meta": {"role": role}}
        for i, role in enumerate(["critic", "sneaky", "solver"])
    ]
    for name, records in {"game": games, "replay": replay}.items():
        (tmp_path / name).mkdir()
        write_jsonl(tmp_path / name / ("games.jsonl" if name == "game" else "train.jsonl"), records)
    inputs = {k: Artifact(k, tmp_path / k, k) for k in ("game", "replay")}

    (tmp_path / "both").mkdir()
    counts = game_rl_data(tmp_path / "both", **inputs, roles=["critic", "sneaky"], dataset=dataset, seed=0)
    data = read_jsonl(tmp_path / "both" / "train.jsonl")
    moves = sorted(
        (r["meta"]["role"], r["prompt"], r["completion"], r["reward"]) for r in data if not r["sft"]
    )
    sneaky = lambda i: sneaky_prompt(task, {"prompt": f"p{i}"}, f"gold{i}", 1)  # noqa: E731
    assert moves == sorted(
        [
            ("critic", "c0", "ok", 1.0),
            ("critic", "c0", "ok", 1.0),
            ("critic", "c0", "0", -1.0),
            ("critic", "c1", "1", 1.0),
            ("critic", "c1", "ok", -1.0),
            ("critic", "c2", "ok", -1.0),
            ("critic", "c2", "x", -1.0),
            ("sneaky", sneaky(1), "w1", 0.0),
            ("sneaky", sneaky(2), "w2", 1.0),
            ("sneaky", sneaky(3), "w3", -1.0),
        ]
    )
    assert {r["id"] for r in data if r["sft"]} == {"r0", "r1"}, "the roles' replay, marked for the NLL term"
    assert counts == {
        "critic_won": 3,
        "critic_lost": 4,
        "sneaky_won": 1,
        "sneaky_lost": 2,
        "replayed": 2,
        "examples": 12,
    }
    (tmp_path / "critic").mkdir()
    critic = game_rl_data(tmp_path / "critic", **inputs, roles=["critic"], dataset=dataset, seed=0)
    assert critic["sneaky_won"] == critic["sneaky_lost"] == 0 and critic["replayed"] == 1


# -- the plan: refusals, fingerprints ---------------------------------------------------------------
OFFLINE_RL = ["method=spc", "method.update_rule=offline_rl"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["method.balance_critic=true"],
            "method.balance_critic=true subsamples the winning verdicts of update_rule=sft",
        ),
        (["method.offline_rl.clip=1.5"], r"method.offline_rl: clip=1.5 must be in \(0, 1\)"),
        (["method.offline_rl.kl_coeff=-1"], "kl_coeff=-1.0 and sft_coeff=0.15 must be >= 0"),
        (["hardware.accelerate=fsdp"], "keeps a whole frozen copy of the model as its reference, which fsdp"),
    ],
)
def test_combinations_that_cannot_work_are_refused_at_plan_time(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message) as refused:
        plan(compose_cfg([*OFFLINE_RL, *overrides]), tmp_path / "run")
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "run").exists(), "refused before anything is written"


def test_default_fingerprints_are_unchanged_and_offline_rl_forks_at_the_first_update(tmp_path):
    saved = json.loads(SAVED.read_text())["spc debug=tiny"]
    tiny = ["method=spc", "debug=tiny", "dataset=arithmetic"]
    assert fingerprints([*tiny, "method.update_rule=sft"], tmp_path / "sft") == saved
    rl = fingerprints([*tiny, "method.update_rule=offline_rl"], tmp_path / "rl")
    changed = sorted(name for name in saved if rl[name] != saved[name])
    assert changed == ["iter_01/build", "iter_01/critic_eval", "iter_01/train"], changed
