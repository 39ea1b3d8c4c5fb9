"""The run-directory contract on small real stages: markers, skip, recompute, refuse, partial
folders, stop_after, resumable stages and the per-iteration metrics file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selfimprove.errors import StageFailed
from selfimprove.pipeline import DONE, Run, StopRequested, read_jsonl, stage
from selfimprove.registry import ConfigError

CALLS: list[str] = []


@stage()
def write_number(out: Path, value: int) -> dict:
    CALLS.append(f"write_number:{value}")
    (out / "value.txt").write_text(str(value))
    return {"value": value}


@stage()
def add_one(out: Path, source) -> dict:
    CALLS.append("add_one")
    value = int(source.file("value.txt").read_text()) + 1
    (out / "value.txt").write_text(str(value))
    return {"value": value}


@stage()
def explode(out: Path, value: int) -> dict:
    (out / "half-written.txt").write_text("partial")
    raise RuntimeError("killed")


def two_stages(run: Run, value: int = 1):
    a = run.stage("a", write_number, value=value)
    return run.stage("b", add_one, source=a)


@pytest.fixture(autouse=True)
def _clear_calls():
    CALLS.clear()


def quiet_run(root: Path, **kwargs) -> Run:
    return Run(root, log=lambda _: None, **kwargs)


def test_done_stages_are_reused_not_recomputed(tmp_path):
    with quiet_run(tmp_path) as run:
        b = two_stages(run)
    assert CALLS == ["write_number:1", "add_one"]
    marker = json.loads((b.path / DONE).read_text())
    assert marker["fingerprint"] == b.fingerprint and marker["counts"] == {"value": 2}
    assert {"torch", "transformers"} <= set(marker["versions"])
    CALLS.clear()
    with quiet_run(tmp_path) as run:
        two_stages(run)
    assert CALLS == [] and run.counts == {"computed": 0, "reused": 2, "shared": 0}


def test_changed_input_recomputes_downstream(tmp_path):
    with quiet_run(tmp_path) as run:
        first = two_stages(run, value=1)
    CALLS.clear()
    with quiet_run(tmp_path) as run:
        second = two_stages(run, value=5)
    assert CALLS == ["write_number:5", "add_one"]
    assert first.fingerprint != second.fingerprint
    assert second.file("value.txt").read_text() == "6"


@stage()
def on_hardware(out: Path, hardware: dict) -> dict:
    CALLS.append(f"on_hardware:{hardware['dtype']}")
    return {}


def test_neutral_settings_do_not_change_the_fingerprint(tmp_path):
    neutral = frozenset({"hardware.num_threads"})
    with quiet_run(tmp_path, neutral=neutral) as run:
        first = run.stage("h", on_hardware, hardware={"dtype": "float32", "num_threads": 1})
    with quiet_run(tmp_path, neutral=neutral) as run:  # more threads: reused
        again = run.stage("h", on_hardware, hardware={"dtype": "float32", "num_threads": 8})
    with quiet_run(tmp_path, neutral=neutral) as run:  # another dtype: recomputed
        other = run.stage("h", on_hardware, hardware={"dtype": "bfloat16", "num_threads": 8})
    assert CALLS == ["on_hardware:float32", "on_hardware:bfloat16"]
    assert first.fingerprint == again.fingerprint != other.fingerprint


def test_refuse_mode_names_the_stage(tmp_path):
    with quiet_run(tmp_path) as run:
        two_stages(run, value=1)
    with pytest.raises(ConfigError, match="stage 'a' .* was done with other settings"):
        with quiet_run(tmp_path, on_change="refuse") as run:
            two_stages(run, value=2)
    assert (tmp_path / "a" / "value.txt").read_text() == "1", "a refused stage is left untouched"


def test_a_failed_stage_leaves_nothing_half_written(tmp_path):
    """A stage that raises is one line naming it (StageFailed); its partial folder is removed
    (a resumable stage keeps it: its checkpoints are how it continues)."""
    with pytest.raises(StageFailed, match="^x: RuntimeError: "):
        with quiet_run(tmp_path) as run:
            run.stage("x", explode, value=1)
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()
    with quiet_run(tmp_path, plan_only=True) as planner:
        planner.stage("x", explode, value=1)
    assert planner.plan[0].state == "pending"


def test_folder_without_marker_is_recomputed(tmp_path):
    with quiet_run(tmp_path) as run:
        two_stages(run)
    (tmp_path / "b" / DONE).unlink()  # as if killed between the rename and the marker
    (tmp_path / "b" / "value.txt").write_text("garbage")
    CALLS.clear()
    with quiet_run(tmp_path) as run:
        b = two_stages(run)
    assert CALLS == ["add_one"] and b.file("value.txt").read_text() == "2"


def test_stop_after_stops_and_the_rerun_continues(tmp_path):
    with pytest.raises(StopRequested):
        with quiet_run(tmp_path, stop_after="a") as run:
            two_stages(run)
    assert CALLS == ["write_number:1"] and not (tmp_path / "b").exists()
    CALLS.clear()
    with quiet_run(tmp_path) as run:
        two_stages(run)
    assert CALLS == ["add_one"]


def test_plan_reports_states_without_computing(tmp_path):
    with quiet_run(tmp_path) as run:
        run.stage("a", write_number, value=1)
    with quiet_run(tmp_path, plan_only=True) as planner:
        two_stages(planner, value=1)
        planner.stage("a", write_number, value=3)
    assert [(s.name, s.state) for s in planner.plan] == [("a", "done"), ("b", "pending"), ("a", "changed")]
    assert CALLS == ["write_number:1"]


def test_resumable_stage_keeps_its_partial_folder(tmp_path):
    attempts = []

    @stage(resumable=True)
    def counting(out: Path, target: int) -> dict:
        step = int((out / "ckpt").read_text()) if (out / "ckpt").exists() else 0
        attempts.append(step)
        while step < target:
            step += 1
            (out / "ckpt").write_text(str(step))
            if step == 2 and len(attempts) == 1:
                raise RuntimeError("killed mid-stage")
        return {"step": step}

    for _ in range(2):
        try:
            with quiet_run(tmp_path) as run:
                run.stage("loop", counting, target=4)
        except RuntimeError:
            pass
    assert attempts == [0, 2]
    assert json.loads((tmp_path / "loop" / DONE).read_text())["counts"] == {"step": 4}


def test_metrics_lines_are_keyed_by_iteration(tmp_path):
    with quiet_run(tmp_path) as run:
        a = run.stage("a", write_number, value=1)
        run.record(0, a)
        run.record(1, a, extra=1)
        run.record(0, a, again=True)  # a resumed run re-records iteration 0
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [0, 1] and rows[0]["again"] is True and rows[0]["value"] == 1


def test_one_process_per_run_directory(tmp_path):
    with quiet_run(tmp_path):
        with pytest.raises(ConfigError, match="in use by another"):
            with quiet_run(tmp_path):
                pass
