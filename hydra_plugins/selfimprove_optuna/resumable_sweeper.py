"""``hydra/sweeper=optuna`` (conf/hydra/sweeper/optuna.yaml): hydra-optuna-sweeper's sweeper made
resumable. Hydra instantiates sweepers only from the ``hydra_plugins`` package, so the class lives
here; what it adds lives in selfimprove/optuna_sweep.py. Hydra imports this module on every run
while it scans for plugins: Optuna is imported only when a study is swept."""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class ResumableOptunaSweeper(Sweeper):
    def __init__(self, objective: str, **settings: Any) -> None:
        """``objective``: the metric each trial's job returns (read by the job, see
        selfimprove.optuna_sweep.trial_value); ``settings``: the plugin's own (sampler, direction,
        storage, study_name, n_trials, ...)."""
        from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl

        self.objective = objective
        self.optuna = OptunaSweeperImpl(**settings)
        self.config: DictConfig | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.optuna.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        from selfimprove.optuna_sweep import resumed

        assert self.config is not None, "Hydra calls setup() before sweep()"
        with resumed(self.optuna, self.config):
            return self.optuna.sweep(arguments)
