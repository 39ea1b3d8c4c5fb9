"""Hydra launchers: a real 2-job multirun through the CLI with joblib and submitit_local, and the
Slurm launcher config composes (the cheapest config: stop after building the tiny model)."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from selfimprove.app import CONF_DIR
from selfimprove.config import register_configs
from tests.conftest import selfimprove


@pytest.mark.parametrize(
    "launcher",
    [
        ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
        ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5"],
    ],
    ids=["joblib", "submitit_local"],
)
def test_two_job_multirun_through_a_launcher(tmp_path, launcher):
    selfimprove("run", "-m", "seed=0,1", "stop_after=init", *launcher, cwd=tmp_path)
    sweep = tmp_path / "multirun" / "seed=0,1"
    for seed in (0, 1):
        assert (sweep / f"seed={seed}" / "init" / "_DONE.json").exists()
        assert (sweep / f"seed={seed}" / "init" / "model" / "model.safetensors").exists()
    if "submitit" in launcher[0]:
        assert (sweep / ".submitit").is_dir()  # the jobs really went through submitit


def test_slurm_launcher_config_composes():
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(
            config_name="config",
            overrides=[
                "hydra/launcher=slurm",
                "hydra.launcher.partition=gpu",
                "hydra.launcher.timeout_min=60",
            ],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.timeout_min, launcher.gpus_per_node, launcher.max_num_timeout) == (
        "gpu",
        60,
        1,
        3,
    )


def test_launcher_overrides_pass_the_cli_checks(tmp_path):
    proc = selfimprove("run", "-m", "seed=0,1", "hydra/launcher=nope", cwd=tmp_path, check=False)
    assert proc.returncode != 0  # Hydra itself rejects an unknown launcher...
    assert "nope" in proc.stderr
