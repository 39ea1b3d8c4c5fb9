"""Kill-and-resume on real runs: a `selfimprove run` subprocess is SIGKILLed in the middle of a
stage, the same command is run again, and the run ends with the same metrics as an uninterrupted
run. A finished run run again recomputes nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from selfimprove.engine.pipeline import DONE, Artifact, read_jsonl
from tests.conftest import TINY_RUN, complete_checkpoint, compose_cfg, kill_when, selfimprove

pytestmark = pytest.mark.slow

COMMAND = ["run", *TINY_RUN, "out_root=outputs"]


def run_dir(cwd: Path) -> Path:
    (found,) = [p for p in (cwd / "outputs").iterdir() if p.is_dir() and not p.name.startswith(".")]
    return found


def markers(root: Path) -> dict[str, float]:
    return {str(p.parent.relative_to(root)): json.loads(p.read_text())["finished"] for p in root.rglob(DONE)}


def metrics_without_times(root: Path) -> list[dict]:
    return [
        {k: v for k, v in row.items() if "seconds" not in k} for row in read_jsonl(root / "metrics.jsonl")
    ]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One uninterrupted run: the numbers every resumed run must reproduce."""
    cwd = tmp_path_factory.mktemp("reference")
    selfimprove(*COMMAND, cwd=cwd)
    return run_dir(cwd)


def kill_during(stage: str, cwd: Path) -> None:
    """Start the run, SIGKILL it as soon as ``stage`` is being computed."""
    kill_when(COMMAND, cwd, f"outputs/*/{stage}.partial", timeout=240)


# a resumable training stage early and late, and a stage that restarts (evaluation) late in the run
@pytest.mark.parametrize("stage", ["warmstart/train", "iter_02/train", "iter_02/eval"])
def test_sigkill_mid_stage_then_same_command_finishes_with_same_metrics(stage, reference, tmp_path):
    kill_during(stage, tmp_path)
    root = run_dir(tmp_path)
    done_before = markers(root)
    assert stage not in done_before and (root / f"{stage}.partial").exists()

    out = selfimprove(*COMMAND, cwd=tmp_path).stdout
    assert f"{len(done_before)}/" in out, "the rerun found the stages that were done"
    after = markers(root)
    assert all(after[name] == t for name, t in done_before.items()), "done stages were not recomputed"
    assert not list(root.rglob("*.partial")), "no partial folder is left behind"
    assert metrics_without_times(root) == metrics_without_times(reference)


def test_training_killed_after_a_checkpoint_continues_from_it_to_the_same_result(reference, tmp_path):
    command = [*COMMAND, "hardware.checkpoint_steps=10"]  # 30 warm-start steps: checkpoints at 10 and 20
    kill_when(command, tmp_path, complete_checkpoint(tmp_path, "outputs/*/warmstart/train.partial"))
    root = run_dir(tmp_path)
    assert not (root / "warmstart" / "train" / DONE).exists()

    out = selfimprove(*command, cwd=tmp_path).stdout
    assert "warmstart/train (continuing from its checkpoint)" in out
    counts = json.loads((root / "warmstart" / "train" / DONE).read_text())["counts"]
    assert counts["resumed_from"] in ("checkpoint-10", "checkpoint-20") and counts["steps"] == 30, counts
    assert not (root / "warmstart" / "train" / "trainer").exists(), "checkpoints are dropped when done"
    # optimizer, scheduler, RNG and data order were restored: the same weights, so the same numbers
    assert_same_weights(root / "warmstart" / "train" / "model", reference / "warmstart" / "train" / "model")
    assert metrics_without_times(root) == metrics_without_times(reference)


def test_checkpoints_every_n_steps_but_not_at_the_last(tmp_path):
    """The final weights are saved by save_trained right after training, so a checkpoint of the last
    step (weights and optimizer state) would be written for nothing."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from selfimprove.models import build_tiny, load_model
    from selfimprove.training.sft import sft_rows, train_resuming, trainer_args

    cfg = compose_cfg(TINY_RUN)
    build_tiny(dict(cfg.model), tmp_path / "init", seed=0)
    hardware = {**dict(cfg.hardware), "checkpoint_steps": 10}
    train = {**dict(cfg.method.warmstart), "steps": 30, "batch_size": 8}
    lm, tokenizer = load_model(Artifact("init", tmp_path / "init", "-"), hardware, for_training=True)
    records = [{"prompt": f"{i}+{i}=", "completion": str(2 * i)} for i in range(40)]
    trainer = SFTTrainer(
        model=lm,
        args=SFTConfig(**trainer_args(train, hardware, tmp_path / "out", 0), max_length=32),
        train_dataset=Dataset.from_list(sft_rows(records, chat=False)),
        processing_class=tokenizer,
    )
    assert train_resuming(trainer, tmp_path / "out") is None  # nothing to resume from
    assert trainer.state.global_step == 30
    assert sorted(p.name for p in (tmp_path / "out" / "trainer").glob("checkpoint-*")) == ["checkpoint-20"]


def assert_same_weights(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    differing = [k for k in wa if not (wa[k] == wb[k]).all()]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"


def test_finished_run_rerun_recomputes_nothing(reference):
    cwd = reference.parent.parent
    before = markers(reference)
    out = selfimprove(*COMMAND, cwd=cwd).stdout
    assert markers(reference) == before
    assert f"0 stages computed, {len(before)} reused" in out


def test_status_shows_done_partial_and_pending(reference, tmp_path):
    out = selfimprove("status", str(reference), cwd=tmp_path).stdout
    assert "iter_02/eval" in out and "pending" not in out and f"{len(markers(reference))} done" in out
    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    (copy / "iter_02" / "eval" / DONE).unlink()
    shutil.rmtree(copy / "iter_02" / "train")
    out = selfimprove("status", str(copy), cwd=tmp_path).stdout
    assert "1 partial" in out and "1 pending" in out
