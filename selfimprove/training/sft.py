"""Supervised fine-tuning with TRL's SFTTrainer on prompt/completion records (completion-only loss).

Chat models (``model.chat_template``) get TRL's conversational prompt/completion format
(``prompt=[{"role": "user", ...}]``, ``completion=[{"role": "assistant", ...}]``): TRL applies the
chat template and still computes the loss on the completion only. Plain strings would be
tokenized without the template -- a different prompt from the one generation uses.

``train.lora`` (r, alpha, dropout, target_modules) trains a peft LoRA adapter instead of all
weights; the artifact is then a PEFT adapter folder plus ``model_meta.json`` naming its base
artifact, and models.load_model merges it on load.

Training stages are resumable: with ``hardware.checkpoint_steps`` the trainer checkpoints into the
stage's ``.partial/`` folder, and the same command run again after a kill continues from the last
checkpoint (optimizer, scheduler, RNG and data position included) instead of from step 0.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from selfimprove.engine import progress
from selfimprove.engine.errors import RunError
from selfimprove.engine.pipeline import Artifact, read_jsonl, stage, write_json_atomic
from selfimprove.models import load_model, resolve_device, uses_chat_template
from selfimprove.training.launch import accelerated, batch_split, launched


def checkpointing_args(every: int | None) -> dict:
    """Checkpoint every ``every`` optimizer steps (model, optimizer, scheduler and RNG state, only
    the newest kept) into the stage's ``.partial/trainer``; None or 0 = no checkpoints."""
    if not every:
        return {"save_strategy": "no"}
    return {"save_strategy": "steps", "save_steps": every, "save_total_limit": 1, "save_only_model": False}


def complete(checkpoint: Path) -> bool:
    """transformers writes trainer_state.json last: a checkpoint without a readable one was cut short."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
        return True
    except (OSError, ValueError):
        return False


def last_checkpoint(out: Path) -> str | None:
    """The newest complete ``trainer/checkpoint-N`` of a killed run, or None."""
    found = sorted((out / "trainer").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    found = [p for p in found if complete(p)]
    return str(found[-1]) if found else None


class NoFinalCheckpoint:
    """A TrainerCallback that skips the checkpoint of the last step: ``save_trained`` writes the
    final weights right after, so a checkpoint there (weights and optimizer state) is wasted I/O."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_save = False
        return control


def train_resuming(trainer, out: Path) -> str | None:
    """Train, continuing from the last checkpoint a killed run left in ``out`` (its name, or None)."""
    trainer.add_callback(as_callback(NoFinalCheckpoint))
    resume = last_checkpoint(out)
    try:
        trainer.train(resume_from_checkpoint=resume)
    finally:
        for callback in trainer.callback_handler.callbacks:
            if isinstance(callback, TrainProgress):
                callback.close()
    return Path(resume).name if resume else None


def trainer_args(train: dict, hardware: dict, out: Path, seed: int) -> dict:
    """TrainingArguments shared by every TRL adapter. CPU needs bf16 and gradient checkpointing off
    (both default on in TRL 1.16; bf16 raises on CPU)."""
    import dataclasses

    from transformers import TrainingArguments

    on_cpu = resolve_device(hardware["device"]) == "cpu"
    # transformers >= 5.2x renamed gradient_checkpointing (TRL still defaults the old name to True)
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    checkpointing = (
        "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    )
    recompute = bool(hardware.get("gradient_checkpointing")) and not on_cpu
    micro, accumulation = batch_split(train, hardware)
    return dict(
        **{checkpointing: recompute},
        **({f"{checkpointing}_kwargs": {"use_reentrant": False}} if recompute else {}),
        output_dir=str(out / "trainer"),
        max_steps=train["steps"],
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accumulation,
        learning_rate=train["lr"],
        lr_scheduler_type=train["lr_scheduler"],
        **({"lr_scheduler_kwargs": dict(kwargs)} if (kwargs := train.get("lr_scheduler_kwargs")) else {}),
        warmup_steps=int(train["warmup_ratio"] * train["steps"]),
        weight_decay=train["weight_decay"],
        logging_steps=max(1, train["steps"] // 10),
        **checkpointing_args(hardware.get("checkpoint_steps")),
        report_to="none",
        seed=seed,
        data_seed=seed,
        bf16=hardware["dtype"] == "bfloat16" and not on_cpu,
        dataloader_pin_memory=False,
        use_cpu=on_cpu,
        disable_tqdm=True,
    )


class TrainProgress:
    """A TrainerCallback showing a bar of optimizer steps with the last logged loss and an ETA (plain
    lines every ~10 % without a terminal); rank 0 only, so that a multi-process run shows one."""

    def __init__(self):
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:  # a resumed run starts at its checkpoint's step
            self.bar = progress.Bar("train", state.max_steps, "steps", completed=state.global_step)
            self.bar.advance(0)  # shown during the first step too

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None and not control.should_log:  # else on_log moves it, with this step's loss
            self.bar.set(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            self.bar.note(loss=f"{float(logs['loss']):.4f}")
            self.bar.set(state.global_step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def as_callback(events: type):
    """An instance of ``events`` as a transformers TrainerCallback (every event it does not define is
    a no-op); transformers is imported here rather than at module import, which it slows down."""
    from transformers import TrainerCallback

    return type(f"{events.__name__}Callback", (events, TrainerCallback), {})()


def quiet_trainer(trainer) -> None:
    """Swap the trainer's dict-printing callbacks for our TrainProgress bar (train_resuming closes
    it however training ends)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(as_callback(TrainProgress))


def save_trained(trainer, tokenizer, out: Path) -> dict:
    """Save the final weights as a Hugging Face folder and keep the loss curve; drop the rest.
    Every process calls it (FSDP and ZeRO-3 gather the weights to save); rank 0 writes the rest."""
    trainer.save_model(str(out / "model"))
    processes = trainer.args.world_size
    if not trainer.is_world_process_zero():
        return {}
    tokenizer.save_pretrained(out / "model")
    history = trainer.state.log_history
    (out / "log_history.json").write_text(json.dumps(history, indent=1))
    shutil.rmtree(out / "trainer", ignore_errors=True)
    losses = [h["loss"] for h in history if "loss" in h]
    return {
        "steps": trainer.state.global_step,
        "final_loss": round(losses[-1], 4) if losses else None,
        "processes": processes,
    }


def sft_rows(records: list[dict], chat: bool) -> list[dict]:
    """TRL prompt/completion rows: conversational for chat models, plain strings otherwise."""
    if chat:
        return [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "completion": [{"role": "assistant", "content": r["completion"]}],
            }
            for r in records
        ]
    return [{"prompt": r["prompt"], "completion": r["completion"]} for r in records]


def lora_config(lora: dict | None):
    """A peft LoraConfig from ``train.lora``; None = full fine-tuning."""
    if not lora:
        return None
    from dataclasses import fields

    from peft import LoraConfig

    from selfimprove.config import Lora
    from selfimprove.engine.registry import ConfigError

    keys = sorted(f.name for f in fields(Lora))
    if not isinstance(lora, dict) or sorted(lora) != keys:
        raise ConfigError(f"train.lora={lora!r} must have exactly the keys {', '.join(keys)} (or be null)")

    targets = lora["target_modules"]
    return LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=targets if isinstance(targets, str) else list(targets),
        task_type="CAUSAL_LM",
    )


def fitting(records: list[dict], tokenizer, chat: bool, max_length: int) -> list[dict]:
    """The records whose prompt + completion (+ EOS, as TRL tokenizes them) fit ``max_length``
    tokens. A longer one would be cut by TRL before its final answer and teach the model to stop
    mid-rationale, so it is left out instead; when none fits, the stage fails with the fix."""
    if chat:
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}],
                tokenize=False,
            )
            for r in records
        ]
        lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    else:
        ids = tokenizer([r["prompt"] + r["completion"] for r in records])["input_ids"]
        lengths = [len(x) + 1 for x in ids]
    kept = [r for r, n in zip(records, lengths) if n <= max_length]
    if records and not kept:
        raise RunError(
            f"0 of {len(records)} examples fit max_length={max_length} (longest: {max(lengths)} tokens); "
            "raise the dataset's budgets (dataset.prompt_tokens, dataset.completion_tokens) or this "
            "stage's max_length"
        )
    return kept


def unchanged(lm, tokenizer, out: Path, meta: dict) -> dict:
    """Save the model as it is: a train stage with no examples (nothing was kept this iteration)."""
    lm.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    write_json_atomic(out / "model_meta.json", meta)
    return {"examples": 0, "steps": 0}


def fine_tune(
    out: Path,
    model: Artifact,
    data: Artifact,
    train: dict,
    hardware: dict,
    seed: int,
    make_trainer=None,
    columns: tuple[str, ...] = (),
    counts=None,
) -> dict:
    """The body of a train stage on ``data``'s prompt/completion records: load ``model``, drop the
    records too long for ``train.max_length``, train with ``make_trainer(lm, **trainer_kwargs)``
    (TRL's SFTTrainer by default), save model/ and model_meta.json. ``columns`` are record keys
    carried into the trainer's rows beside prompt and completion; ``counts(kept)`` adds to the
    stage's counts."""
    import os

    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    records = read_jsonl(data.file("train.jsonl"))
    torch.manual_seed(seed)
    # the trainer's arguments first: under DeepSpeed ZeRO-3 they must exist when the model loads
    config = SFTConfig(
        **trainer_args(train, hardware, out, seed), max_length=train["max_length"], packing=False
    )
    lm, tokenizer = load_model(model, hardware, for_training=True, place=not launched())
    chat = uses_chat_template(model, tokenizer)
    if not records:  # e.g. no sample was right this iteration and nothing is replayed
        return unchanged(lm, tokenizer, out, {"chat_template": chat})
    kept = fitting(records, tokenizer, chat, train["max_length"])
    rows = [{**row, **{c: r[c] for c in columns}} for row, r in zip(sft_rows(kept, chat), kept)]
    peft_config = lora_config(train.get("lora"))
    trainer = (make_trainer or (lambda lm, **kwargs: SFTTrainer(model=lm, **kwargs)))(
        lm,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    quiet_trainer(trainer)
    carry = bool(train.get("carry_optimizer"))  # one process, full weights: preflight.py checks it
    carried = carry and carry_optimizer(trainer, model)
    resumed_from = train_resuming(trainer, out)
    saved = save_trained(trainer, tokenizer, out)
    if not trainer.is_world_process_zero():
        return {}
    if carry:
        torch.save(trainer.optimizer.state_dict(), out / "model" / OPTIMIZER_STATE)
    meta = {"chat_template": chat}
    if peft_config is not None:  # the stage folder is renamed into place, so a relative path holds
        meta["adapter_base"] = os.path.relpath(model.path, out)
    write_json_atomic(out / "model_meta.json", meta)
    return {
        "examples": len(kept),
        "too_long": len(records) - len(kept),
        **(counts(kept) if counts else {}),
        "lora": peft_config is not None,
        "resumed_from": resumed_from,
        **({"carried_optimizer": carried} if carry else {}),
        **saved,
    }


#: the AdamW state a train stage with train.carry_optimizer keeps beside its model's weights
OPTIMIZER_STATE = "optimizer.pt"


def carry_optimizer(trainer, model: Artifact) -> bool:
    """Start the trainer's optimizer from the moments ``model``'s own train stage kept (a model with
    none, e.g. the initial one, starts fresh). Only the per-parameter state is taken: the learning
    rate, weight decay and schedule are this stage's. Returns whether a state was loaded."""
    import torch

    state = model.file(f"model/{OPTIMIZER_STATE}")
    if not state.exists():
        return False
    trainer.create_optimizer()
    fresh = trainer.optimizer.state_dict()
    kept = torch.load(state, weights_only=True)
    trainer.optimizer.load_state_dict({"state": kept["state"], "param_groups": fresh["param_groups"]})
    return True


@stage(name="sft", version=2, resumable=True)
@accelerated
def sft(out: Path, model: Artifact, data: Artifact, train: dict, hardware: dict, seed: int) -> dict:
    """Stage: fine-tune ``model`` on ``data``'s prompt/completion records; writes model/ (full
    weights, or a LoRA adapter with ``train.lora``) and model_meta.json."""
    return fine_tune(out, model, data, train, hardware, seed)
