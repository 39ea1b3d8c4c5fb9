"""Progress without a terminal (a plain line every ~10 %), and the per-step training curves that a
run with logger=wandb puts into its offline wandb run, once, across a resume."""

from __future__ import annotations

import json
import os
import re
from collections import Counter

import pytest
from omegaconf import OmegaConf

from selfimprove.engine import progress
from selfimprove.engine.pipeline import read_jsonl
from selfimprove.engine.report import table_data
from selfimprove.engine.tracking import offline_history, offline_records
from selfimprove.generation import sample
from selfimprove.models import build_tiny
from tests.conftest import TINY_RUN, compose_cfg, selfimprove

LINE = re.compile(r"^  (\w+) (\d+)/(\d+) (\w+) \((\d+)%\)")


def said(text: str, what: str) -> list[tuple[int, int, int]]:
    """(done, total, percent) of each plain progress line of bar ``what`` in ``text``."""
    found = [LINE.match(line) for line in text.splitlines()]
    return [(int(m[2]), int(m[3]), int(m[5])) for m in found if m and m[1] == what]


@pytest.fixture
def plain_lines(monkeypatch):
    monkeypatch.setenv(progress.MODE_ENV, "plain")
    monkeypatch.setattr(progress, "PLAIN_AFTER_S", 0.0)


def test_plain_lines_at_every_tenth_and_none_for_a_nested_bar(plain_lines, capsys):
    with progress.bar("score", 95, "samples") as advance:
        for _ in range(95):
            advance()
            with progress.bar("inner", 2, "x") as inner:  # the outer bar speaks for the stage
                inner(2)
    lines = said(capsys.readouterr().out, "score")
    assert [p for _, _, p in lines] == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    assert [d for d, _, _ in lines] == [10, 19, 29, 38, 48, 57, 67, 76, 86, 95]  # the first past each tenth
    assert "inner" not in capsys.readouterr().out


def test_quick_work_prints_no_line(monkeypatch, capsys):
    monkeypatch.setenv(progress.MODE_ENV, "plain")
    with progress.bar("score", 10, "samples") as advance:
        advance(10)  # within PLAIN_AFTER_S: the stage's own line says it all
    assert capsys.readouterr().out == ""


def test_hf_generation_reports_prompts_done_per_batch(plain_lines, capsys, tmp_path):
    cfg = compose_cfg(["generator.batch_size=4"])
    build_tiny(OmegaConf.to_container(cfg.model, resolve=True), tmp_path, seed=0)
    records = [{"id": i, "prompt": f"{i}+{i}=", "answer": None} for i in range(20)]
    greedy = {"n": 1, "temperature": 0.0, "top_p": 1.0, "max_tokens": 4, "stop": []}
    plain = lambda node: OmegaConf.to_container(node, resolve=True, enum_to_str=True)  # noqa: E731
    out = sample(tmp_path, records, greedy, plain(cfg.generator), plain(cfg.hardware), seed=0)
    assert len(out) == 20
    # 5 batches of 4 prompts: each one crosses two tenths, said once at the batch's end
    assert said(capsys.readouterr().out, "generate") == [
        (4, 20, 20),
        (8, 20, 40),
        (12, 20, 60),
        (16, 20, 80),
        (20, 20, 100),
    ]


# -- a real run with logger=wandb, stopped after the first iteration's training, then resumed --------

TRAIN_STAGES = ["warmstart/train", "iter_01/train", "iter_02/train"]


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory) -> dict:
    cwd = tmp_path_factory.mktemp("wandb")
    env = {**os.environ, "WANDB_MODE": "offline", progress.MODE_ENV: "plain", "OMP_NUM_THREADS": "1"}
    args = ["run", *TINY_RUN, "logger=wandb", f"run_dir={cwd / 'run'}"]
    first = selfimprove(*args, "stop_after=iter_01/train", cwd=cwd, env=env)
    second = selfimprove(*args, cwd=cwd, env=env)
    return {"root": cwd / "run", "out": first.stdout + second.stdout}


def test_training_prints_its_steps_every_tenth_without_a_terminal(resumed_run):
    blocks = re.split(r"^▶ ", resumed_run["out"], flags=re.M)  # the output of each stage
    trained = {b.split()[0]: said(b, "train") for b in blocks if b.split()[0] in TRAIN_STAGES}
    assert set(trained) == set(TRAIN_STAGES)
    for name, lines in trained.items():
        percents = [p for _, _, p in lines]  # the first after PLAIN_AFTER_S, then one per tenth crossed
        tenths = [p // 10 for p in percents]
        assert tenths == sorted(set(tenths)), name
        assert percents[-1] == 100 and 1 <= len(lines) <= 10, name
    assert re.search(r"^  train \d+/\d+ steps \(\d+%\)  loss \d+\.\d{4}  elapsed", resumed_run["out"], re.M)


def test_wandb_history_holds_each_train_stage_on_its_own_axis(resumed_run):
    rows = offline_history(resumed_run["root"])
    for name in TRAIN_STAGES:
        logged = [r for r in rows if f"{name}/loss" in r]
        history = json.loads((resumed_run["root"] / name / "log_history.json").read_text())
        steps = [h["step"] for h in history if "loss" in h]
        assert [r[f"{name}/step"] for r in logged] == steps, name
        assert all({f"{name}/learning_rate", f"{name}/grad_norm"} <= set(r) for r in logged)
        assert not any(
            k.startswith(other) for r in logged for k in r for other in TRAIN_STAGES if other != name
        )
    iterations = [r["iteration"] for r in rows if "iteration" in r]
    assert iterations == [0, 1, 2] and all("acc/3" in r for r in rows if "iteration" in r)


def test_a_resumed_run_continues_its_wandb_run_without_duplicated_steps(resumed_run):
    root = resumed_run["root"]
    ids = [r.run.run_id for r in offline_records(root) if r.WhichOneof("record_type") == "run"]
    assert len(list(root.glob("wandb/offline-run-*"))) == 2 and len(set(ids)) == 1
    rows = offline_history(root)
    assert [r["_step"] for r in rows] == list(range(len(rows))), "steps continue across the resume"
    per_stage = Counter((k, r[k]) for r in rows for k in r if k.endswith("/step"))
    assert max(per_stage.values()) == 1, "no train step logged twice"
    events = read_jsonl(root / "events.jsonl")
    assert [e["action"] for e in events if e["stage"] == "iter_01/train"] == ["computed", "reused"]


def test_the_finished_run_logs_reports_table_once(resumed_run):
    """The attempt stopped after iter_01/train logs no table; the one that finishes logs report's."""
    root = resumed_run["root"]
    logged = [r for r in offline_history(root) if "report/_type" in r]  # wandb flattens the table's ref
    assert len(logged) == 1 and logged[0]["report/_type"] == "table-file", logged
    (saved,) = root.glob(f"wandb/offline-run-*/files/{logged[0]['report/path']}")
    header, data = table_data(root)
    table = json.loads(saved.read_text())
    assert header[:2] == ["setting", "seeds"] and len(header) > 2 and data
    assert table["columns"] == header and table["data"] == data
