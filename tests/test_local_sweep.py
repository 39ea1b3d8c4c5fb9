"""A CPU sweep's jobs run side by side by default (selfimprove/local_sweep.py), on a real 2-job
sweep through the CLI: both jobs compute at once, one thread each, each line names its job; the
sweep's process is SIGKILLed while both train, its workers die with it (no job is left running,
holding its run), and the same command finishes without recomputing a finished stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from selfimprove import local_sweep
from selfimprove.engine.pipeline import DONE
from tests.conftest import TINY_RUN, kill_when, selfimprove

pytestmark = pytest.mark.slow

SMALL = [*TINY_RUN, "method.iterations=1", "method.warmstart.steps=20", "dataset.test_per_level=8"]
SWEEP = ["run", "-m", *SMALL, "method.train.steps=30,31"]


def jobs(cwd: Path) -> list[Path]:
    (root,) = (cwd / "multirun").iterdir()
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def markers(job: Path) -> dict[str, float]:
    return {str(p.parent.relative_to(job)): json.loads(p.read_text())["finished"] for p in job.rglob(DONE)}


@pytest.fixture(scope="module")
def killed_sweep(tmp_path_factory) -> dict:
    cwd = tmp_path_factory.mktemp("side_by_side")

    def both_training():  # the two jobs' iteration-1 training stages at the same time
        return len(list(cwd.glob("multirun/*/*/iter_01/train.partial"))) == 2

    kill_when(SWEEP, cwd, both_training, timeout=600)
    time.sleep(3)  # a worker notices its sweep is gone within a second
    killed = selfimprove(
        "status", str(jobs(cwd)[0].parent), cwd=cwd, env={**os.environ, "COLUMNS": "250"}
    ).stdout
    before = {job: markers(job) for job in jobs(cwd)}
    out = selfimprove(*SWEEP, cwd=cwd).stdout
    return {"cwd": cwd, "killed": killed, "before": before, "out": out}


def test_jobs_ran_at_once_and_died_with_the_killed_sweep(killed_sweep):
    assert "2 jobs: 2 partial;" in killed_sweep["killed"], killed_sweep["killed"]  # none still running


def test_rerun_resumes_side_by_side_recomputing_no_finished_stage(killed_sweep):
    out = killed_sweep["out"]
    assert "sweep: 2 jobs, 2 at a time with 1 thread each" in out
    for job, done in killed_sweep["before"].items():
        after = markers(job)
        assert all(after[name] == t for name, t in done.items()), f"{job.name}: a done stage was redone"
        assert (job / "iter_01" / "eval" / DONE).exists()
        assert "num_threads: 1" in (job / "config.yaml").read_text()
        assert f"{job.name} │ ✓ iter_01/train" in out, "each stage line names its job"
    assert not list(jobs(killed_sweep["cwd"])[0].parent.rglob("*.partial"))


def test_a_named_launcher_or_thread_count_is_kept(tmp_path):
    serial = selfimprove("run", "-m", "seed=0,1", "stop_after=init", "hydra/launcher=basic", cwd=tmp_path)
    assert "at a time" not in serial.stdout
    threads = selfimprove("run", "-m", "seed=2,3", "stop_after=init", "hardware.num_threads=8", cwd=tmp_path)
    assert "at a time" not in threads.stdout or os.cpu_count() >= 16  # 8 threads each: one job per 8 cores


def test_each_job_at_once_holds_its_own_slot_and_cores(tmp_path, monkeypatch):
    """Two jobs at once (nested here; separate processes in a sweep) get different slots and
    different cores for a vLLM CPU engine; a slot is free again when its job ends."""
    monkeypatch.delenv(local_sweep.VLLM_BIND[0], raising=False)
    for name in (local_sweep.SLOTS_ENV, "SELFIMPROVE_PROGRESS"):  # restored after the test
        monkeypatch.setenv(name, "")
    local_sweep.overrides_for(2, 1, str(tmp_path))
    with local_sweep.slot("a") as first:
        cores_a = os.environ[local_sweep.VLLM_BIND[0]]
        with local_sweep.slot("b") as second:
            cores_b = os.environ[local_sweep.VLLM_BIND[0]]
            assert os.environ[local_sweep.LINE_PREFIX_ENV] == "b │ "
    assert (first, second) == (0, 1)
    if len(os.sched_getaffinity(0)) >= 2:
        assert cores_a != cores_b
    code = "from selfimprove import local_sweep\nwith local_sweep.slot('c') as k: print(k)"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    assert (
        subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout == "0\n"
    )
