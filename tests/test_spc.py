"""SPC: the arithmetic step checker on hand-made solutions (exact first-error indices), the game's
reward assignment, the plan-time refusal of a task without a step checker; then SPC end to end on a
very small config (a real tiny model warm-started, playing and trained), and a run SIGKILLed in the
middle of round 2: the same command finishes it without recomputing any finished stage; and one round
with method.update_rule=offline_rl from the same warm start and game (its loss and data:
tests/test_spc_offline_rl.py)."""

from __future__ import annotations

import json
import random

import pytest

from selfimprove.app import plan, run
from selfimprove.engine.pipeline import DONE, Artifact, read_jsonl, write_jsonl
from selfimprove.engine.registry import ConfigError
from selfimprove.methods.spc.selfplay import UNPARSEABLE, game_data, outcome, parse_verdict
from selfimprove.tasks import load
from selfimprove.tasks.arithmetic import WRONG_STEP_KINDS, first_error, rationale, steps, wrong_step
from tests.conftest import compose_cfg, kill_when, selfimprove

GOLD = "3+5+0=08|8;57+88:7+8+0=15|58;5+8:5+8+1=14|458;ans 1458"  # 573 + 885


def test_steps_split_the_scratchpad_and_drop_text_after_the_answer():
    assert steps(GOLD + ";ans 9;junk") == ["3+5+0=08|8", "57+88:7+8+0=15|58", "5+8:5+8+1=14|458", "ans 1458"]
    assert steps("") == []


@pytest.mark.parametrize(
    ("solution", "expected"),
    [
        (GOLD, None),
        (GOLD + "\nmore text", None),
        ("3+5+0=09|9;57+88:7+8+0=15|59;5+8:5+8+1=14|459;ans 1459", 0),  # a slip in the first column
        ("3+5+0=08|8;57+88:7+8+0=16|68;5+8:5+8+1=15|568;ans 1568", 1),  # a slip, the rest follows it
        ("3+5+0=08|8;57+88:7+8+1=16|68;5+8:5+8+1=15|568;ans 1568", 1),  # a wrong carry summed right
        ("3+5+0=08|8;57+88:7+8+0=15|48;5+8:5+8+1=14|448;ans 1448", 1),  # partial not the sum's digit
        ("3+5+0=08|8;57+88:7+8+0=15|58;5+8:5+8+1=14|458;ans 1459", 3),  # only the answer is wrong
        ("3+5+0=08|8;5+8:5+8+0=13|38;ans 138", 1),  # a skipped column
        ("3+5+0=08|8;57+88:7+8+0=15|58", 2),  # stops early: wrong at the missing step
        ("3+5+0=08|8;57+88:7+8+0=15|58;5+8:5+8+1=14|458;1+0:1+0+0=01|1458;ans 11458", 3),  # one too many
        ("ans 1458", 0),  # the right answer with no steps
    ],
)
def test_first_error_is_exact_on_hand_made_solutions(solution, expected):
    assert first_error(573, 885, solution) == expected


def test_every_wrong_step_kind_is_wrong_exactly_at_its_step():
    assert wrong_step(573, 885, 1, "carry", random.Random(0)) == "57+88:7+8+1=16|68"
    rng = random.Random(0)
    for a, b in [(573, 885), (99, 1), (5, 4), (100, 909)]:
        gold = steps(rationale(a, b))
        for k in range(len(gold) - 1):
            for kind in WRONG_STEP_KINDS:
                wrong = wrong_step(a, b, k, kind, rng)
                assert wrong != gold[k], (a, b, k, kind)
                assert first_error(a, b, ";".join([*gold[:k], wrong, *gold[k + 1 :]])) == k


def test_game_rewards():
    assert outcome(2, 2) == (1, -1)  # the critic names the first wrong step: it wins
    assert outcome(2, 1) == (-1, 1)  # a step too early: fooled
    assert outcome(2, 3) == (-1, 1)  # a step too late: fooled
    assert outcome(2, None) == (-1, 1)  # calls a wrong solution correct: fooled
    assert outcome(2, UNPARSEABLE) == (-1, 1)  # no verdict is a loss, never a guess
    assert outcome(None, None) == (1, -1)  # accepts a correct solution
    assert outcome(None, 0) == (-1, 1)  # rejects a correct one


def test_round_data_is_exactly_the_winning_moves(tmp_path):
    def line(i, kind, verdicts, rewards, sneaky=None):
        meta = {"rewrite": f"w{i}"}
        return {"id": str(i), "answer": "1", "kind": kind, "meta": meta, "critic_prompt": f"c{i}"} | (
            {"verdicts": verdicts, "critic_rewards": rewards}
            | ({"sneaky_prompt": f"s{i}", "sneaky_reward": sneaky} if kind == "sneaky" else {})
        )

    games = [
        line(0, "plain", ["ok", "ok", "0"], [1, 1, -1]),  # one distinct winning verdict: ok
        line(1, "plain", ["ok", "1"], [1, -1]),
        line(2, "sneaky", ["1", "ok"], [1, -1], sneaky=0.0),  # a draw: the rewrite is not kept
        line(3, "sneaky", ["ok", "0"], [-1, -1], sneaky=1.0),  # fooled the critic: the rewrite is kept
    ] + [{"id": "4", "answer": "1", "kind": "invalid", "meta": {"rewrite": "w4"}, "sneaky_reward": -1.0}]
    for name, records in {"game": games, "replay": [{"id": "r", "meta": {"role": "critic"}}]}.items():
        (tmp_path / name).mkdir()
        write_jsonl(tmp_path / name / ("games.jsonl" if name == "game" else "train.jsonl"), records)
    inputs = {k: Artifact(k, tmp_path / k, k) for k in ("game", "replay")}
    for balance, said_ok in ((False, 2), (True, 1)):  # balanced: no more ok than named steps (one)
        out = tmp_path / f"out{balance}"
        out.mkdir()
        counts = game_data(out, **inputs, roles=["critic", "sneaky"], seed=0, balance=balance)
        data = {(r["prompt"], r["completion"]) for r in read_jsonl(out / "train.jsonl") if r["id"] != "r"}
        assert {x for x in data if x[1] != "ok"} == {("c2", "1"), ("s3", "w3")}
        assert sum(x[1] == "ok" for x in data) == said_ok and counts["replayed"] == 1
    (tmp_path / "critic").mkdir()
    critic_only = game_data(tmp_path / "critic", **inputs, roles=["critic"], seed=0)
    assert critic_only["won_sneaky"] == 0 and critic_only["won_critic"] == 3


def test_verdicts_are_parsed_never_coerced():
    task = load(compose_cfg([]).dataset)
    assert [parse_verdict(task, t) for t in ["ok", " 2 ", "0", "12", "2;", "wrong", "", "ok2"]] == [
        None,
        2,
        0,
        12,
        UNPARSEABLE,
        UNPARSEABLE,
        UNPARSEABLE,
        UNPARSEABLE,
    ]


def test_task_without_step_checker_is_refused_before_anything_runs(tmp_path):
    proc = selfimprove(
        "run", "method=spc", "dataset=reversed_addition", "out_root=out", cwd=tmp_path, check=False
    )
    assert proc.returncode == 2
    assert not list(tmp_path.rglob("*")), "refused before Hydra starts the job: nothing is written"
    line = proc.stderr.strip()
    assert "\n" not in line and line.startswith(
        "error: method=spc needs the first wrong step of a solution (SPC's critic and sneaky generator) "
        "for the critic's labels and the sneaky generator's rewrites, which dataset 'reversed_addition' lacks ("
    )
    assert line.endswith("; datasets with it: arithmetic")


def test_bad_roles_and_levels_are_refused_at_plan_time(tmp_path):
    with pytest.raises(ConfigError, match="method.roles='both' is not allowed; use one of shared, separate"):
        plan(compose_cfg(["method=spc", "method.roles=both"]), tmp_path)
    with pytest.raises(ConfigError, match=r"method.bench_levels=\[5\] must be non-empty held-out levels"):
        plan(compose_cfg(["method=spc", "method.bench_levels=[5]"]), tmp_path)
    with pytest.raises(ConfigError, match=r"sneaky_kinds has unknown or no kinds \['swap'\]"):
        plan(compose_cfg(["method=spc", "method.synth.sneaky_kinds=[sum,swap]"]), tmp_path)


# -- end to end: a real tiny model warm-started on 1-digit addition, two rounds of the game -------------
SMALL = [
    "method=spc",
    "method.rounds=2",
    "method.warmstart.steps=200",
    "method.warmstart.batch_size=32",
    "method.warmstart.lr=3e-3",
    "method.train.steps=8",
    "method.train.batch_size=16",
    "method.synth.exemplar_examples=1",
    "method.bench_levels=[1]",
    "method.game_levels=null",
    "method.games=8",
    "method.critic.n=2",
    "dataset.seed_levels=[1]",
    "dataset.seed_per_level=100",
    "dataset.train_levels=[1]",
    "dataset.few_shot_per_level=0",
    "dataset.train_per_iteration=16",
    "dataset.test_levels=[1]",
    "dataset.test_per_level=16",
    "model.intermediate_size=128",
]


@pytest.fixture(scope="module")
def played(tmp_path_factory):
    root = tmp_path_factory.mktemp("spc")
    rows = run(compose_cfg([*SMALL, f"run_dir={root / 'run'}", f"store_dir={root / 'store'}"]))
    return rows, root


@pytest.mark.slow
def test_spc_end_to_end(played):
    rows, root = played
    task = load(compose_cfg(SMALL).dataset)
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert {"critic/f1", "bon/critic", "bon/majority", "bon/random", "acc/1"} <= set(rows[0])
    assert {"critic/f1", "sneaky/valid", "sneaky/success", "games"} <= set(rows[2])

    bench = read_jsonl(root / "run" / "bench" / "solutions" / "bench.jsonl")
    assert all(
        s["first_error"] == first_error(s["meta"]["a"], s["meta"]["b"], s["completion"]) for s in bench
    )
    verdicts = read_jsonl(root / "run" / "iter_02" / "critic_eval" / "verdicts.jsonl")
    wrong = [v for v in verdicts if v["first_error"] is not None]
    assert rows[2]["critic/acc_erroneous"] == round(
        sum(v["verdict"] == v["first_error"] for v in wrong) / len(wrong), 4
    )

    for it in (1, 2):
        games = read_jsonl(root / "run" / f"iter_{it:02d}" / "game" / "games.jsonl")
        shown = [g for g in games if g["kind"] != "invalid"]
        assert any(g["kind"] == "sneaky" for g in games), "the tiny model plays real games"
        assert sum(g["kind"] == "plain" for g in games) == rows[it]["games"]
        for g in games:
            a, b = g["meta"]["a"], g["meta"]["b"]
            if g["kind"] == "plain":  # a correct solution, every step right
                assert g["label"] is None and first_error(a, b, g["completion"]) is None
            if g["kind"] == "sneaky":  # a valid attempt: wrong exactly at the rewritten step, answer changed
                assert g["label"] == g["meta"]["step"] == first_error(a, b, g["completion"])
                assert task.extract(g["completion"]) != g["answer"]
                assert g["completion"].startswith(";".join(steps(g["meta"]["original"])[: g["label"]]))
        for g in shown:  # every verdict is one game with the exact rewards
            expected = [outcome(g["label"], parse_verdict(task, v))[0] for v in g["verdicts"]]
            assert g["critic_rewards"] == expected
            if g["kind"] == "sneaky":
                assert g["sneaky_reward"] == -sum(expected) / len(expected)
        data = read_jsonl(root / "run" / f"iter_{it:02d}" / "build" / "train.jsonl")
        won = {
            (r["prompt"], r["completion"])
            for r in data
            if "-critic" not in r["id"] and "-sneaky" not in r["id"]
        }
        winning = {
            (g["critic_prompt"], v)
            for g in shown
            for v, c in zip(g["verdicts"], g["critic_rewards"])
            if c > 0
        }
        winning |= {
            (g["sneaky_prompt"], g["meta"]["rewrite"]) for g in shown if g.get("sneaky_reward", 0) > 0
        }
        assert won == winning, "the round trains on exactly the winning moves (plus replay)"
    assert (root / "run" / "iter_02" / "train" / "model" / "model.safetensors").exists()


@pytest.mark.slow
def test_spc_killed_mid_round_resumes_without_recomputing(played, tmp_path):
    _, root = played  # its warm start and benchmark are shared through the store; the rounds differ (games=6)
    command = [
        "run",
        *SMALL,
        "method.games=6",
        "out_root=outputs",
        f"store_dir={root / 'store'}",
        "hardware.num_threads=1",
    ]
    kill_when(command, tmp_path, "outputs/*/iter_02/game/" + DONE)  # round 2 is under way
    (run_dir,) = (tmp_path / "outputs").iterdir()
    done_before = {str(p.parent.relative_to(run_dir)) for p in run_dir.rglob(DONE)}
    assert {"iter_01/train", "iter_02/game"} <= done_before and "iter_02/critic_eval" not in done_before
    events_before = len(read_jsonl(run_dir / "events.jsonl"))

    selfimprove(*command, cwd=tmp_path)
    again = read_jsonl(run_dir / "events.jsonl")[events_before:]
    computed = {e["stage"] for e in again if e["action"] == "computed"}
    assert computed and not computed & done_before, "no finished stage is recomputed"
    assert {e["stage"] for e in again if e["action"] == "reused"} == done_before
    assert "iter_02/critic_eval" in computed
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [0, 1, 2] and rows[2]["games"] <= 6
    assert json.loads((run_dir / "iter_02" / "train" / DONE).read_text())["counts"]["steps"] == 8


@pytest.mark.slow
def test_separate_roles_train_two_models_from_the_same_game(played, tmp_path):
    _, root = played  # round 1's game is the same as the shared run's (both roles are still M0): shared
    rows = run(
        compose_cfg(
            [
                *SMALL,
                "method.roles=separate",
                "method.rounds=1",
                f"run_dir={tmp_path}",
                f"store_dir={root / 'store'}",
            ]
        )
    )
    assert [r["iteration"] for r in rows] == [0, 1] and "critic/f1" in rows[1]
    shared = {e["stage"] for e in read_jsonl(tmp_path / "events.jsonl") if e["action"] == "shared"}
    assert {"warmstart/train", "bench/solutions", "iter_01/game"} <= shared
    for role in ("critic", "sneaky"):
        data = read_jsonl(tmp_path / "iter_01" / f"build_{role}" / "train.jsonl")
        assert data and {r["meta"]["role"] for r in data} == {role}
        assert (tmp_path / "iter_01" / f"train_{role}" / "model" / "model.safetensors").exists()
    assert not (tmp_path / "iter_01" / "train").exists()


@pytest.mark.slow
def test_offline_rl_update_rule_end_to_end(played, tmp_path):
    _, root = played  # the warm start, the benchmark and round 1's game are shared; the update is not
    rows = run(
        compose_cfg(
            [
                *SMALL,
                "method.rounds=1",
                "method.update_rule=offline_rl",
                f"run_dir={tmp_path}",
                f"store_dir={root / 'store'}",
            ]
        )
    )
    assert [r["iteration"] for r in rows] == [0, 1] and "critic/f1" in rows[1]
    events = read_jsonl(tmp_path / "events.jsonl")
    assert {"warmstart/train", "iter_01/game"} <= {e["stage"] for e in events if e["action"] == "shared"}
    assert {"iter_01/build", "iter_01/train"} <= {e["stage"] for e in events if e["action"] == "computed"}
    data = read_jsonl(tmp_path / "iter_01" / "build" / "train.jsonl")
    moves = [r for r in data if not r["sft"]]
    assert {r["reward"] for r in moves if r["meta"]["role"] == "critic"} == {1.0, -1.0}, (
        "won and lost verdicts"
    )
    assert any(r["meta"]["role"] == "sneaky" for r in moves) and any(r["sft"] for r in data)
    counts = json.loads((tmp_path / "iter_01" / "train" / DONE).read_text())["counts"]
    assert counts["game_rows"] == len(moves) and counts["steps"] == 8
    assert (tmp_path / "iter_01" / "train" / "model" / "model.safetensors").exists()
