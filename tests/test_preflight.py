"""What is refused before a run writes anything, and what `selfimprove plan` shows: every command of
the README's Usage and GPU sections plans (hub models from their configs, no download); a run
that cannot fit its hardware, or a model that cannot hold its dataset, is one line with the fixes."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from selfimprove.app import CONF_DIR, plan
from selfimprove.cli import main
from selfimprove.engine.registry import ConfigError
from selfimprove.memory import format_bytes, training_peak
from selfimprove.preflight import arch_of, estimates
from tests.conftest import TINY_RUN, compose_cfg, selfimprove

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_commands() -> list[str]:
    """`selfimprove run ...` lines of the README's Usage and GPU sections, comments dropped."""
    text = README.read_text()
    sections = re.findall(r"^## (?:Usage|GPUs, many GPUs, clusters)\n(.*?)(?=^## )", text, re.M | re.S)
    joined = [section.replace("\\\n", " ") for section in sections]  # a command continued with \
    lines = [line.strip() for section in joined for line in section.splitlines()]
    return [line.split("  #")[0].strip() for line in lines if line.startswith("selfimprove run ")]


def test_the_readme_has_run_commands_in_both_sections():
    assert len(readme_commands()) >= 20


@pytest.mark.parametrize("command", readme_commands())
def test_every_readme_command_composes_and_passes_plan(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = shlex.split(command)[2:]
    code = main(["plan", *args])
    out = capsys.readouterr()
    assert code == 0, f"selfimprove plan {' '.join(args)}:\n{out.out[-2000:]}\n{out.err}"
    assert "stages" in out.out
    assert not list(tmp_path.iterdir()), "plan writes nothing"


EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_plans(name, tmp_path, monkeypatch, capsys):
    """Every experiment file, as `selfimprove plan experiment=X`: its stages resolve and pass the
    capability, context, batch and memory checks, computing and writing nothing (composing alone
    let star_gsm8k's crash through)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["plan", f"experiment={name}"])
    out = capsys.readouterr()
    assert code == 0, f"selfimprove plan experiment={name}:\n{out.out[-2000:]}\n{out.err}"
    planned = re.search(r"\(0 of (\d+) stages done\)", out.out)
    assert planned and int(planned[1]) > 0, out.out[-2000:]
    assert not list(tmp_path.iterdir()), "plan writes nothing"


def test_the_cards_command_plans_on_one_gpu_with_lora_and_refuses_a_full_7b_grpo(capsys):
    assert main(["plan", "method=star", "model=qwen7b", "dataset=gsm8k", "hardware=gpu"]) == 0
    out = capsys.readouterr().out
    assert "7.62 B parameters" in out and "LoRA r=64" in out and "max_length 768" in out
    # GRPO with every weight trained on one 80 GB GPU: refused, with the fixes
    args = ["plan", "method=grpo", "model=qwen7b", "dataset=math", "hardware=gpu", "model.optim.lora=null"]
    assert main(args) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "refused: iter_01/train" in out and "per device, hardware 'gpu' has 80.0 GB" in out
    assert "LoRA adapter" in out and "hardware=gpu8" in out


def test_run_refuses_what_does_not_fit_before_writing_anything(tmp_path):
    """The same check in `run`: a full fine-tune of 7B on a 40 GB GPU, in one line, exit 2, no files
    (not even Hydra's .hydra/)."""
    proc = selfimprove(
        "run",
        "model=qwen7b",
        "hardware=gpu",
        "hardware.memory_gb=40",
        "model.optim.lora=null",
        cwd=tmp_path,
        check=False,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: warmstart/train") and "has 40.0 GB; fixes:" in lines[0]
    assert not list(tmp_path.iterdir())


def test_dataset_the_character_model_cannot_hold_is_refused_with_the_fix(tmp_path):
    """`selfimprove run dataset=countdown` with nothing else: the tiny character model holds 256
    characters, countdown needs 512 + 512 tokens."""
    proc = selfimprove("run", "dataset=countdown", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and not list(tmp_path.iterdir())
    assert proc.stderr.strip() == (
        "error: model 'tiny' holds 256 tokens, but dataset 'reasoning_gym:countdown' needs 1024 "
        "(dataset.prompt_tokens=512, completion_tokens=512); use a model with a longer context "
        "(model=tiny_qwen offline, or a hub model) or lower the dataset's budgets"
    )


def test_score_rl_refuses_a_chat_model_and_runs_the_baselines(tmp_path):
    with pytest.raises(ConfigError, match="uses a chat template; use a base model"):
        from selfimprove.app import prepare

        prepare(compose_cfg(["method=score", "model=qwen1.5b"]), tmp_path)
    plan(compose_cfg(["method=score", "model=qwen1.5b-base"]), tmp_path)  # plain text: fine


def test_a_capability_the_task_lacks_is_optional_where_a_stage_can_do_without(tmp_path):
    """HumanEval has no demonstrations and no answers to extract: STaR skips its warm start and its
    monitor's distinct answers, and says so once, instead of failing mid-run."""
    from selfimprove.app import prepare

    cfg = compose_cfg(["dataset=humaneval", "dataset.train_size=4", "model=tiny_qwen", "eval.sampled=true"])
    planned, notes = prepare(cfg, tmp_path)
    assert "warmstart/train" not in [s.name for s in planned.plan]
    assert len(notes) == 3
    assert any("the warm start is skipped" in n for n in notes)
    assert any("maj@k is left out" in n for n in notes)


def test_batches_that_do_not_split_over_the_devices_are_refused(tmp_path):
    from selfimprove.app import prepare

    cfg = compose_cfg(["hardware=gpu8", "method.warmstart.batch_size=12"])
    with pytest.raises(
        ConfigError, match=r"warmstart/train: batch_size=12 must be a positive multiple of the 8"
    ):
        prepare(cfg, tmp_path, here=False)


def test_the_plans_estimate_is_the_estimator_at_the_stage_settings(tmp_path):
    """The plan's training estimate for the CPU demo's warm start is memory.training_peak of the tiny
    model at the warm start's batch and max_length (tests/test_memory.py measures that against
    the real peak)."""
    cfg = compose_cfg([*TINY_RUN])
    planned = plan(cfg, tmp_path)
    warm = next(e for e in estimates(cfg, planned) if "warmstart/train" in e.stages)
    expected = training_peak(
        arch_of(OmegaConf.to_container(cfg.model, resolve=True)),
        trainer="sft",
        micro_batch=64,
        seq_len=128,
        dtype="float32",
        device="cpu",
    )
    assert warm.parts == expected and format_bytes(warm.total) in warm.line()


@pytest.mark.parametrize("name", ["tiny", "tiny_qwen"])
def test_a_hub_models_shape_read_from_its_config_json_is_the_local_models(name, tmp_path):
    """The plan reads a hub model's shape from config.json (a local folder or the cache) through
    memory.Arch.from_hf_config; for a model built here it equals the shape read from its keys."""
    from selfimprove.models import build_tiny

    model = OmegaConf.to_container(compose_cfg([f"model={name}"]).model, resolve=True)
    build_tiny(model, tmp_path, seed=0)
    hub = {"source": "hub", "name_or_path": str(tmp_path / "model"), "arch": None}
    assert arch_of(hub) == arch_of(model)
    assert arch_of(hub).context == model["max_position_embeddings"]
