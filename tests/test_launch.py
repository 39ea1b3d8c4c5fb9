"""Multi-process training through `accelerate launch`: the DDP config run for real as 2 CPU
processes over gloo (the same file launches one process per GPU on a GPU machine). The FSDP and
DeepSpeed configs need GPUs: on CPU accelerate falls back to plain data parallel (MULTI_CPU)."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import TINY_RUN, selfimprove


def test_warm_start_trains_in_two_accelerate_processes_and_the_model_evaluates(tmp_path):
    run_dir = tmp_path / "run"
    args = [*TINY_RUN, "hardware.accelerate=ddp", "hardware.num_processes=2", "hardware.num_threads=1"]
    proc = selfimprove("run", *args, f"run_dir={run_dir}", "stop_after=warmstart/eval", cwd=tmp_path)
    done = json.loads((run_dir / "warmstart/train/_DONE.json").read_text())
    assert done["counts"]["processes"] == 2, done["counts"]
    assert done["counts"]["steps"] == 30
    history = json.loads((run_dir / "warmstart/train/log_history.json").read_text())
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses[-1] < 0.8 * losses[0], losses  # it learnt
    # rank 0 wrote one model folder and nothing of the launch is left behind
    names = sorted(p.name for p in (run_dir / "warmstart/train").iterdir())
    assert names == ["_DONE.json", "log_history.json", "model", "model_meta.json"], names
    assert (run_dir / "warmstart/eval/_DONE.json").exists(), proc.stdout
    # the training bar reaches the terminal from the launched processes, once (rank 0's), as plain
    # lines here (no terminal): every tenth said once, up to 100 %
    percents = re.findall(r"^  train \d+/30 steps \((\d+)%\)", proc.stdout, re.M)
    assert percents and percents == sorted(set(percents), key=int) and percents[-1] == "100", proc.stdout
    # the same command finds everything done
    again = selfimprove("run", *args, f"run_dir={run_dir}", "stop_after=warmstart/eval", cwd=tmp_path)
    assert "0 stages computed" in again.stdout, again.stdout


@pytest.mark.parametrize(
    "setting, expected",
    [
        ("hardware.accelerate=zero9", ["'zero9'", "deepspeed_zero3"]),
        ("hardware.checkpoint_steps=-5", ["hardware.checkpoint_steps=-5", ">= 1"]),
    ],
)
def test_bad_training_hardware_setting_is_one_line_before_anything_is_written(setting, expected, tmp_path):
    proc = selfimprove("run", *TINY_RUN, setting, f"run_dir={tmp_path / 'run'}", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and all(e in lines[0] for e in expected), proc.stderr
    assert not (tmp_path / "run").exists()
