"""Preference optimisation with TRL's DPOTrainer on prompt/chosen/rejected pairs.

The pairs artifact holds ``pairs.jsonl`` records ``{"id", "prompt", "chosen", "rejected", "meta"}``.
``train`` has SFT's shape (steps, batch_size, lr, lr_scheduler, warmup_ratio, max_length, lora)
plus ``beta`` (the inverse temperature of the implicit reward) and ``loss_type`` (sigmoid = DPO,
hinge, ipo, ...: TRL's names). ``reference`` is the frozen model of the DPO loss; None = a frozen
copy of ``model`` (what TRL does by itself; with LoRA, the model with its adapter disabled).
SPIN and Self-Rewarding pass the previous iterate explicitly.

Chat models get TRL's conversational format, as in ``sft.sft_rows``.
"""

from __future__ import annotations

import os
from pathlib import Path

from selfimprove.engine.pipeline import Artifact, read_jsonl, stage, write_json_atomic
from selfimprove.engine.registry import ConfigError
from selfimprove.models import load_model, uses_chat_template
from selfimprove.training.launch import accelerated, launched
from selfimprove.training.sft import lora_config, quiet_trainer, save_trained, train_resuming, trainer_args


def dpo_rows(records: list[dict], chat: bool) -> list[dict]:
    """TRL preference rows: conversational for chat models, plain strings otherwise."""
    if chat:
        turn = lambda role, text: [{"role": role, "content": text}]  # noqa: E731
        return [
            {
                "prompt": turn("user", r["prompt"]),
                "chosen": turn("assistant", r["chosen"]),
                "rejected": turn("assistant", r["rejected"]),
            }
            for r in records
        ]
    return [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in records]


def last_logged(history: list[dict], key: str, first: bool = False) -> float | None:
    values = [h[key] for h in history if key in h]
    return round(values[0 if first else -1], 4) if values else None


@stage(name="dpo", version=1, resumable=True)
@accelerated
def dpo(
    out: Path,
    model: Artifact,
    pairs: Artifact,
    train: dict,
    hardware: dict,
    seed: int,
    reference: Artifact | None = None,
) -> dict:
    """Stage: DPO of ``model`` on ``pairs`` against ``reference``; writes model/ and model_meta.json.
    No pairs: the model is saved unchanged (``steps`` 0), so that an iteration that found no
    preference still yields a model."""
    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    records = read_jsonl(pairs.file("pairs.jsonl"))
    torch.manual_seed(seed)
    config = DPOConfig(
        **trainer_args(train, hardware, out, seed),
        beta=train["beta"],
        loss_type=train["loss_type"],
        max_length=train["max_length"],
    )
    lm, tokenizer = load_model(model, hardware, for_training=True, place=not launched())
    chat = uses_chat_template(model, tokenizer)
    meta = {"chat_template": chat}
    if not records:
        lm.save_pretrained(out / "model")
        tokenizer.save_pretrained(out / "model")
        write_json_atomic(out / "model_meta.json", meta)
        return {"pairs": 0, "steps": 0}
    peft_config = lora_config(train.get("lora"))
    ref = None
    if reference is not None and Path(reference.path) != Path(model.path):
        if peft_config is not None:
            raise ConfigError(
                "train.lora with a reference model other than the trained one is not supported; "
                "set train.lora=null or train from the reference"
            )
        ref = load_model(reference, hardware, place=not launched())[0]
    trainer = DPOTrainer(
        model=lm,
        ref_model=ref,
        args=config,
        train_dataset=Dataset.from_list(dpo_rows(records, chat)),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    quiet_trainer(trainer)
    resumed_from = train_resuming(trainer, out)
    saved = save_trained(trainer, tokenizer, out)
    if not trainer.is_world_process_zero():
        return {}
    if peft_config is not None:  # the stage folder is renamed into place, so a relative path holds
        meta["adapter_base"] = os.path.relpath(model.path, out)
    write_json_atomic(out / "model_meta.json", meta)
    history = trainer.state.log_history
    return {
        "pairs": len(records),
        "margin_first": last_logged(history, "rewards/margins", first=True),
        "margin_last": last_logged(history, "rewards/margins"),
        "pair_accuracy_last": last_logged(history, "rewards/accuracies"),
        "resumed_from": resumed_from,
        **saved,
    }
