"""RL with verifiable rewards: TRL's ``GRPOTrainer`` with the task's verifier as the reward function.

The stage is resumable: the trainer checkpoints every ``hardware.checkpoint_steps`` steps into the stage's
``.partial`` folder, and a run killed mid-training continues from its last checkpoint (optimizer,
scheduler and RNG state included) when the same command is run again.

CPU defaults (bf16 and gradient checkpointing off) come from ``sft.trainer_args``; GPU settings pass
through: ``rl.use_vllm``/``rl.vllm_mode`` and, for any other ``GRPOConfig`` field, ``rl.extra``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from selfimprove import tasks
from selfimprove.engine.pipeline import Artifact, read_jsonl, stage, write_json_atomic
from selfimprove.engine.registry import ConfigError
from selfimprove.models import load_model, uses_chat_template
from selfimprove.training.launch import accelerated, launched
from selfimprove.training.sft import (
    checkpointing_args,
    quiet_trainer,
    save_trained,
    train_resuming,
    trainer_args,
)


def check_rl(train: dict, rl: dict) -> None:
    """User errors in the RL settings, raised when the run is planned (before anything is computed)."""
    if rl["num_generations"] < 2 or train["batch_size"] % rl["num_generations"]:
        raise ConfigError(
            f"train.batch_size={train['batch_size']} must be a multiple of rl.num_generations={rl['num_generations']} "
            "(>= 2: each step trains on whole groups of completions of one prompt)"
        )
    clash = sorted(set(rl.get("extra") or {}) & {f for f in rl if f != "extra"})
    if clash:
        raise ConfigError(f"rl.extra sets {clash}; set them as rl.<key> instead")


def grpo_config(train: dict, rl: dict, hardware: dict, out: Path, seed: int):
    """A ``GRPOConfig`` from our ``train`` (optimisation) and ``rl`` (sampling, loss, vLLM) nodes."""
    from trl import GRPOConfig

    check_rl(train, rl)
    args = trainer_args(train, hardware, out, seed)
    args.update(
        **checkpointing_args(hardware.get("checkpoint_steps")),
        logging_steps=1,
        num_generations=rl["num_generations"],
        max_completion_length=rl["max_completion_length"],
        temperature=rl["temperature"],
        beta=rl["beta"],
        loss_type=rl["loss_type"],
        use_vllm=rl["use_vllm"],
        vllm_mode=rl["vllm_mode"],
        **dict(rl.get("extra") or {}),
    )
    return GRPOConfig(**args)


def train_rl(
    out: Path,
    model: Artifact,
    records: list[dict],
    reward: Callable,
    train: dict,
    rl: dict,
    hardware: dict,
    seed: int,
    trainer_class=None,
    **trainer_kwargs,
) -> dict:
    """Train ``model`` with GRPO (or ``trainer_class``, a GRPOTrainer subclass) on prompt records
    (columns ``prompt`` and ``answer`` reach the reward function); resumes from the last checkpoint
    in ``out``; writes model/ and model_meta.json."""
    import torch
    from datasets import Dataset
    from trl import GRPOTrainer

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    torch.manual_seed(seed)
    lm, tokenizer = load_model(model, hardware, for_training=True, place=not launched())
    chat = uses_chat_template(
        model, tokenizer
    )  # chat models: conversational prompts, TRL applies the template
    dataset = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}] if chat else r["prompt"],
                "answer": r["answer"],
                # every record column reaches the reward (reasoning-gym's verifier needs meta); JSON,
                # so that Arrow does not have to type records whose meta keys differ
                "meta": json.dumps(r.get("meta", {})),
            }
            for r in records
        ]
    )
    trainer = (trainer_class or GRPOTrainer)(
        model=lm,
        reward_funcs=reward,
        args=grpo_config(train, rl, hardware, out, seed),
        train_dataset=dataset,
        processing_class=tokenizer,
        **trainer_kwargs,
    )
    quiet_trainer(trainer)
    resumed_from = train_resuming(trainer, out)
    saved = save_trained(trainer, tokenizer, out)
    if not trainer.is_world_process_zero():  # under accelerate, rank 0 writes the stage's files
        return {}
    write_json_atomic(out / "model_meta.json", {"chat_template": chat})
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return {
        "prompts": len(records),
        "resumed_from": resumed_from,
        "mean_reward_first": round(rewards[0], 4) if rewards else None,
        "mean_reward_last": round(rewards[-1], 4) if rewards else None,
        **saved,
    }


def turn_text(x) -> str:
    """A prompt or completion as text: conversational ones (chat models) by their last turn."""
    return x if isinstance(x, str) else x[-1]["content"]


def record_meta(column: list[str] | None, count: int) -> list[dict]:
    """The records' meta column as train_rl stored it (JSON strings), for the task's reward."""
    return [json.loads(m) for m in column] if column is not None else [{}] * count


def verifier(task: tasks.Task) -> Callable:
    """The task's verifier as a TRL reward function, named ``correct`` in TRL's logs. Conversational
    completions (chat models) are reduced to their text; a None reward is left for TRL to skip."""

    def correct(prompts, completions, answer, meta=None, **columns):
        return task.reward(
            prompts=[turn_text(p) for p in prompts],
            completions=[turn_text(c) for c in completions],
            answer=answer,
            meta=record_meta(meta, len(completions)),
        )

    return correct


@stage(name="grpo", version=1, resumable=True)
@accelerated
def grpo(
    out: Path,
    model: Artifact,
    prompts: Artifact,
    dataset: dict,
    train: dict,
    rl: dict,
    hardware: dict,
    seed: int,
) -> dict:
    """Stage: GRPO on the iteration's prompts with the task's verifier as the reward."""
    task = tasks.load(dataset)
    records = read_jsonl(prompts.file("prompts.jsonl"))
    return train_rl(out, model, records, verifier(task), train, rl, hardware, seed)
