"""`selfimprove status SWEEP_DIR` on a real 4-job sweep: while job 2 runs (its process stopped,
holding its lock), after it is SIGKILLed, and after the same sweep command is run again; and on a
sweep whose first job fails (its one-line error) and whose second never started (pending)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import TINY_RUN, selfimprove

pytestmark = pytest.mark.slow


# TINY_RUN with one iteration: a sweep of four jobs in about a minute
SMALL = [*TINY_RUN, "method.iterations=1", "method.warmstart.steps=20", "dataset.test_per_level=8"]
# one job after another (the default runs them side by side, tests/test_local_sweep.py)
SERIAL = "hydra/launcher=basic"
SWEEP = ["run", "-m", *SMALL, "method.train.steps=2,3,4,5", SERIAL]


def status_rows(text: str) -> dict[str, list[str]]:
    """job number -> the cells of its row (job, overrides, state, stages, computed, shared, wall
    time), from `selfimprove status` output."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if len(cells) == 7 and cells[0].isdigit():
            rows[cells[0]] = cells
    return rows


def job_training(cwd: Path, override: str) -> bool:
    """Whether the job with this override computes its training stage now."""
    return any(
        override in (p.parents[1] / "overrides.yaml").read_text()
        for p in cwd.glob("multirun/*/*/iter_01/train.partial")
        if (p.parents[1] / "overrides.yaml").exists()
    )


def status(cwd: Path) -> str:
    """`selfimprove status` of the sweep in ``cwd``, wide enough that no row wraps."""
    return selfimprove("status", str(sweep_dir(cwd)), cwd=cwd, env={**os.environ, "COLUMNS": "250"}).stdout


def sweep_dir(cwd: Path) -> Path:
    (root,) = (cwd / "multirun").iterdir()
    return root


@pytest.fixture(scope="module")
def killed_sweep(tmp_path_factory) -> dict:
    cwd = tmp_path_factory.mktemp("status")
    proc = subprocess.Popen(
        [sys.executable, "-m", "selfimprove.cli", *SWEEP],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 900
    try:
        while not job_training(cwd, "method.train.steps=3"):
            assert proc.poll() is None, f"the sweep ended (exit {proc.returncode}) before job 2 trained"
            assert time.time() < deadline, "job 2 did not start training in time"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGSTOP)  # job 2 stays in its stage, its run directory locked
        running = status(cwd)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    killed = status(cwd)
    selfimprove(*SWEEP, cwd=cwd)
    rerun = status(cwd)
    for title, text in (("while job 2 runs", running), ("killed", killed), ("after the rerun", rerun)):
        print(f"\n--- selfimprove status, {title}:\n{text}")
    return {"running": running, "killed": killed, "rerun": rerun}


def test_status_while_a_job_runs(killed_sweep):
    rows = status_rows(killed_sweep["running"])
    assert list(rows) == ["1", "2", "3", "4"]
    assert rows["1"][1:3] == ["method.train.steps=2", "done"]
    assert rows["2"][2] == "running iter_01/train"
    assert rows["3"][2:4] == rows["4"][2:4] == ["pending", "-"]
    assert "4 jobs: 1 done, 1 running, 2 pending;" in killed_sweep["running"]


def test_status_of_the_killed_sweep_and_after_the_rerun(killed_sweep):
    rows = status_rows(killed_sweep["killed"])
    assert rows["1"][2] == "done" and rows["2"][2] == "partial at iter_01/train"
    assert "4 jobs: 1 done, 1 partial, 2 pending;" in killed_sweep["killed"]
    # job 1 computed every stage; job 2 took the ones that do not depend on training from the store
    assert rows["1"][3:6] == ["12/12", "12", "0"]
    done_2 = int(rows["2"][3].split("/")[0])
    assert rows["2"][3].endswith("/12") and rows["2"][4] == "0" and int(rows["2"][5]) == done_2 < 12
    after = status_rows(killed_sweep["rerun"])
    assert all(cells[2:4] == ["done", "12/12"] for cells in after.values())
    assert after["1"][4:6] == ["12", "0"], "job 1 was not touched by the rerun"
    assert all(after[j][4:6] == ["2", "10"] for j in ("2", "3", "4")), "train and eval only"
    assert "4 jobs: 4 done; 18 stages computed, 30 shared;" in killed_sweep["rerun"]


def test_status_of_a_failed_job_is_its_one_line_error_and_the_rest_pending(tmp_path):
    sweep = ["run", "-m", *SMALL, "method.warmstart.max_length=6,7", SERIAL]
    proc = selfimprove(*sweep, cwd=tmp_path, check=False)
    assert proc.returncode == 1, proc.stderr
    out = status(tmp_path)
    print(f"\n--- selfimprove status, a failed sweep:\n{out}")
    rows = status_rows(out)
    assert rows["1"][2].startswith("failed: warmstart/train: 0 of ")
    assert rows["2"][2] == "pending"
    assert "2 jobs: 1 failed, 1 pending;" in out
