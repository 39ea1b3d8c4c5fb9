"""Everything that would stop a run, checked before it writes anything, and what `selfimprove plan`
shows: the task's capabilities against the method's needs, the model's context against the
dataset's budgets, batch splits, backends, and each stage's peak memory against the hardware's.

``check_config(cfg)`` and ``check_plan(cfg, planned)`` raise ConfigError (one line, naming the
fixes); the first returns notes to say once (a stage left out because the task lacks what it
needs). ``estimates(cfg, planned)`` gives the memory estimate of each stage that loads a model
(selfimprove/memory.py does the arithmetic).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from selfimprove import tasks, validation
from selfimprove.engine.pipeline import Run, StageStatus, plain
from selfimprove.engine.registry import ConfigError
from selfimprove.memory import Arch, format_bytes, generation_peak, training_peak
from selfimprove.methods import METHODS
from selfimprove.training import launch

GB = 1e9
#: the training stages, by their registered name: TRL trainer kind of the estimate
TRAINERS = {"sft": "sft", "dpo": "dpo", "grpo": "grpo", "score_rl": "grpo", "spc_offline_rl": "sft"}
#: training stages (by registered name) that always hold a frozen reference model beside the policy
WITH_REFERENCE = {"spc_offline_rl"}
#: stages (by registered name) whose sequences hold two attempts (SCoRe's and Self-Refine's episodes)
TWO_TURN = {"two_turn_eval", "sample_episodes", "refine_round", "draft", "score_rl"}
#: memory assumed per GPU when planning for GPUs on a machine without one (A100/H100 80 GB)
ASSUMED_GPU_GB = 80


def needs(cfg: DictConfig) -> list[tasks.Need]:
    """The task capabilities the configured method uses (its module's ``needs``)."""
    method = METHODS.get(cfg.method.name)
    return sys.modules[method.__module__].needs(cfg)


def check_config(cfg: DictConfig) -> list[str]:
    """Before the method is walked: the task's capabilities against the method's needs, the model
    against the dataset. Refuses (ConfigError) what cannot run; returns the notes to print once."""
    validation.check_settings(cfg)
    notes = tasks.check_needs(cfg.method.name, cfg.dataset, needs(cfg)) + validation.zero_iterations(cfg)
    check_context(cfg)
    check_two_turn_rl(cfg)
    return notes


def check_plan(cfg: DictConfig, planned: Run) -> None:
    """After the method is walked: every training stage's batch and backend, and every stage's
    estimated peak memory against the hardware's."""
    check_trainers(cfg, planned)
    for estimate in estimates(cfg, planned):
        if estimate.total > estimate.available:
            raise ConfigError(refusal(cfg, estimate))


# -- the model against the dataset ------------------------------------------------------------------
def check_context(cfg: DictConfig) -> None:
    """The dataset's budgets (prompt + completion, two attempts for two-turn methods) must fit the
    model's context: the character model holds 256 characters, which no text dataset fits."""
    model, dataset = plain(cfg.model), plain(cfg.dataset)
    arch = arch_of(model)
    context = arch.context if arch else None
    two_turn = cfg.method.name in ("score", "self_refine")
    needed = dataset["two_turn_tokens"] if two_turn else dataset["sequence_tokens"]
    if context and needed > context:
        kind = "two-turn episodes of " if two_turn else ""
        raise ConfigError(
            f"model '{model['name']}' holds {context} tokens, but {kind}dataset '{tasks.label(dataset)}' need"
            f"{'' if two_turn else 's'} "
            f"{needed} (dataset.prompt_tokens={dataset['prompt_tokens']}, completion_tokens="
            f"{dataset['completion_tokens']}); use a model with a longer context (model=tiny_qwen offline, "
            "or a hub model) or lower the dataset's budgets"
        )


def chat_setting(model: dict) -> bool | None:
    """Whether prompts go through a chat template, when the config can tell without a download."""
    setting = model.get("chat_template", False)
    if setting in (True, False):
        return setting
    config = hub_file(model, "tokenizer_config.json")
    return None if config is None else bool(config.get("chat_template"))


def check_two_turn_rl(cfg: DictConfig) -> None:
    """SCoRe's RL rollouts continue attempt 1 with the instruction as plain text: a chat model's
    second turn is a new user message, which one continued completion cannot be."""
    if cfg.method.name == "score" and cfg.method.variant == "score" and chat_setting(plain(cfg.model)):
        raise ConfigError(
            f"method=score (variant=score) trains two attempts as one plain-text completion, and model "
            f"'{cfg.model.name}' uses a chat template; use a base model (e.g. model=qwen1.5b-base), "
            "model.chat_template=false, or method.variant=star_sft | pair_sft"
        )


def check_trainers(cfg: DictConfig, planned: Run) -> None:
    """Each training stage's batch splits over the devices (and RL's into whole groups)."""
    for status in planned.plan:
        if trainer_kind(status) is None:
            continue
        try:
            launch.batch_split(status.inputs["train"], status.inputs["hardware"])
        except ConfigError as err:
            raise ConfigError(f"{status.name}: {err}") from None
    check_carried_optimizers(planned)


#: the stages (by registered name) that train through training/sft.py:fine_tune, which carries the
#: optimizer state with train.carry_optimizer; any other training stage would ignore the setting
CARRIES_OPTIMIZER = {"sft", "spc_offline_rl"}


def check_carried_optimizers(planned: Run) -> None:
    """train.carry_optimizer only where it is done: a fine_tune stage, full weights, one process."""
    for status in planned.plan:
        train = status.inputs.get("train")
        if not isinstance(train, dict) or not train.get("carry_optimizer"):
            continue
        name = status.fn.stage_name if status.fn is not None else None
        if name not in CARRIES_OPTIMIZER:
            why = f"its trainer ({name}) does not carry optimizer state"
        elif train.get("lora"):
            why = "it trains a LoRA adapter"
        elif launch.processes(status.inputs["hardware"]) > 1:
            why = "it trains in several processes"
        else:
            continue
        raise ConfigError(
            f"{status.name}: train.carry_optimizer=true keeps one process's full-model AdamW state "
            f"in supervised fine-tuning, and {why}; set carry_optimizer=false there"
        )


def missing_packages(planned: Run) -> list[str]:
    """What the stages ask for that this machine has not installed (vLLM inside TRL)."""
    for status in planned.plan:
        rl = status.inputs.get("rl") or {}
        if rl.get("use_vllm") and importlib.util.find_spec("vllm") is None:
            return [
                f"{status.name}: method.rl.use_vllm=true needs vLLM, which is not installed; "
                'pip install -e ".[vllm]" or set method.rl.use_vllm=false'
            ]
    return []


# -- memory ----------------------------------------------------------------------------------------
@dataclass
class Estimate:
    """A stage kind's peak memory per device, against what the hardware has."""

    stages: list[str]
    kind: str
    settings: str
    parts: dict[str, int]
    available: float
    lora: bool = False
    sharded: bool = False
    micro_batch: int = 1

    @property
    def total(self) -> int:
        return self.parts["total"]

    def line(self) -> str:
        big = {k: v for k, v in self.parts.items() if k != "total" and v >= 0.05 * self.total}
        shown = ", ".join(f"{k} {format_bytes(v)}" for k, v in big.items())
        return f"{format_bytes(self.total)} of {format_bytes(self.available)} ({shown})"


def hub_file(model: dict, name: str) -> dict | None:
    """A JSON file of a hub model from its local folder or the Hugging Face cache; None when it is
    not on this machine (planning never downloads)."""
    path = Path(str(model.get("name_or_path", ""))).expanduser()
    if path.is_dir():
        return json.loads((path / name).read_text()) if (path / name).exists() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(str(model["name_or_path"]), name, revision=model.get("revision"))
    except Exception:  # an id the cache cannot even look up
        return None
    return json.loads(Path(found).read_text()) if isinstance(found, str) else None


def hub_arch(model: dict) -> Arch | None:
    """A hub model's shape from its config.json in the local folder or the Hugging Face cache."""
    config = hub_file(model, "config.json")
    if config is None:
        return None
    from transformers import AutoConfig

    return Arch.from_hf_config(AutoConfig.for_model(**config))


def arch_of(model: dict) -> Arch | None:
    """The model's shape without loading it: a local model's from its keys, a hub model's from
    ``model.arch`` or its config.json on this machine; None when unknown."""
    if model["source"] == "tiny":
        from selfimprove.models import char_tokenizer

        chars = model.get("tokenizer", "char") == "char"
        vocab = len(char_tokenizer(bos=model["bos"])) if chars else model["vocab_size"]
        return Arch(
            hidden_size=model["hidden_size"],
            num_layers=model["num_layers"],
            num_heads=model["num_heads"],
            num_kv_heads=model.get("num_kv_heads") or model["num_heads"],
            intermediate_size=model["intermediate_size"],
            vocab_size=vocab,
            tied_embeddings=True,
            qkv_bias=model.get("architecture") == "qwen2",
            context=model["max_position_embeddings"],
        )
    return Arch(**model["arch"]) if model.get("arch") else hub_arch(model)


def device_of(hardware: dict) -> str:
    device = str(hardware["device"])
    if device == "auto":
        from selfimprove.config import gpu_count

        return "cuda" if gpu_count() else "cpu"
    return device


def gpu_elsewhere(hardware) -> bool:
    """A run for GPUs planned on a machine without one (its settings describe another machine)."""
    from selfimprove.config import gpu_count

    return str(getattr(hardware["device"], "value", hardware["device"])) == "cuda" and gpu_count() == 0


def memory_of(hardware: dict) -> float:
    """Bytes per device: hardware.memory_gb, else this machine's RAM (CPU) or GPU, else 80 GB."""
    if hardware.get("memory_gb"):
        return float(hardware["memory_gb"]) * GB
    if device_of(hardware) == "cpu":
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    from selfimprove.config import gpu_count

    if gpu_count():
        import torch

        return float(torch.cuda.get_device_properties(0).total_memory)
    return ASSUMED_GPU_GB * GB


def trainer_kind(status: StageStatus) -> str | None:
    fn = status.fn
    return TRAINERS.get(fn.stage_name) if fn is not None else None


def training_estimate(arch: Arch, status: StageStatus, kind: str, dataset: dict) -> Estimate:
    train, hardware = status.inputs["train"], status.inputs["hardware"]
    rl = status.inputs.get("rl") or {}
    micro, accumulation = launch.batch_split(train, hardware)
    processes = launch.processes(hardware)
    seq_len = train["max_length"]
    if kind == "grpo":  # the prompt plus the completions (two attempts and the instruction in SCoRe)
        attempts = 2 if status.fn.stage_name == "score_rl" else 1
        seq_len = dataset["prompt_tokens"] + attempts * rl["max_completion_length"]
        seq_len += dataset["turn_tokens"] if attempts == 2 else 0
    device, lora, sharding = (
        device_of(hardware),
        train.get("lora"),
        launch.sharding(hardware.get("accelerate")),
    )
    parts = training_peak(
        arch,
        trainer=kind,
        micro_batch=micro,
        seq_len=seq_len,
        dtype=str(hardware["dtype"]),
        device=device,
        processes=processes,
        sharding=sharding,
        gradient_checkpointing=bool(hardware.get("gradient_checkpointing")) and device != "cpu",
        lora=lora,
        reference_model=(kind == "grpo" and rl.get("beta", 0) > 0) or status.fn.stage_name in WITH_REFERENCE,
        generation_batch=0 if rl.get("use_vllm") else train["batch_size"] // processes,
    )
    available = memory_of(hardware)
    if rl.get("use_vllm") and rl.get("vllm_mode", "colocate") == "colocate":  # TRL's vLLM shares the GPU
        share = (rl.get("extra") or {}).get("vllm_gpu_memory_utilization", 0.3)
        parts = {**parts, "vllm": int(share * available), "total": parts["total"] + int(share * available)}
    how = f"LoRA r={lora['r']}" if lora else "full fine-tuning"
    settings = (
        f"{how}, lr {train['lr']:g}, batch {train['batch_size']} = {processes} device(s) x micro {micro} "
        f"x accumulation {accumulation}, {seq_len} tokens"
    )
    return Estimate(
        [status.name],
        f"train ({kind.upper()})",
        settings,
        parts,
        available,
        lora=bool(lora),
        sharded=sharding != "none",
        micro_batch=micro,
    )


def generation_estimate(arch: Arch, status: StageStatus, dataset: dict) -> Estimate:
    generator, hardware = status.inputs["generator"], status.inputs["hardware"]
    engine = str(generator["backend"])
    engine = "hf" if engine == "auto" else engine
    seq_len = dataset["two_turn_tokens"] if status.fn.stage_name in TWO_TURN else dataset["sequence_tokens"]
    sampling = status.inputs.get("sampling") or {}
    if sampling.get("max_tokens"):
        seq_len = dataset["prompt_tokens"] + sampling["max_tokens"]
    parts = generation_peak(
        arch, sequences=generator["batch_size"], seq_len=seq_len, dtype=str(hardware["dtype"]), engine=engine
    )
    available = memory_of(hardware)
    if engine == "vllm" and device_of(hardware) == "cuda":
        available *= hardware["gpu_memory_utilization"]
    settings = f"{engine}, {generator['batch_size'] if engine == 'hf' else 'vLLM-scheduled'} sequences x {seq_len} tokens"
    return Estimate([status.name], f"generate ({engine})", settings, parts, available)


def estimates(cfg: DictConfig, planned: Run) -> list[Estimate]:
    """The peak memory of every stage that loads the model, grouped by kind and settings (the
    stages that share both share the estimate). Empty when the model's shape is unknown."""
    arch = arch_of(plain(cfg.model))
    if arch is None:
        return []
    dataset = plain(cfg.dataset)
    grouped: dict[tuple, Estimate] = {}
    for status in planned.plan:
        kind = trainer_kind(status)
        if kind is not None:
            estimate = training_estimate(arch, status, kind, dataset)
        elif status.fn is not None and {"generator", "hardware"} <= set(status.inputs):
            estimate = generation_estimate(arch, status, dataset)
        else:
            continue
        key = (estimate.kind, estimate.settings)
        if key in grouped:
            grouped[key].stages.append(status.name)
        else:
            grouped[key] = estimate
    return list(grouped.values())


def refusal(cfg: DictConfig, estimate: Estimate) -> str:
    """One line: which stages do not fit, by how much, and the fixes that would help."""
    fixes = []
    on_gpu = device_of(plain(cfg.hardware)) == "cuda"
    # what stays whatever the batch: the model, its optimizer state, a reference copy, TRL's vLLM
    static = sum(estimate.parts.get(k, 0) for k in ("weights", "optimizer", "reference", "vllm"))
    if not on_gpu:
        fixes.append("a GPU (hardware=gpu)")
    if estimate.kind.startswith("train"):
        if not estimate.lora:
            fixes.append(
                "a LoRA adapter (model.optim.lora='{r: 64, alpha: 128, dropout: 0.05, target_modules: all-linear}')"
            )
        if not estimate.sharded and on_gpu:
            fixes.append("sharded training over several GPUs (hardware=gpu8: FSDP)")
        if estimate.micro_batch > 1 and static < estimate.available:
            fixes.append(
                f"a smaller micro-batch (model.optim.micro_batch_size={max(1, estimate.micro_batch // 2)})"
            )
        if not cfg.hardware.gradient_checkpointing and on_gpu and static < estimate.available:
            fixes.append("hardware.gradient_checkpointing=true")
    else:
        fixes.append("a smaller generator.batch_size or dataset.completion_tokens")
        fixes.append("tensor parallelism (hardware.tensor_parallel_size)")
    fixes.append("a smaller model")
    stages = estimate.stages[0] + (f" (+{len(estimate.stages) - 1} more)" if len(estimate.stages) > 1 else "")
    return (
        f"{stages}: {estimate.kind} of {cfg.model.name} ({estimate.settings}) needs ~{format_bytes(estimate.total)} "
        f"per device, hardware '{cfg.hardware.name}' has {format_bytes(estimate.available)}; fixes: "
        + "; ".join(fixes)
    )
