"""Optuna hyperparameter search as a resumable sweep: ``selfimprove run -m hydra/sweeper=optuna ...``.

hydra-optuna-sweeper asks Optuna for trials and launches each as a Hydra job: an ordinary run whose
directory is derived from its overrides, so its stages are resumed and shared through the store as
in any sweep. This module adds what makes the study itself resumable (its settings: :func:`register`):

- the trials live in ``<sweep dir>/optuna.db`` under a fixed study name, so the same command again
  loads the study; trials already finished count toward ``n_trials`` and are not run again;
- a trial that a killed sweep left running is marked failed and its parameters are asked again first
  (Optuna's own retry convention, the ``failed_trial`` attribute), so it continues in its run directory;
- a job returns the objective read from its ``metrics.jsonl``; a run that fails is a failed trial,
  and the study goes on (``max_failure_rate``).

Optuna is imported only here and only when a study runs: ``pip install -e ".[optuna]"``.
"""

from __future__ import annotations

import fcntl
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, make_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from selfimprove.engine.pipeline import METRICS, read_jsonl
from selfimprove.engine.registry import ConfigError

SWEEPER = "hydra_plugins.selfimprove_optuna.resumable_sweeper.ResumableOptunaSweeper"
INSTALL = 'hydra/sweeper=optuna needs hydra-optuna-sweeper; install it with pip install -e ".[optuna]"'


@dataclass
class Settings:
    """``hydra/sweeper=optuna``: the plugin's settings (every one can be overridden as
    hydra.sweeper.<key>: sampler, params, ...) with these defaults changed or added."""

    _target_: str = SWEEPER
    # the metric a trial returns: a key of the run's metrics.jsonl, read from its last iteration
    # (acc/3 = held-out accuracy on 3-digit additions)
    objective: str = "acc/3"
    # maximize | minimize the objective
    direction: Any = "maximize"
    # where the trials are stored: the same command again (same sweep dir) loads the study
    storage: Any = "sqlite:///${hydra.sweep.dir}/optuna.db"
    # the study's name in the storage
    study_name: Any = "selfimprove"
    # trials asked at once (they run one after another unless hydra/launcher runs jobs in parallel)
    n_jobs: int = 1
    # 1.0 = a failed trial is recorded as failed and the study goes on; 0.0 = stop at the first one
    max_failure_rate: float = 1.0


def register() -> None:
    """Store :class:`Settings` as ``hydra/sweeper/optuna``, in place of the plugin's node of that
    name (a YAML file of the same name cannot extend it: Hydra refuses to match a schema that has a
    defaults list). The plugins are scanned first, since scanning stores their nodes again."""
    try:
        from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
    except ImportError:  # not installed: hydra/sweeper=optuna is refused with the install line
        return
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins

    Plugins.instance()
    fields = [(name, Any, value) for name, value in vars(Settings()).items()]
    node = make_dataclass("ResumableOptunaSweeperConf", fields, bases=(OptunaSweeperConf,))
    ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=node, provider="selfimprove")


class TrialFailed(RuntimeError):
    """A trial whose run failed: Optuna records it as failed and the study goes on."""


def is_optuna(sweeper: DictConfig | None) -> bool:
    """Whether a ``hydra.sweeper`` node is this project's Optuna sweeper."""
    return sweeper is not None and sweeper.get("_target_") == SWEEPER


def check_installed() -> None:
    """Refuse an Optuna sweep before anything runs when the plugin is not installed."""
    import importlib.util

    if importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None:
        raise ConfigError(INSTALL)


def is_trial() -> bool:
    """Whether this job is a trial of an Optuna study (it must then return its objective)."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.initialized() and is_optuna(HydraConfig.get().sweeper)


def trial_value(cfg: DictConfig, code: int) -> float:
    """What a trial's job returns to the study: the objective of the finished run, read from its
    metrics (the last iteration's line). A run that failed raises TrialFailed (a failed trial);
    Ctrl-C stops the study; an objective the run does not report stops it with one line."""
    from hydra.core.hydra_config import HydraConfig

    from selfimprove.app import run_dir_of

    if code == 130:
        sys.exit(code)
    if code:
        raise TrialFailed(f"the trial's run failed (exit {code}); Optuna records the trial as failed")
    key = HydraConfig.get().sweeper.objective
    path = run_dir_of(cfg) / METRICS
    rows = read_jsonl(path) if path.exists() else []
    last = rows[-1] if rows else {}
    if not isinstance(last.get(key), (int, float)):
        available = ", ".join(sorted(k for k, v in last.items() if isinstance(v, (int, float))))
        print(
            f"error: objective '{key}' is not a metric of the last line of {path} (it has: {available}); "
            "set hydra.sweeper.objective to one of them",
            file=sys.stderr,
        )
        sys.exit(2)
    return float(last[key])


@contextmanager
def resumed(optuna_sweeper, config: DictConfig) -> Iterator[None]:
    """Around the plugin's ``sweep``: hold the study (one process at a time), write the sweep's
    config where ``selfimprove status`` reads it (``multirun.yaml``, as Hydra's basic sweeper
    does), and leave the plugin only the trials the stored study still lacks."""
    sweep = Path(config.hydra.sweep.dir)
    sweep.mkdir(parents=True, exist_ok=True)
    with open(sweep / "optuna.lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"error: the Optuna study in {sweep} is being run by another process", file=sys.stderr)
            sys.exit(2)
        OmegaConf.save(config, sweep / "multirun.yaml")
        done = trials_done(optuna_sweeper.storage, optuna_sweeper.study_name)
        if done and hasattr(optuna_sweeper.sampler, "reseed_rng"):
            optuna_sweeper.sampler.reseed_rng()  # a seeded sampler would replay the first trials' parameters
        optuna_sweeper.n_trials = max(optuna_sweeper.n_trials - done, 0)
        try:
            yield
        except ValueError as err:  # the plugin's summary of a study whose every trial failed
            if "No trials are completed yet" not in str(err):
                raise
            none_completed(sweep)
        except RuntimeError as err:
            # the grid sampler stops the study once its grid is done, which the plugin does not
            # expect after a failed trial: the study is over all the same
            if "Study.stop" not in str(err):
                raise
            if not any(
                t.value is not None
                for t in load_study(optuna_sweeper.storage, optuna_sweeper.study_name).trials
            ):
                none_completed(sweep)


def none_completed(sweep: Path) -> None:
    print(f"error: no trial of the study completed; selfimprove status {sweep} shows why", file=sys.stderr)
    sys.exit(1)


def load_study(storage: str, study_name: str):
    """The stored study, or None when there is none yet."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return None


def trials_done(storage: str, study_name: str) -> int:
    """Trials of the stored study that count toward ``n_trials``: finished (complete, pruned or
    failed), interrupted ones excepted -- those are queued again (:func:`retry`) and counted once."""
    from optuna.trial import TrialState

    study = load_study(storage, study_name) if storage else None  # storage null: in memory, nothing to resume
    if study is None:
        return 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        retry(study, trial)  # we hold the study's lock: a running trial is one a killed sweep left
    return counted(study.get_trials(deepcopy=False))


def counted(trials: list) -> int:
    """Trials that count toward ``n_trials``: those asked (running or finished), an interrupted
    trial and its retries (``failed_trial``) counted once."""
    from optuna.trial import TrialState

    asked = sum(t.state != TrialState.WAITING for t in trials)
    return asked - sum("failed_trial" in t.system_attrs for t in trials)


def retry(study, trial) -> None:
    """Mark an interrupted trial failed and queue its parameters again, first in line: the plugin
    asks the queued trial, gets the same overrides, and so the same run directory to continue in."""
    import optuna
    from optuna.trial import TrialState

    study.tell(trial.number, state=TrialState.FAIL)
    queued = optuna.trial.create_trial(
        state=TrialState.WAITING,
        system_attrs={
            "fixed_params": dict(trial.params),
            "failed_trial": trial.system_attrs.get("failed_trial", trial.number),
        },
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # add_trial is "experimental" in Optuna 2.x
        study.add_trial(queued)
