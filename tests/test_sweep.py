"""Resumable sweeps, the shared-stage store, wandb offline and `selfimprove report`, on one real
2-job sweep that varies only a training setting: the sweep is SIGKILLed while job 2 trains, the
same command is run again and finishes without recomputing any finished stage."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest

from selfimprove.engine.pipeline import DONE, read_jsonl
from selfimprove.engine.tracking import offline_records
from tests.conftest import kill_when, selfimprove

pytestmark = pytest.mark.slow

SMALL = [
    "debug=tiny",
    "method.iterations=1",
    "method.warmstart.steps=20",
    "dataset.seed_per_level=50",
    "dataset.train_per_iteration=8",
    "dataset.test_levels=[2]",
    "dataset.test_per_level=8",
]
# one job after another (the default runs them side by side, tests/test_local_sweep.py): job 2 then
# finds job 1's stages in the store
SWEEP = ["run", "-m", *SMALL, "method.train.steps=4,6", "logger=wandb", "hydra/launcher=basic"]
SHARED = ["init", "warmstart/data", "warmstart/train", "warmstart/eval"]
SHARED += ["iter_01/prompts", "iter_01/generate", "iter_01/score", "iter_01/build"]


def jobs(sweep: Path) -> list[Path]:
    return sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))


def markers(job: Path) -> dict[str, float]:
    return {str(p.parent.relative_to(job)): json.loads(p.read_text())["finished"] for p in job.rglob(DONE)}


def wandb_runs(job: Path) -> list[tuple[str, str]]:
    """(run id, group) of each offline wandb run of a job, read from its .wandb record log."""
    return [
        (r.run.run_id, r.run.run_group) for r in offline_records(job) if r.WhichOneof("record_type") == "run"
    ]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> dict:
    cwd = tmp_path_factory.mktemp("sweep")
    env = {**os.environ, "WANDB_MODE": "offline"}

    def job_2_training():  # job 2 computes its first stage that is not shared
        found = list(cwd.glob("multirun/*/*/iter_01/train.partial"))
        if found and len(jobs(found[0].parents[2])) == 2:
            events = found[0].parents[1] / "events.jsonl"
            return found if events.exists() and "shared" in events.read_text() else None
        return None

    found = kill_when(SWEEP, cwd, job_2_training, timeout=600, env=env)
    (root,) = (cwd / "multirun").iterdir()
    killed_job = found[0].parents[1]
    before = {job: markers(job) for job in jobs(root)}
    events_before = {job: len(read_jsonl(job / "events.jsonl")) for job in jobs(root)}
    out = selfimprove(*SWEEP, cwd=cwd, env=env).stdout
    return {"root": root, "killed": killed_job, "before": before, "events_before": events_before, "out": out}


def test_killed_sweep_resumes_and_recomputes_no_finished_stage(sweep):
    root, killed = sweep["root"], sweep["killed"]
    assert len(jobs(root)) == 2 and all((job / "iter_01" / "eval" / DONE).exists() for job in jobs(root))
    assert not list(root.rglob("*.partial"))
    for job, done in sweep["before"].items():
        after = markers(job)
        assert all(after[name] == t for name, t in done.items()), f"{job.name}: a done stage was redone"
        events = read_jsonl(job / "events.jsonl")
        produced = Counter(e["stage"] for e in events if e["action"] in ("computed", "shared"))
        assert set(produced) == set(after) and set(produced.values()) == {1}, produced
        rerun = events[sweep["events_before"][job] :]
        redone = {e["stage"] for e in rerun if e["action"] != "reused"}
        assert redone == (set(after) - set(done)), f"{job.name} recomputed {redone}"
    finished = next(job for job in jobs(root) if job != killed)
    assert set(sweep["before"][finished]) == set(markers(finished)), "job 1 was finished before the kill"
    assert "0 stages computed" in sweep["out"]


def test_job_2_shares_the_stages_that_do_not_depend_on_training(sweep):
    killed = sweep["killed"]
    actions = {
        e["stage"]: e["action"] for e in read_jsonl(killed / "events.jsonl") if e["action"] != "reused"
    }
    assert [s for s in SHARED if actions[s] == "shared"] == SHARED
    assert actions["iter_01/train"] == "computed" and actions["iter_01/eval"] == "computed"
    other = next(job for job in jobs(sweep["root"]) if job != killed)
    for name in ("warmstart/train/model/model.safetensors", "iter_01/build/train.jsonl"):
        assert (killed / name).read_bytes() == (other / name).read_bytes()


def test_wandb_one_offline_run_per_job_grouped_by_sweep_and_resumed(sweep):
    ids = set()
    for job in jobs(sweep["root"]):
        started = {p.name.rsplit("-", 1)[1] for p in job.glob("wandb/offline-run-*")}
        assert len(list(job.glob("wandb/offline-run-*"))) == 2, "one offline run per attempt of the job"
        assert len(started) == 1, "the resumed job reuses its wandb run id"
        # a SIGKILLed attempt may leave its record log empty; the finished one names id and group
        assert set(wandb_runs(job)) == {(started.pop(), sweep["root"].name)}
        ids |= {run_id for run_id, _ in wandb_runs(job)}
    assert len(ids) == 2, "one wandb run per job"


def test_report_table_and_plots(sweep, tmp_path):
    root = sweep["root"]
    md = selfimprove("report", str(root), "--out", str(tmp_path), cwd=tmp_path).stdout
    assert "| method.train.steps=4 | 1 |" in md and "| method.train.steps=6 | 1 |" in md
    assert "acc/2 @0" in md and "acc/2 @1" in md
    assert (tmp_path / "acc_2.png").read_bytes()[:4] == b"\x89PNG"
    tex = selfimprove("report", str(root), "--format", "latex", "--out", str(tmp_path), cwd=tmp_path).stdout
    assert r"\toprule" in tex and "method.train.steps=4 & 1 &" in tex
    csv = selfimprove("report", str(root), "--format", "csv", "--out", str(tmp_path), cwd=tmp_path).stdout
    assert csv.splitlines()[0] == "setting,n,acc/2 @0 mean,acc/2 @0 std,acc/2 @1 mean,acc/2 @1 std"
    args = ["--metrics", "kept", "--iterations", "last", "--out", str(tmp_path)]
    one = selfimprove("report", str(sweep["killed"]), *args, cwd=tmp_path).stdout
    assert "| all runs | 1 | " in one and "kept @1" in one and "acc/2" not in one.splitlines()[2]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--format", "docx"], "error: unknown report format 'docx'; available: csv, latex, md"),
        (["--metrics", "acc/9"], "error: unknown report metric 'acc/9'"),
        (
            ["--iterations", "final"],
            "error: report iteration 'final' is not allowed; use first, last or an integer",
        ),
    ],
)
def test_report_bad_input_is_one_line(sweep, tmp_path, args, expected):
    proc = selfimprove("report", str(sweep["root"]), *args, "--out", str(tmp_path), cwd=tmp_path, check=False)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith(expected)
