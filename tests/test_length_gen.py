"""Length generalisation by self-improvement, end to end at toy size: a short-to-long warm start,
one round of self-labelling one digit longer, and the length + b+a vote filter on the real labels."""

from __future__ import annotations

import json

import pytest

from selfimprove import tasks
from selfimprove.engine.pipeline import Artifact, plain, read_jsonl, write_jsonl
from selfimprove.methods.length_gen import self_labels
from tests.conftest import compose_cfg, selfimprove


def test_one_round_labels_longer_problems_and_keeps_only_labels_that_pass_the_vote(tmp_path):
    run = tmp_path / "run"
    selfimprove(
        "run",
        "experiment=length_gen",
        "model.num_layers=1",
        "model.intermediate_size=128",
        "model.bos=true",
        "dataset.seed_levels=[1,2]",
        "dataset.seed_per_level=64",
        "dataset.train_per_iteration=48",
        "dataset.test_levels=[1,2,3]",
        "dataset.test_per_level=8",
        "method.rounds=2",
        "method.advance_at=1.0",
        "method.replay_min=100",
        "method.curriculum={digits:1,steps:6}",
        "method.warmstart.steps=12",
        "method.warmstart.batch_size=16",
        # Lee et al.'s schedules (the method's default): warmup-stable-decay from scratch, each
        # round decayed to a floor; here the floors are raised to be told apart
        "method.warmstart.lr_scheduler_kwargs={num_decay_steps:6,min_lr_ratio:0.1}",
        "method.train.steps=4",
        "method.train.batch_size=16",
        "method.train.lr_scheduler_kwargs={min_lr_rate:0.5}",
        f"run_dir={run}",
        cwd=tmp_path,
    )
    # short to long: the first warm-start stage saw only 1-digit problems, then all seed levels
    short = read_jsonl(run / "warmstart" / "short_data" / "train.jsonl")
    assert {r["meta"]["level"] for r in short} == {1} and len(short) == 64
    assert {r["meta"]["level"] for r in read_jsonl(run / "warmstart" / "data" / "train.jsonl")} == {1, 2}

    # round 1 labels 3-digit problems, each asked as a+b and b+a
    labels = read_jsonl(run / "iter_01" / "label" / "samples.jsonl")
    assert len(labels) == 2 * 48 and {r["meta"]["level"] for r in labels} == {3}
    by_pair = {(r["meta"]["pair"], r["meta"]["swapped"]): r["completion"].strip() for r in labels}
    passing = {
        pair
        for (pair, swapped), label in by_pair.items()
        if not swapped and label.isdigit() and len(label) in (3, 4) and by_pair[(pair, True)] == label
    }
    data = read_jsonl(run / "iter_01" / "filter" / "train.jsonl")
    kept = [r for r in data if r["meta"].get("pair") is not None]
    assert {r["meta"]["pair"] for r in kept} == passing, "exactly the labels that pass length + vote"
    for r in kept:
        assert r["completion"] == by_pair[(r["meta"]["pair"], False)], "both orders carry the a+b label"
    gold = [r for r in data if r["meta"].get("pair") is None]
    assert len(gold) == max(len(kept), 100) and all(r["completion"] == r["answer"] for r in gold)

    # the experiment's NoPE flag survives TRL's save of every trained model (load_model zeroes on it)
    trained = json.loads((run / "iter_01" / "train" / "model" / "config.json").read_text())
    assert trained.get("nope") is True

    # the schedulers got their keyword arguments (TRL logs the learning rate of every step here)
    def rates(stage: str) -> list[float]:
        history = json.loads((run / stage / "log_history.json").read_text())
        return [h["learning_rate"] for h in history if "learning_rate" in h]

    cfg = compose_cfg(["experiment=length_gen"])
    peak = cfg.method.warmstart.lr
    warm = rates("warmstart/train")
    # 10 % warmup (2 steps), stable at the peak, the last 6 steps decayed
    assert len(warm) == 12 and warm[:2] != [peak] * 2 and warm[2:6] == [peak] * 4, warm
    assert 0.1 * peak <= warm[-1] < 0.5 * peak, "then decayed towards 10 % of the peak"
    round_rates = rates("iter_01/train")
    assert len(round_rates) == 4 and min(round_rates) >= 0.5 * round_rates[0] - 1e-12, "floor at 50 %"

    # AdamW's moments are carried from stage to stage (Lee et al. resume the optimizer): the short
    # warm start (6 steps), the warm start (12), round 1 (4) and round 2 (4) count on one state
    import torch

    steps = [
        {int(s["step"]) for s in torch.load(run / stage / "model" / "optimizer.pt")["state"].values()}
        for stage in ("warmstart/short", "warmstart/train", "iter_01/train", "iter_02/train")
    ]
    assert steps == [{6}, {18}, {22}, {26}]

    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert {"acc/1", "acc/3", "kept", "label_accuracy", "agreement"} <= set(rows[1])
    assert rows[1]["agreement"] == round(len(passing) / 48, 4), "pairs whose labels pass the vote"

    # advance_at=1.0: round 2 labels 4 digits only if every round-1 pair agreed, else 3 digits again
    again = read_jsonl(run / "iter_02" / "label" / "samples.jsonl")
    expected = 4 if rows[1]["agreement"] >= 1.0 else 3
    assert {r["meta"]["level"] for r in again} == {expected} and rows[2]["digits"] == expected
    assert rows[1]["digits"] == 3
    first = {r["prompt"] for r in labels}
    assert not first & {r["prompt"] for r in again}, "a length labelled again gets new problems"


def label(pair: int, swapped: bool, completion: str, answer: str = "579") -> dict:
    return {
        "completion": completion,
        "answer": answer,
        "meta": {"pair": pair, "swapped": swapped, "level": 3, "label_lengths": [3, 4]},
    }


@pytest.mark.parametrize("keep", ["vote", "length", "none"])
def test_self_labels_keep_what_the_filter_passes(tmp_path, keep):
    """The filters on hand-made labels of 3-digit problems (a label has 3 or 4 digits)."""
    samples = [
        *(label(0, False, "579"), label(0, True, " 579")),  # right length, the orders agree
        *(label(1, False, "5791", "5791"), label(1, True, "5791", "5791")),  # 4 digits: still a length
        *(label(2, False, "57"), label(2, True, "57")),  # too short
        *(label(3, False, "57a"), label(3, True, "57a")),  # not a number
        *(label(4, False, "578"), label(4, True, "579")),  # the orders disagree
    ]
    (tmp_path / "labels").mkdir()
    write_jsonl(tmp_path / "labels" / "samples.jsonl", samples)
    (tmp_path / "gold").mkdir()
    gold = [{"completion": str(i), "answer": str(i), "meta": {"level": 1}} for i in range(20)]
    write_jsonl(tmp_path / "gold" / "train.jsonl", gold)
    (tmp_path / "out").mkdir()
    counts = self_labels(
        tmp_path / "out",
        Artifact("labels", tmp_path / "labels", "x"),
        Artifact("gold", tmp_path / "gold", "y"),
        keep=keep,
        replay_min=5,
        seed=0,
    )
    data = read_jsonl(tmp_path / "out" / "train.jsonl")
    kept = sorted((r["meta"]["pair"], r["completion"]) for r in data if "pair" in r["meta"])
    passing = {"vote": [0, 1], "length": [0, 1, 4], "none": [0, 1, 2, 3, 4]}[keep]
    a_plus_b = {0: "579", 1: "5791", 2: "57", 3: "57a", 4: "578"}
    expected = sorted((p, a_plus_b[p]) for p in passing for _ in range(2))
    assert kept == expected, "both orders are kept, with the a+b label"
    assert counts["kept"] == len(passing) and counts["labelled"] == 5
    # as many gold problems as kept labels, at least replay_min (5)
    assert counts["replayed"] == max(len(expected), 5) == len(data) - len(kept)
    right = {"vote": 1.0, "length": round(4 / 6, 4), "none": round(4 / 10, 4)}[keep]
    assert counts["label_accuracy"] == right, "only pairs 0 and 1 are right"
    assert counts["agreement"] == 0.4, "pairs 0 and 1 pass the vote, whatever the filter keeps"


@pytest.mark.parametrize(
    "override, expected",
    [
        ("method.filter=vot", "method.filter='vot' is not allowed; use one of vote, length, none, majority"),
        (
            "method.advance_at=1.5",
            "method.advance_at=1.5 is not allowed; use a fraction of label pairs in (0, 1] or null",
        ),
        (
            "method.vote_draws=[1,2]",
            "method.vote_draws=[1, 2] is used only by method.filter=majority; "
            "set method.filter=majority or drop method.vote_draws",
        ),
        (
            "method.filter=majority",
            "method.filter=majority needs the initial draws of other models in method.vote_draws "
            "(this run's is 0), e.g. method.vote_draws=[0,1,2]",
        ),
        (
            "method.filter=majority method.vote_draws=[0] model.init_seed=0",
            "method.filter=majority needs the initial draws of other models in method.vote_draws "
            "(this run's is 0), e.g. method.vote_draws=[0,1,2]",
        ),
        (
            "method.filter=majority method.vote_draws=[0,1] method.majority=0",
            "method.majority=0.0 is not allowed; use a fraction of the models in (0, 1]",
        ),
    ],
)
def test_bad_filter_or_advance_is_one_line_before_anything_is_written(override, expected, tmp_path):
    proc = selfimprove(
        "run",
        "experiment=length_gen",
        *override.split(),
        f"run_dir={tmp_path / 'run'}",
        cwd=tmp_path,
        check=False,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines == [f"error: {expected}"], proc.stderr
    assert not (tmp_path / "run").exists()


def test_majority_vote_with_a_hub_model_is_one_line_before_anything_is_written(tmp_path):
    """A hub model has one set of weights: there are no other draws to vote."""
    proc = selfimprove(
        "run",
        "method=length_gen",
        "dataset=reversed_addition",
        "model=qwen0.5b",
        "method.filter=majority",
        "method.vote_draws=[0,1]",
        f"run_dir={tmp_path / 'run'}",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: method.filter=majority votes across models of different initial draws; "
        "model.source='hub' loads one set of weights. Use a model built here (model=tiny)"
    ], proc.stderr
    assert not (tmp_path / "run").exists()


def test_majority_keeps_the_label_most_models_give(tmp_path):
    """Lee et al.'s majority vote on hand-made a+b labels of three models (a label has 3 or 4 digits):
    kept when at least the threshold's share of the models give it, whatever its length or b+a."""
    first = [
        *(label(0, False, "579"), label(0, True, "000")),  # all three agree; b+a is not asked
        *(label(1, False, "57"), label(1, True, "57")),  # all three agree on a wrong length
        *(label(2, False, "578"), label(2, True, "578")),  # two of three: 578 is outvoted
        *(label(3, False, "111"), label(3, True, "111")),  # three different labels
    ]
    others = [
        [label(0, False, "579"), label(1, False, "57"), label(2, False, "579"), label(3, False, "222")],
        [label(0, False, "579"), label(1, False, "57"), label(2, False, "579"), label(3, False, "333")],
    ]
    folders = []
    for name, samples in [("m0", first), ("m1", others[0]), ("m2", others[1])]:
        (tmp_path / name).mkdir()
        write_jsonl(tmp_path / name / "samples.jsonl", samples)
        folders.append(Artifact(name, tmp_path / name, name))
    (tmp_path / "gold").mkdir()
    write_jsonl(tmp_path / "gold" / "train.jsonl", [{"completion": "1", "answer": "1", "meta": {}}] * 10)

    def kept_at(threshold: float) -> dict[int, str]:
        out = tmp_path / f"out{threshold}"
        out.mkdir()
        counts = self_labels(
            out,
            folders[0],
            Artifact("gold", tmp_path / "gold", "y"),
            keep="majority",
            replay_min=1,
            seed=0,
            voters=folders[1:],
            majority=threshold,
        )
        kept = read_jsonl(out / "kept.jsonl")
        assert counts["kept"] == len(kept) // 2, "both orders of a pair, with the majority's label"
        return {r["meta"]["pair"]: r["completion"] for r in kept}

    assert kept_at(1.0) == {0: "579", 1: "57"}
    assert kept_at(0.6) == {0: "579", 1: "57", 2: "579"}, "2 of 3 is at least 60 %"
    assert kept_at(0.3) == {0: "579", 1: "57", 2: "579", 3: "111"}, "a tie goes to the first model"


def test_majority_vote_trains_each_draw_once_across_a_sweep_of_draws(tmp_path):
    """Two runs, draws 0 and 1, voting with each other: every model labels round 1, the kept labels
    are those both give (0.7 of 2 models), both models train on them, and the second run finds
    every stage of both models in the store, computing only its own evaluation."""
    store = tmp_path / "store"
    common = [
        "experiment=length_gen",
        "model.num_layers=1",
        "model.intermediate_size=128",
        "dataset.seed_levels=[1,2]",
        "dataset.seed_per_level=64",
        "dataset.train_per_iteration=32",
        "dataset.test_levels=[3]",
        "dataset.test_per_level=8",
        "method.rounds=1",
        "method.replay_min=50",
        "method.warmstart.steps=12",
        "method.warmstart.batch_size=16",
        "method.train.steps=3",
        "method.train.batch_size=16",
        "method.filter=majority",
        "method.vote_draws=[0,1]",
        f"store_dir={store}",
    ]
    first, second = tmp_path / "draw0", tmp_path / "draw1"
    selfimprove("run", *common, "model.init_seed=0", f"run_dir={first}", cwd=tmp_path)

    def a_plus_b(folder) -> dict[int, str]:
        rows = read_jsonl(folder / "samples.jsonl")
        return {r["meta"]["pair"]: r["completion"].strip() for r in rows if not r["meta"]["swapped"]}

    own, other = a_plus_b(first / "iter_01" / "label"), a_plus_b(first / "iter_01" / "draw1" / "label")
    assert len(own) == len(other) == 32
    kept = read_jsonl(first / "iter_01" / "filter" / "kept.jsonl")
    assert {r["meta"]["pair"]: r["completion"] for r in kept} == {
        p: own[p] for p in own if own[p] == other[p]
    }
    assert (first / "iter_01" / "draw1" / "train" / "model").is_dir()
    assert (first / "warmstart" / "train").resolve() != (first / "draw1" / "warmstart" / "train").resolve()

    selfimprove("run", *common, "model.init_seed=1", f"run_dir={second}", cwd=tmp_path)
    actions = {e["stage"]: e["action"] for e in read_jsonl(second / "events.jsonl")}
    model_stages = ["init", "warmstart/train", "label", "filter", "train"]
    both = [*model_stages, *(f"draw0/{s}" for s in model_stages if s != "filter")]
    for name in both:
        name = name if "warmstart" in name or name.endswith("init") else f"iter_01/{name}"
        assert actions.get(name) == "shared", (name, actions.get(name))
    assert {s for s, a in actions.items() if a == "computed"} == {"warmstart/eval", "iter_01/eval"}
    # draw 1's model is the same stage whichever run trained it
    made_first = {e["stage"]: e["fingerprint"] for e in read_jsonl(first / "events.jsonl")}
    made_second = {e["stage"]: e["fingerprint"] for e in read_jsonl(second / "events.jsonl")}
    assert made_second["iter_01/train"] == made_first["iter_01/draw1/train"]
    assert made_second["iter_01/draw0/train"] == made_first["iter_01/train"]


@pytest.mark.parametrize(
    "curriculum, expected",
    [("{digits:1,stepz:6}", "Key 'stepz' not in 'Curriculum'"), ("{digits:0,steps:6}", "at least 1")],
)
def test_bad_curriculum_is_one_line_before_anything_is_written(curriculum, expected, tmp_path):
    proc = selfimprove(
        "run",
        "method=length_gen",  # curriculum null: a dict override reaches our check, not Hydra's struct check
        "dataset=reversed_addition",
        f"method.curriculum={curriculum}",
        f"run_dir={tmp_path / 'run'}",
        cwd=tmp_path,
        check=False,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: method.curriculum=") and expected in lines[0]
    assert not (tmp_path / "run").exists()


def test_mixed_seed_lengths_pair_a_longest_operand_with_any_shorter_one_in_either_order():
    cfg = plain(compose_cfg(["dataset=reversed_addition", "dataset.seed_lengths=mixed"]).dataset)
    cfg.update(seed_levels=[1, 2, 3, 4], seed_per_level=400, test_levels=[4])
    task = tasks.load(cfg)
    data = task.seed_data()
    held_out = {r["prompt"] for r in task.test_sets()["4"]}
    lengths = {}
    for r in data:
        a, b = r["meta"]["a"], r["meta"]["b"]
        assert r["prompt"] == f"{str(a)[::-1]}+{str(b)[::-1]}=" and r["completion"] == str(a + b)[::-1]
        assert r["meta"]["level"] == max(len(str(a)), len(str(b))) and r["prompt"] not in held_out
        lengths.setdefault(r["meta"]["level"], set()).add((len(str(a)), len(str(b))))
    # level 4: every (4, k) and (k, 4) for k = 1..4 is drawn (400 problems, 7 combinations)
    assert lengths[4] == {(4, k) for k in range(1, 5)} | {(k, 4) for k in range(1, 5)}
    # unlabelled and held-out problems keep two operands of the same length
    prompts = task.train_prompts(1)
    assert {tuple(map(len, p["prompt"][:-1].split("+"))) for p in prompts} == {(5, 5)}
    equal = tasks.load({**cfg, "seed_lengths": "equal"}).seed_data()
    assert {len(str(r["meta"]["a"])) for r in equal if r["meta"]["level"] == 4} == {4}


def test_independent_seed_lengths_draw_both_operand_lengths_uniformly_over_the_seed_levels():
    """As the reference script: a problem has a 4-digit operand 1 - (3/4)^2 = 44 % of the time with
    levels 1-4 (25 % per level with `mixed`), every length pair occurs, none is held out."""
    cfg = plain(compose_cfg(["dataset=reversed_addition", "dataset.seed_lengths=independent"]).dataset)
    cfg.update(seed_levels=[1, 2, 3, 4], seed_per_level=1000, test_levels=[2, 4])
    task = tasks.load(cfg)
    data = task.seed_data()
    held_out = {r["prompt"] for rows in task.test_sets().values() for r in rows}
    assert len(data) == 4000 and len({r["id"] for r in data}) == 4000
    pairs = [(len(str(r["meta"]["a"])), len(str(r["meta"]["b"]))) for r in data]
    assert set(pairs) == {(i, j) for i in range(1, 5) for j in range(1, 5)}
    assert all(r["meta"]["level"] == max(p) for r, p in zip(data, pairs))
    assert 0.40 < sum(r["meta"]["level"] == 4 for r in data) / len(data) < 0.48
    assert not held_out & {r["prompt"] for r in data}
    assert data == tasks.load(cfg).seed_data()  # the run seed fixes the set


def test_bad_seed_lengths_is_one_line_before_anything_is_written(tmp_path):
    proc = selfimprove(
        "run",
        "experiment=length_gen",
        "dataset.seed_lengths=mix",
        f"run_dir={tmp_path / 'run'}",
        cwd=tmp_path,
        check=False,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines == [
        "error: dataset.seed_lengths='mix' is not allowed; use one of equal, mixed, independent"
    ], proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "encoding, theta, rotates",
    [("nope", 10000.0, False), ("rope", 10000.0, True), ("rope", float("inf"), True)],
)
def test_nope_survives_save_and_load_and_ignores_positions(tmp_path, monkeypatch, encoding, theta, rotates):
    """model.position_encoding=nope, after a real save and load: logits are the same when every token
    is put at position 0 and when the rotation is replaced by the identity. With RoPE, and with
    rope_theta=inf (whose first frequency stays 1 rad/token), both differ: the checks can fail."""
    import torch
    import transformers.models.llama.modeling_llama as llama

    from selfimprove.models import build_tiny, load_model

    cfg = plain(compose_cfg([f"model.position_encoding={encoding}"]).model)
    cfg["rope_theta"] = theta
    build_tiny(cfg, tmp_path, seed=0)
    model, _ = load_model(tmp_path, {"device": "cpu", "dtype": "float32"})
    ids = torch.randint(4, 40, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        collapsed = model(input_ids=ids, position_ids=torch.zeros_like(ids)).logits
        monkeypatch.setattr(llama, "apply_rotary_pos_emb", lambda q, k, cos, sin, **kw: (q, k))
        unrotated = model(input_ids=ids).logits
    for other in (collapsed, unrotated):
        gap = (logits - other).abs().max().item()
        assert gap > 1e-4 if rotates else gap == 0, f"{encoding}, rope_theta={theta}: max |diff| {gap}"


def test_padded_answers_have_one_digit_more_than_the_longest_operand_and_the_filter_knows_it():
    cfg = plain(compose_cfg(["dataset=reversed_addition", "dataset.pad_answers=true"]).dataset)
    cfg.update(seed_levels=[1, 2, 3], seed_per_level=50, test_levels=[3], train_per_iteration=20)
    task = tasks.load(cfg)
    records = task.seed_data() + task.test_sets()["3"] + task.train_prompts(1)
    for r in records:
        a, b, n = r["meta"]["a"], r["meta"]["b"], r["meta"]["level"]
        assert len(r["answer"]) == n + 1 and int(r["answer"][::-1]) == a + b, r
        assert r["meta"]["label_lengths"] == [n + 1]
    assert any(r["answer"].endswith("0") and a_plus_b_has_n_digits(r) for r in records), "some are padded"
    plain_task = tasks.load({**cfg, "pad_answers": False})
    assert plain_task.train_prompts(1)[0]["meta"]["label_lengths"] == [4, 5]


def a_plus_b_has_n_digits(record: dict) -> bool:
    return len(str(record["meta"]["a"] + record["meta"]["b"])) == record["meta"]["level"]


def test_history_mixes_earlier_rounds_kept_labels_into_the_older_half(tmp_path):
    """method.history: the older half draws gold problems and an earlier round's kept labels by
    weight (gold_weight 1 : 1 here, so about half each); the newest labels stay whole."""
    samples = [label(0, False, "579"), label(0, True, "579"), label(1, False, "5791"), label(1, True, "5791")]
    for name, rows in {
        "labels": samples,
        "gold": [{"completion": str(i), "answer": str(i), "meta": {"level": 1}} for i in range(20)],
        "round1": [{"completion": "12", "answer": "12", "meta": {"level": 2, "round": 1}}] * 10,
    }.items():
        (tmp_path / name).mkdir()
        write_jsonl(tmp_path / name / ("samples.jsonl" if name == "labels" else "train.jsonl"), rows)
    (tmp_path / "round1" / "train.jsonl").rename(tmp_path / "round1" / "kept.jsonl")
    (tmp_path / "out").mkdir()
    counts = self_labels(
        tmp_path / "out",
        Artifact("labels", tmp_path / "labels", "x"),
        Artifact("gold", tmp_path / "gold", "y"),
        keep="vote",
        replay_min=200,
        seed=0,
        earlier=[Artifact("round1", tmp_path / "round1", "z")],
        gold_weight=1,
    )
    data = read_jsonl(tmp_path / "out" / "train.jsonl")
    from_round1 = sum(r["meta"].get("round") == 1 for r in data)
    from_gold = sum(r["meta"]["level"] == 1 for r in data)
    assert counts["replayed"] == 200 == from_round1 + from_gold and 60 < from_round1 < 140
    assert len(read_jsonl(tmp_path / "out" / "kept.jsonl")) == 4, "this round's kept labels, for later rounds"
