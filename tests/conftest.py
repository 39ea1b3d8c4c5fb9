"""Shared fixtures: the real config tree composed with Hydra, shrunk for speed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from selfimprove.app import CONF_DIR
from selfimprove.config import register_configs

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A STaR run small enough for a test (~20 s): few steps, few prompts, two iterations.
TINY_RUN = [
    "method.iterations=2",
    "method.warmstart.steps=30",
    "method.train.steps=10",
    "dataset.seed_per_level=100",
    "dataset.train_per_iteration=16",
    "dataset.test_levels=[2,3]",
    "dataset.test_per_level=16",
    "method.sampling.n=2",
    "model.intermediate_size=128",
]


def compose_cfg(overrides: list[str]) -> DictConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name="config", overrides=overrides)


def selfimprove(*args: str, cwd: Path, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run the real console entry point in a subprocess."""
    proc = subprocess.run(
        [sys.executable, "-m", "selfimprove.cli", *args], cwd=cwd, capture_output=True, text=True, **kwargs
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"selfimprove {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


@pytest.fixture
def tiny_cfg(tmp_path):
    return compose_cfg([*TINY_RUN, f"run_dir={tmp_path / 'run'}"])
