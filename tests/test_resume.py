"""Kill-and-resume on real runs: a `selfimprove run` subprocess is SIGKILLed in the middle of a
stage, the same command is run again, and the run ends with the same metrics as an uninterrupted
run. A finished run run again recomputes nothing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from selfimprove.pipeline import DONE, read_jsonl
from tests.conftest import TINY_RUN, selfimprove

pytestmark = pytest.mark.slow

COMMAND = ["run", *TINY_RUN, "out_root=outputs"]


def run_dir(cwd: Path) -> Path:
    (found,) = [p for p in (cwd / "outputs").iterdir() if p.is_dir() and not p.name.startswith(".")]
    return found


def markers(root: Path) -> dict[str, float]:
    return {str(p.parent.relative_to(root)): json.loads(p.read_text())["finished"] for p in root.rglob(DONE)}


def metrics_without_times(root: Path) -> list[dict]:
    return [
        {k: v for k, v in row.items() if "seconds" not in k} for row in read_jsonl(root / "metrics.jsonl")
    ]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One uninterrupted run: the numbers every resumed run must reproduce."""
    cwd = tmp_path_factory.mktemp("reference")
    selfimprove(*COMMAND, cwd=cwd)
    return run_dir(cwd)


def kill_during(stage: str, cwd: Path, timeout: float = 240) -> None:
    """Start the run, SIGKILL it as soon as ``stage`` is being computed."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "selfimprove.cli", *COMMAND],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            if list((cwd / "outputs").glob(f"*/{stage}.partial")):
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return
            if proc.poll() is not None:
                raise AssertionError(f"the run finished before stage {stage} was seen running")
            time.sleep(0.01)
        raise AssertionError(f"stage {stage} never started")
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("stage", ["warmstart/train", "iter_01/generate", "iter_02/train", "iter_02/eval"])
def test_sigkill_mid_stage_then_same_command_finishes_with_same_metrics(stage, reference, tmp_path):
    kill_during(stage, tmp_path)
    root = run_dir(tmp_path)
    done_before = markers(root)
    assert stage not in done_before and (root / f"{stage}.partial").exists()

    out = selfimprove(*COMMAND, cwd=tmp_path).stdout
    assert f"{len(done_before)}/" in out, "the rerun found the stages that were done"
    after = markers(root)
    assert all(after[name] == t for name, t in done_before.items()), "done stages were not recomputed"
    assert not list(root.rglob("*.partial")), "no partial folder is left behind"
    assert metrics_without_times(root) == metrics_without_times(reference)


def test_finished_run_rerun_recomputes_nothing(reference):
    cwd = reference.parent.parent
    before = markers(reference)
    out = selfimprove(*COMMAND, cwd=cwd).stdout
    assert markers(reference) == before
    assert f"0 stages computed, {len(before)} reused" in out


def test_status_shows_done_partial_and_pending(reference, tmp_path):
    out = selfimprove("status", str(reference), cwd=tmp_path).stdout
    assert "iter_02/eval" in out and "pending" not in out and f"{len(markers(reference))} done" in out
    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    (copy / "iter_02" / "eval" / DONE).unlink()
    shutil.rmtree(copy / "iter_02" / "train")
    out = selfimprove("status", str(copy), cwd=tmp_path).stdout
    assert "1 partial" in out and "1 pending" in out
