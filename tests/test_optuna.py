"""`hydra/sweeper=optuna` on 3 tiny trials, SIGKILLed while trial 3 trains and run again with the
same command: the stored study (<sweep dir>/optuna.db) is resumed, trial 3 continues in its run
directory, trials 1 and 2 are not run again, and each trial returned its objective (acc/3)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from selfimprove.engine.pipeline import read_jsonl
from tests.conftest import kill_when, selfimprove
from tests.test_sweep_status import SMALL

pytestmark = pytest.mark.slow

STUDY = [
    "hydra/sweeper=optuna",
    "hydra/sweeper/sampler=grid",  # three distinct trials, whatever the order
    "hydra.sweeper.n_trials=3",
    "hydra.sweeper.objective=acc/3",
]
SWEEP = ["run", "-m", *STUDY, *[o for o in SMALL if not o.startswith("method.train.steps=")]]
SWEEP += ["method.train.steps=choice(2,3,4)"]


def runs(sweep: Path) -> list[Path]:
    return sorted(p.parent for p in sweep.glob("*/config.yaml"))


def run_of(sweep: Path, steps: int) -> Path:
    """The run directory of the trial with method.train.steps=steps."""
    (run,) = [
        r for r in runs(sweep) if f"- method.train.steps={steps}\n" in (r / "overrides.yaml").read_text()
    ]
    return run


def computed(events: list[dict]) -> list[str]:
    return [e["stage"] for e in events if e["action"] == "computed"]


def trials(sweep: Path) -> list:
    import optuna

    return optuna.load_study(study_name="selfimprove", storage=f"sqlite:///{sweep}/optuna.db").trials


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict:
    cwd = tmp_path_factory.mktemp("optuna")

    def trial_3_training():
        found = list(cwd.glob("multirun/*/optuna.db"))
        if not found or len(runs(found[0].parent)) < 3:
            return None
        return list(found[0].parent.glob("*/iter_01/train.partial"))

    kill_when(SWEEP, cwd, trial_3_training, timeout=900)
    (sweep,) = (cwd / "multirun").iterdir()
    killed_trials = trials(sweep)
    before = {
        t.number: read_jsonl(run_of(sweep, t.params["method.train.steps"]) / "events.jsonl")
        for t in killed_trials
    }
    env = {**os.environ, "COLUMNS": "250"}
    status_killed = selfimprove("status", str(sweep), cwd=cwd, env=env).stdout
    selfimprove(*SWEEP, cwd=cwd)
    status_after = selfimprove("status", str(sweep), cwd=cwd, env=env).stdout
    print(f"\n--- selfimprove status, killed while trial 3 trains:\n{status_killed}")
    print(f"\n--- selfimprove status, after the same command again:\n{status_after}")
    for t in killed_trials:
        events = read_jsonl(run_of(sweep, t.params["method.train.steps"]) / "events.jsonl")
        print(
            f"trial {t.number} (method.train.steps={t.params['method.train.steps']}): stages computed "
            f"before the kill {len(computed(before[t.number]))}, by the rerun {len(computed(events[len(before[t.number]) :]))}"
        )
    return {
        "sweep": sweep,
        "killed_trials": killed_trials,
        "before": before,
        "killed": status_killed,
        "after": status_after,
    }


def test_the_rerun_resumes_trial_3_and_leaves_trials_1_and_2_alone(study):
    from optuna.trial import TrialState

    sweep, killed = study["sweep"], study["killed_trials"]
    assert [t.state for t in killed] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.RUNNING]
    after = trials(sweep)
    assert [t.state for t in after] == [TrialState.COMPLETE] * 2 + [TrialState.FAIL, TrialState.COMPLETE]
    assert after[3].system_attrs["failed_trial"] == 2 and after[3].params == killed[2].params
    assert len(runs(sweep)) == 3, "trial 3 continued in its own run directory"
    for t in killed:
        events = read_jsonl(run_of(sweep, t.params["method.train.steps"]) / "events.jsonl")
        rerun = events[len(study["before"][t.number]) :]
        if t.number < 2:
            assert rerun == [], f"trial {t.number} was run again"
        else:  # what trial 3 had done before the kill is reused, the rest computed
            assert computed(rerun) == ["iter_01/train", "iter_01/eval"]
            assert not set(computed(study["before"][2])) & set(computed(rerun))


def test_each_trial_returned_its_objective_read_from_its_metrics(study):
    sweep = study["sweep"]
    finished = [t for t in trials(sweep) if t.value is not None]
    assert len(finished) == 3
    for t in finished:
        metrics = read_jsonl(run_of(sweep, t.params["method.train.steps"]) / "metrics.jsonl")
        assert t.value == metrics[-1]["acc/3"]
    assert "best_value" in (sweep / "optimization_results.yaml").read_text()


def test_status_of_the_study_before_and_after_the_rerun(study):
    killed, after = study["killed"], study["after"]
    assert "3 jobs: 2 done, 1 partial;" in killed and "partial at iter_01/train" in killed
    assert "3 jobs: 3 done;" in after and "trial 2→3" in after
    assert after.count("done, acc/3=") == 3


def test_failed_trials_are_recorded_and_the_study_goes_on(tmp_path):
    """Every trial's run fails (no example fits max_length): each is a failed trial with its one-line
    error in `status`, the study runs them all, and then says in one line that none completed."""
    from optuna.trial import TrialState

    sweep = [
        "run",
        "-m",
        *STUDY[:2],
        "hydra.sweeper.n_trials=2",
        *SMALL,
        "method.warmstart.max_length=choice(6,7)",
    ]
    proc = selfimprove(*sweep, cwd=tmp_path, check=False)
    (root,) = (tmp_path / "multirun").iterdir()
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: no trial of the study completed; selfimprove status {root.relative_to(tmp_path)} shows why"
    )
    assert [t.state for t in trials(root)] == [TrialState.FAIL, TrialState.FAIL]
    out = selfimprove("status", str(root), cwd=tmp_path, env={**os.environ, "COLUMNS": "250"}).stdout
    print(f"\n--- selfimprove status, a study whose trials fail:\n{out}")
    assert out.count("failed: warmstart/train: 0 of ") == 2 and "2 jobs: 2 failed;" in out
