"""Failures while a run runs are one line on the terminal -- the stage, what went wrong in words,
the fix -- exit 1, the whole traceback in <run dir>/error.log (HYDRA_FULL_ERROR=1 prints it too),
and nothing half-written."""

from __future__ import annotations

import os

import pytest
import torch

from selfimprove.engine.errors import StageFailed
from selfimprove.engine.pipeline import DONE, Run, stage
from tests.conftest import TINY_RUN, selfimprove

pytestmark = pytest.mark.slow


def one_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_a_training_set_that_fits_no_max_length_is_one_line_with_the_fix(tmp_path):
    proc = selfimprove(
        "run", *TINY_RUN, "method.warmstart.max_length=6", "out_root=out", cwd=tmp_path, check=False
    )
    line = one_line(proc)
    run_dir = next(p for p in (tmp_path / "out").iterdir() if (p / "config.yaml").exists())
    assert line.startswith("error: warmstart/train: 0 of 232 examples fit max_length=6 (longest: ")
    assert "raise the dataset's budgets (dataset.prompt_tokens, dataset.completion_tokens)" in line
    assert line.endswith(f"(traceback: {run_dir / 'error.log'})")
    log = (run_dir / "error.log").read_text()
    assert "Traceback (most recent call last)" in log and "RunError" in log
    assert (
        not (run_dir / "warmstart" / "train" / DONE).exists()
        and (run_dir / "warmstart" / "data" / DONE).exists()
    )
    # opt in to the traceback on the terminal too
    again = selfimprove(
        "run",
        *TINY_RUN,
        "method.warmstart.max_length=6",
        "out_root=out",
        cwd=tmp_path,
        check=False,
        env={**os.environ, "HYDRA_FULL_ERROR": "1"},
    )
    assert again.returncode == 1 and "Traceback (most recent call last)" in again.stderr


def test_a_hub_model_without_network_is_one_line_naming_the_fixes(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-cache")}
    proc = selfimprove("run", *TINY_RUN, "model=qwen0.5b", "out_root=out", cwd=tmp_path, check=False, env=env)
    line = one_line(proc)
    assert line.startswith(
        "error: warmstart/train: the model or dataset is not in the local Hugging Face cache"
    )
    assert "model.name_or_path" in line


def test_a_hub_dataset_without_network_is_one_line_naming_the_fixes(tmp_path):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "empty"),
    }
    proc = selfimprove(
        "run", "dataset=gsm8k", "model=tiny_qwen", "out_root=out", cwd=tmp_path, check=False, env=env
    )
    line = one_line(proc)
    assert line.startswith("error: warmstart/data: ") and "dataset.*.path" in line, line


@stage(name="allocate")
def allocate(out, size: int) -> dict:
    (out / "half.bin").write_bytes(b"x" * size)
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.1 GiB total)")


def test_cuda_out_of_memory_is_one_line_and_leaves_no_half_written_stage(tmp_path):
    with pytest.raises(StageFailed) as failed, Run(tmp_path / "run", log=lambda _: None) as run:
        run.stage("iter_01/train", allocate, size=10)
    assert str(failed.value).startswith("iter_01/train: out of GPU memory; lower the method's micro-batch")
    assert "`selfimprove plan` estimates the peak" in str(failed.value)
    assert not (tmp_path / "run" / "iter_01" / "train").exists()
    assert not (tmp_path / "run" / "iter_01" / "train.partial").exists()
