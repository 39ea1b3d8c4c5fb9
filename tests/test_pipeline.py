"""The run-directory contract on small real stages: markers, skip, recompute, refuse, partial
folders, stop_after, resumable stages and the per-iteration metrics file."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from selfimprove import tasks
from selfimprove.engine import pipeline
from selfimprove.engine.errors import StageFailed
from selfimprove.engine.pipeline import DONE, STAGES, Run, StopRequested, read_jsonl, stage
from selfimprove.engine.registry import ConfigError
from selfimprove.stages import data
from tests.conftest import compose_cfg

CALLS: list[str] = []


@stage(name="write_number")
def write_number(out: Path, value: int) -> dict:
    CALLS.append(f"write_number:{value}")
    (out / "value.txt").write_text(str(value))
    return {"value": value}


@stage(name="add_one")
def add_one(out: Path, source) -> dict:
    CALLS.append("add_one")
    value = int(source.file("value.txt").read_text()) + 1
    (out / "value.txt").write_text(str(value))
    return {"value": value}


@stage(name="explode")
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


@stage(name="on_hardware")
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


def test_a_key_added_at_its_default_keeps_finished_runs(tmp_path):
    """``key=value`` in neutral: a config key added after a run was made (here hardware.mode) is
    left out while at that value, so the run keeps its stage; another value is another stage."""
    neutral = frozenset({"hardware.mode=plain"})
    with quiet_run(tmp_path, neutral=neutral) as run:  # made before the key existed
        before = run.stage("h", on_hardware, hardware={"dtype": "float32"})
    with quiet_run(tmp_path, neutral=neutral) as run:
        at_default = run.stage("h", on_hardware, hardware={"dtype": "float32", "mode": "plain"})
    with quiet_run(tmp_path, neutral=neutral) as run:
        other = run.stage("h", on_hardware, hardware={"dtype": "float32", "mode": "fast"})
    assert before.fingerprint == at_default.fingerprint != other.fingerprint
    assert CALLS == ["on_hardware:float32", "on_hardware:float32"]  # made, then "fast" recomputed


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

    @stage(name="counting", resumable=True)
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


# -- stage identity: the registered name and version, not the module path ----------------------


def load_copy(path: Path, source: str):
    """Import ``source`` as a new module from ``path``: the stage functions it defines live there."""
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prompts_stage(run: Run, fn) -> pipeline.Artifact:
    return run.stage("prompts", fn, dataset=tasks.spec(compose_cfg([]).dataset), iteration=1)


def test_a_moved_and_renamed_stage_keeps_its_fingerprint_and_its_done_run(tmp_path, monkeypatch):
    """stages/data.py copied into another module, its task_prompts renamed: a finished run still counts as
    done (0 stages computed), because the fingerprint holds the name 'task_prompts', not
    selfimprove.stages.data.task_prompts."""
    with quiet_run(tmp_path / "run") as run:
        before = prompts_stage(run, data.task_prompts)
    assert run.counts["computed"] == 1

    source = Path(data.__file__).read_text().replace("def task_prompts(", "def prompts_of_iteration(")
    monkeypatch.setattr(pipeline, "STAGES", {k: v for k, v in STAGES.items() if k != "task_prompts"})
    moved = load_copy(tmp_path / "moved_stages.py", source).prompts_of_iteration
    assert (moved.__module__, moved.__qualname__) == ("moved_stages", "prompts_of_iteration")

    with quiet_run(tmp_path / "run") as run:
        after = prompts_stage(run, moved)
    assert after.fingerprint == before.fingerprint
    assert run.counts == {"computed": 0, "reused": 1, "shared": 0}


def test_a_new_stage_version_recomputes(tmp_path, monkeypatch):
    """Bumping the version of the same stage (same name, same inputs) changes its fingerprint, so a
    finished run recomputes it."""
    monkeypatch.setattr(pipeline, "STAGES", dict(STAGES))  # the copy's stages leave with the test
    old = '@stage(name="task_prompts", version=1)'
    source = Path(data.__file__).read_text()
    assert old in source
    bumped = load_copy(tmp_path / "bumped_stages.py", source.replace(old, old.replace("1", "2"))).task_prompts
    assert bumped.stage_version == 2

    with quiet_run(tmp_path / "run") as run:
        before = prompts_stage(run, data.task_prompts)
    with quiet_run(tmp_path / "run") as run:
        after = prompts_stage(run, bumped)
    assert after.fingerprint != before.fingerprint
    assert run.counts["computed"] == 1


def test_stage_names_are_unique_and_required(tmp_path):
    with pytest.raises(
        ValueError, match="stage name 'task_prompts' is already used by selfimprove.stages.data"
    ):

        @stage(name="task_prompts")
        def other_prompts(out: Path) -> dict:
            return {}

    def unmarked(out: Path) -> dict:
        return {}

    with quiet_run(tmp_path) as run, pytest.raises(TypeError, match="not a stage; mark it with @stage"):
        run.stage("x", unmarked)


@stage(name="seeded")
def seeded(out: Path, value: int, seed: int, hardware: dict) -> dict:
    CALLS.append(f"seeded:{value}:{seed}:{hardware['dtype']}")
    return {}


def inputs_of(artifact: pipeline.Artifact) -> dict:
    """What the stage function was called with, as its marker records it."""
    return json.loads((artifact.path / DONE).read_text())["inputs"]


def test_the_context_fills_what_a_stage_requires_and_explicit_values_win(tmp_path):
    """A run stage gets the run's seed, an iteration's stage the iteration's (seed * 1000 + index),
    hardware comes from the context; a value passed by the call wins; a context key the function
    does not take (generator) is not passed. A filled input is hashed as if passed."""
    context = {"hardware": {"dtype": "float32"}, "generator": {"backend": "hf"}}
    with quiet_run(tmp_path / "run", context=context, seed=7) as run:
        on_run = run.stage("s", seeded, value=1)
        it = next(run.iterations(2))
        on_iteration = it.stage("s", seeded, value=1)
        explicit = it.stage("t", seeded, value=1, seed=5, hardware={"dtype": "bfloat16"})
    assert CALLS == ["seeded:1:7:float32", "seeded:1:7001:float32", "seeded:1:5:bfloat16"]
    assert it.seed == 7001
    assert inputs_of(on_iteration) == {"value": 1, "seed": 7001, "hardware": context["hardware"]}
    assert inputs_of(explicit)["seed"] == 5
    with quiet_run(tmp_path / "plain") as bare:  # no context: the same inputs spelled out
        spelled = bare.stage("s", seeded, value=1, seed=7, hardware=context["hardware"])
    assert spelled.fingerprint == on_run.fingerprint != on_iteration.fingerprint


def test_an_input_the_stage_lacks_is_refused_when_planned(tmp_path):
    """Without a context nothing fills ``hardware``: the plan (not the first computation) says so."""
    planner = quiet_run(tmp_path, plan_only=True, seed=7)
    with pytest.raises(
        TypeError, match=r"stage 'iter_01/s' \(.*seeded\): missing a required argument: 'hardware'"
    ):
        next(planner.iterations(1)).stage("s", seeded, value=1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'colour'"):
        planner.stage("s", seeded, value=1, hardware={}, colour="red")
    with pytest.raises(TypeError, match="this Run has no seed"):
        _ = pipeline.Iteration(quiet_run(tmp_path), 1).seed


def test_a_new_optional_parameter_keeps_finished_runs(tmp_path, monkeypatch):
    """task_prompts gains ``shuffle: bool = False``: a run made before is still done (0 computed),
    whether the call leaves shuffle out or passes its default; another value recomputes. An input
    equal to its default counts only with the default's type (1 is not the default True)."""
    monkeypatch.setattr(pipeline, "STAGES", dict(STAGES))
    old = "def task_prompts(out: Path, dataset: dict, iteration: int, digits: int | None = None) -> dict:"
    source = Path(data.__file__).read_text()
    assert old in source
    new = old.replace("= None)", "= None, shuffle: bool = False)")
    grown = load_copy(tmp_path / "grown_stages.py", source.replace(old, new)).task_prompts

    with quiet_run(tmp_path / "run") as run:
        before = prompts_stage(run, data.task_prompts)
    dataset = tasks.spec(compose_cfg([]).dataset)
    with quiet_run(tmp_path / "run") as run:
        left_out = prompts_stage(run, grown)
        at_default = run.stage("prompts", grown, dataset=dataset, iteration=1, shuffle=False)
    assert before.fingerprint == left_out.fingerprint == at_default.fingerprint
    assert run.counts == {"computed": 0, "reused": 2, "shared": 0}
    other = pipeline.fingerprint_of(grown, {"dataset": dataset, "iteration": 1, "shuffle": True})
    same_value_other_type = pipeline.fingerprint_of(grown, {"dataset": dataset, "iteration": 1, "shuffle": 0})
    assert len({before.fingerprint, other, same_value_other_type}) == 3
