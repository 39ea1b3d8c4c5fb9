"""GRPO end to end on a very small config (TRL's GRPOTrainer, the verifier as reward), and the RL
stage killed mid-training: the same command continues from the stage's last checkpoint instead of
starting over, and finishes with the configured number of steps."""

from __future__ import annotations

import json

import pytest

from selfimprove.app import run
from selfimprove.engine.pipeline import DONE, read_jsonl
from selfimprove.engine.registry import ConfigError
from tests.conftest import complete_checkpoint, compose_cfg, kill_when, selfimprove

pytestmark = pytest.mark.slow

SMALL = [
    "method=grpo",
    "debug=tiny",
    "hardware.checkpoint_steps=2",
    "dataset.test_levels=[2]",
    "dataset.test_per_level=8",
]


def test_grpo_end_to_end(tmp_path):
    rows = run(compose_cfg([*SMALL, f"run_dir={tmp_path}"]))
    assert [r["iteration"] for r in rows] == [0, 1] and "acc/2" in rows[1]
    done = json.loads((tmp_path / "iter_01" / "train" / DONE).read_text())["counts"]
    assert done["steps"] == 6 and done["resumed_from"] is None and done["mean_reward_last"] is not None
    assert (tmp_path / "iter_01" / "train" / "model" / "model.safetensors").exists()
    assert not (tmp_path / "iter_01" / "train" / "trainer").exists(), "checkpoints are dropped when done"
    history = json.loads((tmp_path / "iter_01" / "train" / "log_history.json").read_text())
    assert any("rewards/correct/mean" in h for h in history), "the verifier is TRL's reward function"


def test_batch_must_hold_whole_groups(tmp_path):
    with pytest.raises(ConfigError, match="must be a multiple of rl.num_generations"):
        run(compose_cfg([*SMALL, "method.rl.num_generations=3", f"run_dir={tmp_path}"]))


def test_rl_stage_killed_mid_training_resumes_from_its_checkpoint(tmp_path):
    command = ["run", *SMALL, "out_root=outputs", "store=false", "hardware.num_threads=1"]
    kill_when(command, tmp_path, complete_checkpoint(tmp_path, "outputs/*/iter_01/train.partial"))
    (root,) = [p for p in (tmp_path / "outputs").iterdir() if p.is_dir()]
    assert not (root / "iter_01" / "train" / DONE).exists()

    selfimprove(*command, cwd=tmp_path)
    counts = json.loads((root / "iter_01" / "train" / DONE).read_text())["counts"]
    assert counts["resumed_from"] and counts["resumed_from"].startswith("checkpoint-"), counts
    assert counts["steps"] == 6
    events = read_jsonl(root / "events.jsonl")
    assert [e["action"] for e in events if e["stage"] == "warmstart/train"] == ["computed", "reused"]
    assert len(read_jsonl(root / "metrics.jsonl")) == 2
