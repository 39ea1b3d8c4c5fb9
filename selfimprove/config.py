"""Typed schemas for the config tree (conf/). Each YAML option extends one of these, so a wrong
type, a bad enum value or an unknown key fails at composition with the key's name.

Defaults live in the YAML files (with a comment per key); the schemas hold only types.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

SCHEMA_PREFIX = "schema_"
CONF_DIR = Path(__file__).resolve().parent / "conf"


class Backend(str, Enum):
    auto = "auto"
    hf = "hf"
    vllm = "vllm"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class DType(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class OnChange(str, Enum):
    recompute = "recompute"
    refuse = "refuse"


class LoggerKind(str, Enum):
    none = "none"
    wandb = "wandb"


class Isolation(str, Enum):
    auto = "auto"
    namespaces = "namespaces"
    guarded = "guarded"


class Better(str, Enum):
    """Which way a report column improves: its best value is shown in bold (none: no bold)."""

    higher = "higher"
    lower = "lower"
    none = "none"


class StepsRule(str, Enum):
    """How STaR's fine-tuning steps grow per iteration: linear adds, compound multiplies (the paper's)."""

    linear = "linear"
    compound = "compound"


class UpdateRule(str, Enum):
    """How SPC updates its roles from a round's games: sft on the winning moves, or offline_rl on
    every move with its +1/-1 outcome (the paper's released code)."""

    sft = "sft"
    offline_rl = "offline_rl"


class WandbMode(str, Enum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


# -- model -------------------------------------------------------------------------------------
@dataclass
class LearningRates:
    sft: float = MISSING
    rl: float = MISSING
    dpo: float = MISSING


@dataclass
class Optim:
    """A model size's optimiser settings (conf/model/optim/*.yaml), read by the methods' train nodes."""

    # true where the YAML derives it from the hardware (7-8 B: LoRA unless training is sharded)
    sharded: Any = None
    lr: LearningRates = MISSING
    micro_batch_size: int = MISSING
    # a Lora node or None (typed Any as Train.lora); adapter: the one ``lora`` may point to
    adapter: Any = None
    lora: Any = None


@dataclass
class Arch:
    """A hub model's shape (its config.json), for `selfimprove plan` without a download."""

    hidden_size: int = MISSING
    num_layers: int = MISSING
    num_heads: int = MISSING
    num_kv_heads: int = MISSING
    intermediate_size: int = MISSING
    vocab_size: int = MISSING
    tied_embeddings: bool = MISSING
    qkv_bias: bool = MISSING
    context: int = MISSING


@dataclass
class TinyModel:
    source: str = MISSING
    name: str = MISSING
    init_seed: int | None = None
    architecture: str = MISSING
    tokenizer: str = MISSING
    vocab_size: int | None = None
    characters: str | None = None
    chat_template: bool = MISSING
    hidden_size: int = MISSING
    num_layers: int = MISSING
    num_heads: int = MISSING
    num_kv_heads: int | None = None
    intermediate_size: int = MISSING
    max_position_embeddings: int = MISSING
    position_encoding: str = MISSING
    rope_theta: float = MISSING
    bos: bool = MISSING
    optim: Optim = MISSING


@dataclass
class HubModel:
    source: str = MISSING
    name: str = MISSING
    name_or_path: str = MISSING
    revision: str | None = None
    trust_remote_code: bool = False
    # true | false | auto (bool or the string "auto": OmegaConf has no bool|str union)
    chat_template: Any = MISSING
    arch: Arch | None = None
    optim: Optim = MISSING


# -- dataset -----------------------------------------------------------------------------------
@dataclass
class TokenBudgets:
    """Every dataset's token budgets (conf/dataset/*.yaml) and the lengths derived from them
    (conf/dataset/common/lengths.yaml): methods size their sampling and max_length by these."""

    prompt_tokens: int = MISSING
    completion_tokens: int = MISSING
    turn_tokens: int = MISSING
    sequence_tokens: int = MISSING
    two_turn_tokens: int = MISSING


@dataclass
class ArithmeticData(TokenBudgets):
    name: str = MISSING
    seed: int = MISSING
    test_seed: int = MISSING
    seed_levels: list[int] = MISSING
    seed_per_level: int = MISSING
    few_shot_per_level: int = MISSING
    train_levels: list[int] = MISSING
    train_per_iteration: int = MISSING
    test_levels: list[int] = MISSING
    test_per_level: int = MISSING


@dataclass
class ReversedAdditionData(TokenBudgets):
    name: str = MISSING
    seed: int = MISSING
    test_seed: int = MISSING
    seed_levels: list[int] = MISSING
    seed_per_level: int = MISSING
    seed_lengths: str = MISSING
    pad_answers: bool = MISSING
    train_per_iteration: int = MISSING
    test_levels: list[int] = MISSING
    test_per_level: int = MISSING


@dataclass
class DataSource:
    path: str = MISSING
    subset: str | None = None
    split: str = MISSING
    revision: str | None = None


@dataclass
class HFMathData(TokenBudgets):
    name: str = MISSING
    seed: int = MISSING
    train: DataSource = MISSING
    test: DataSource = MISSING
    question_key: str = MISSING
    solution_key: str | None = None
    answer_key: str | None = None
    test_group_key: str | None = None
    seed_size: int = MISSING
    train_per_iteration: int = MISSING
    test_size: int | None = None
    prompt_template: str = MISSING


@dataclass
class GymData(TokenBudgets):
    name: str = MISSING
    task: str = MISSING
    task_config: dict[str, Any] = field(default_factory=dict)
    seed: int = MISSING
    test_seed: int = MISSING
    seed_size: int = MISSING
    train_per_iteration: int = MISSING
    test_size: int = MISSING
    prompt_template: str = MISSING


@dataclass
class Sandbox:
    timeout: float = MISSING
    cpu_seconds: int = MISSING
    memory_mb: int = MISSING
    nproc: int = MISSING
    file_size_mb: int = MISSING
    disk_mb: int = MISSING
    open_files: int = MISSING
    output_bytes: int = MISSING
    isolation: Isolation = MISSING
    python: str | None = None


@dataclass
class HumanEvalData(TokenBudgets):
    name: str = MISSING
    seed: int = MISSING
    train_size: int = MISSING
    test_size: int | None = None
    prompt_template: str = MISSING
    workers: int = MISSING
    sandbox: Sandbox = MISSING


# -- method ------------------------------------------------------------------------------------
@dataclass
class Sampling:
    n: int = MISSING
    temperature: float = MISSING
    top_p: float = MISSING
    max_tokens: int = MISSING
    stop: list[str] = field(default_factory=list)
    # null = no log-probabilities; k >= 0 = record each sampled token's log-probability in
    # meta.logprobs, plus the k most likely alternatives per token in meta.top_logprobs when k > 0
    logprobs: int | None = None
    # null = no top-k cut of our own (the hf backend then applies the model's generation_config
    # top_k, 50 unless the model sets one; vLLM none); k >= 1 = sample among the k likeliest tokens
    top_k: int | None = None


@dataclass
class Lora:
    r: int = MISSING
    alpha: int = MISSING
    dropout: float = MISSING
    # a list of module names, or the string "all-linear"
    target_modules: Any = MISSING


@dataclass
class Train:
    steps: int = MISSING
    steps_growth: int = 0
    # sequences per optimizer step over all devices; micro_batch_size per device and forward pass
    # (gradient accumulation makes up the rest)
    batch_size: int = MISSING
    micro_batch_size: int = MISSING
    lr: float = MISSING
    lr_scheduler: str = MISSING
    # keyword arguments of the scheduler (transformers' lr_scheduler_kwargs), e.g. warmup_stable_decay's
    # {num_decay_steps: 500, min_lr_ratio: 0.01} or cosine_with_min_lr's {min_lr_rate: 0.01}; None = none
    lr_scheduler_kwargs: Any = None
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    # keep the AdamW moments with the trained model and start the next train stage of that model
    # from them (Lee et al. resume each round's optimizer); one process, full fine-tuning only
    carry_optimizer: bool = False
    max_length: int = MISSING
    # a Lora node or None; typed Any because OmegaConf cannot merge a dict override into a None
    # structured node (checked in training/sft.py:lora_config against Lora's fields)
    lora: Any = None


@dataclass
class Star:
    name: str = MISSING
    iterations: int = MISSING
    sampling: Sampling = MISSING
    rationalize: bool = MISSING
    rationalize_sampling: Sampling = MISSING
    warmstart_hint_fraction: float = MISSING
    accumulate: bool = MISSING
    max_per_prompt: int = MISSING
    replay_seed_data: bool = MISSING
    train_on_samples: bool = MISSING
    restart_from_base: bool = MISSING
    steps_rule: StepsRule = MISSING
    steps_factor: float = MISSING
    warmstart: Train = MISSING
    train: Train = MISSING


@dataclass
class Curriculum:
    digits: int = MISSING
    steps: int = MISSING


@dataclass
class LengthGen:
    name: str = MISSING
    rounds: int = MISSING
    labelling: Sampling = MISSING
    filter: str = MISSING
    history: bool = MISSING
    replay_min: int = MISSING
    advance_at: float | None = None
    vote_draws: list[int] = field(default_factory=list)
    majority: float = 0.7
    # a Curriculum or None; typed Any like Train.lora (OmegaConf cannot merge a dict into a None
    # structured node), checked by methods/length_gen.py against Curriculum's fields
    curriculum: Any = None
    warmstart: Train = MISSING
    train: Train = MISSING


@dataclass
class RestEm:
    name: str = MISSING
    iterations: int = MISSING
    sampling: Sampling = MISSING
    reward_threshold: float = MISSING
    max_per_prompt: int = MISSING
    fixed_prompts: bool = MISSING
    replay_seed_data: bool = MISSING
    warmstart: Train = MISSING
    train: Train = MISSING


@dataclass
class DpoTrain(Train):
    beta: float = MISSING
    loss_type: str = MISSING


@dataclass
class Spin:
    name: str = MISSING
    iterations: int = MISSING
    prompts_per_iteration: int | None = None
    sampling: Sampling = MISSING
    mix_previous: bool = MISSING
    warmstart: Train = MISSING
    train: DpoTrain = MISSING


@dataclass
class JudgeSettings:
    name: str = MISSING
    samples: int = MISSING
    temperature: float = MISSING
    max_tokens: int = MISSING


@dataclass
class SelfRewarding:
    name: str = MISSING
    iterations: int = MISSING
    sampling: Sampling = MISSING
    judge: JudgeSettings = MISSING
    judge_examples_fraction: float = MISSING
    anchored_rejection: bool = MISSING
    future_guided_chosen: bool = MISSING
    warmstart: Train = MISSING
    train: DpoTrain = MISSING


# -- report ------------------------------------------------------------------------------------
@dataclass
class ReportColumn:
    metric: str = MISSING
    iteration: Any = MISSING  # an integer, first or last
    title: str | None = None
    minus: Any = None
    # this column's number format; null = the report's scale / decimals
    scale: float | None = None
    decimals: int | None = None
    # which way is better (accuracy: higher; a wrong-answer rate: lower; a count: none)
    better: Better = Better.higher
    # the title as LaTeX source (e.g. $\Delta^{i\to c}$); null = the title, escaped
    latex: str | None = None


@dataclass
class Provenance:
    """Where a contract's figures were measured."""

    machine: str = MISSING
    commit: str = MISSING
    date: str = MISSING
    command: str = MISSING


@dataclass
class ExpectedRow:
    # the row's label as `selfimprove report` prints it (all runs: a single setting)
    setting: str = MISSING
    # seeds averaged in the recorded row; null = not checked
    seeds: int | None = None
    # column title -> the recorded mean, or {value: x, tolerance: y} for a cell's own tolerance
    cells: dict[str, Any] = MISSING


@dataclass
class Expected:
    source: Provenance = MISSING
    tolerance: float = MISSING
    rows: list[ExpectedRow] = MISSING


@dataclass
class Report:
    title: str | None = MISSING
    columns: list[ReportColumn] | None = MISSING
    plots: list[str] | None = MISSING
    scale: float = MISSING
    decimals: int = MISSING
    expected: Expected | None = MISSING


@dataclass
class BalanceSearch:
    queries: int = MISSING
    temperatures: list[float] = MISSING
    n: list[int] = MISSING
    thresholds: list[float] = MISSING
    n_star: int = MISSING


@dataclass
class Bstar:
    name: str = MISSING
    iterations: int = MISSING
    sampling: Sampling = MISSING
    search: BalanceSearch = MISSING
    monitor_s: list[int] = MISSING
    max_per_prompt: int = MISSING
    replay_seed_data: bool = MISSING
    warmstart: Train = MISSING
    train: Train = MISSING


@dataclass
class Uncertainty:
    measure: str = MISSING
    samples: int = MISSING
    temperature: float = MISSING
    threshold: float = MISSING


@dataclass
class Synthesis:
    teacher: str | None = None
    problems: int = MISSING
    solutions: int = MISSING
    temperature: float = MISSING
    verify: bool = MISSING


@dataclass
class Adapt:
    steps: int = MISSING
    lr: float = MISSING
    rank: int = MISSING
    alpha: int = MISSING
    target_modules: Any = MISSING
    items_per_adapter: int = MISSING


@dataclass
class TtSi:
    name: str = MISSING
    warmstart: Train = MISSING
    uncertainty: Uncertainty = MISSING
    synthesis: Synthesis = MISSING
    adapt: Adapt = MISSING


@dataclass
class SelfRefine:
    name: str = MISSING
    max_rounds: int = MISSING
    feedback: str = MISSING
    two_turn_fraction: float = MISSING
    refine_sampling: Sampling = MISSING
    critique_tokens: int = MISSING
    warmstart: Train = MISSING


@dataclass
class RL:
    num_generations: int = MISSING
    temperature: float = MISSING
    max_completion_length: int = MISSING
    beta: float = MISSING
    loss_type: str = MISSING
    use_vllm: bool = MISSING
    vllm_mode: str = MISSING
    # any other GRPOConfig field
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Grpo:
    name: str = MISSING
    iterations: int = MISSING
    warmstart: Train = MISSING
    train: Train = MISSING
    rl: RL = MISSING


@dataclass
class Score:
    name: str = MISSING
    variant: str = MISSING
    two_turn_fraction: float = MISSING
    warmstart: Train = MISSING
    stage2_iterations: int = MISSING
    alpha: float = MISSING
    beta_stage1: float = MISSING
    train: Train = MISSING
    rl: RL = MISSING
    star_iterations: int = MISSING
    traces: Sampling = MISSING
    max_per_prompt: int = MISSING
    sft: Train = MISSING


@dataclass
class SpcSynth:
    critic_fraction: float = MISSING
    sneaky_fraction: float = MISSING
    exemplar_examples: int = MISSING
    sneaky_kinds: list[str] = MISSING


@dataclass
class SpcOfflineRl:
    kl_coeff: float = MISSING
    sft_coeff: float = MISSING
    clip: float = MISSING


@dataclass
class Spc:
    name: str = MISSING
    rounds: int = MISSING
    roles: str = MISSING
    synth: SpcSynth = MISSING
    warmstart: Train = MISSING
    bench_levels: list[int] = MISSING
    bench_sampling: Sampling = MISSING
    game_levels: list[int] | None = MISSING
    solutions: Sampling = MISSING
    games: int = MISSING
    sneaky: Sampling = MISSING
    critic: Sampling = MISSING
    balance_critic: bool = MISSING
    train: Train = MISSING
    update_rule: UpdateRule = MISSING
    offline_rl: SpcOfflineRl = MISSING


# -- evaluation ----------------------------------------------------------------------------------
@dataclass
class Eval:
    sampled: bool = MISSING
    n: int = MISSING
    k: list[int] = MISSING
    temperature: float = MISSING
    top_p: float = MISSING
    selectors: list[str] = MISSING


# -- generator, hardware, logger ---------------------------------------------------------------
@dataclass
class Generator:
    backend: Backend = MISSING
    batch_size: int = MISSING
    resident: bool = MISSING


@dataclass
class Hardware:
    name: str = MISSING
    device: Device = MISSING
    dtype: DType = MISSING
    num_threads: int | None = None
    # per device, for the plan's fit check (conf/hardware/*.yaml); null = detected
    memory_gb: float | None = None
    # multi-process training through accelerate (training/launch.py)
    accelerate: str | None = MISSING
    num_processes: int | None = MISSING
    gradient_checkpointing: bool = MISSING
    # SFT/DPO checkpoint interval in optimizer steps (training/sft.py); null = none
    checkpoint_steps: int | None = MISSING
    # vLLM engine settings (defaults and units are in conf/hardware/*.yaml)
    tensor_parallel_size: int = MISSING
    data_parallel_size: int = MISSING
    gpu_memory_utilization: float = MISSING
    max_model_len: int | None = MISSING
    kv_cache_memory_bytes: int | None = MISSING
    enforce_eager: bool = MISSING


@dataclass
class Logger:
    kind: LoggerKind = MISSING
    project: str = "selfimprove"
    entity: str | None = None
    mode: WandbMode = WandbMode.offline


# -- top level -------------------------------------------------------------------------------------
@dataclass
class Config:
    model: Any = MISSING
    dataset: Any = MISSING
    method: Any = MISSING
    generator: Any = MISSING
    hardware: Any = MISSING
    logger: Any = MISSING
    eval: Any = MISSING
    experiment: Any = None
    seed: int = MISSING
    out_root: str = MISSING
    run_dir: str | None = None
    stop_after: str | None = None
    on_change: OnChange = MISSING
    store: bool = MISSING
    store_dir: str | None = None
    report: Report = MISSING


GROUP_SCHEMAS = {
    "model": {"tiny": TinyModel, "hub": HubModel},
    "dataset": {
        "arithmetic": ArithmeticData,
        "reversed_addition": ReversedAdditionData,
        "hf_math": HFMathData,
        "reasoning_gym": GymData,
        "humaneval": HumanEvalData,
    },
    "method": {
        "star": Star,
        "length_gen": LengthGen,
        "rest_em": RestEm,
        "bstar": Bstar,
        "tt_si": TtSi,
        "self_refine": SelfRefine,
        "grpo": Grpo,
        "score": Score,
        "spin": Spin,
        "self_rewarding": SelfRewarding,
        "spc": Spc,
    },
    "eval": {"eval": Eval},
    "generator": {"generator": Generator},
    "hardware": {"hardware": Hardware},
    "logger": {"logger": Logger},
}


def register_resolvers() -> None:
    """The few resolvers the YAML files use to derive one setting from others: sums and products
    (token budgets, learning-rate ratios) and a choice between two values."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("add", lambda *xs: sum(xs), replace=True)
    OmegaConf.register_new_resolver("mul", lambda *xs: math.prod(xs), replace=True)
    # ${int:${mul:${..steps},0.25}}: a step count derived by a product
    OmegaConf.register_new_resolver("int", lambda x: int(x), replace=True)
    # ${if:CONDITION,A,B}: A when CONDITION is true, else B
    OmegaConf.register_new_resolver("if", lambda cond, yes, no: yes if cond else no, replace=True)
    # ${sharded:${hardware.accelerate}}: whether that accelerate config shards the model's weights
    OmegaConf.register_new_resolver("sharded", shards_weights, replace=True)
    # ${vllm_on_gpu:${hardware.device}}: vLLM can generate here (a GPU device and vLLM installed)
    OmegaConf.register_new_resolver("vllm_on_gpu", vllm_on_gpu, replace=True)
    # ${detected_hardware:KEY}: KEY of the hardware option that fits this machine (hardware=auto)
    OmegaConf.register_new_resolver("detected_hardware", lambda key: detected_hardware()[key], replace=True)


#: set while `selfimprove plan` plans a GPU run on a machine without GPUs: vLLM is assumed there
PLANNING_FOR_GPUS = {"on": False}


def vllm_on_gpu(device: str) -> bool:
    """True when generation can use vLLM's GPU engine: the device is (or auto-detects) a GPU and
    vLLM is installed. As generator=auto, it depends on the machine, and the stages that use it
    carry the resolved value in their fingerprints."""
    import importlib.util

    device = str(getattr(device, "value", device))
    on_gpu = device == "cuda" or (device == "auto" and gpu_count() > 0)
    installed = PLANNING_FOR_GPUS["on"] or importlib.util.find_spec("vllm") is not None
    return on_gpu and installed


def gpu_count() -> int:
    """CUDA devices torch sees here (CUDA_VISIBLE_DEVICES applies)."""
    import torch

    return torch.cuda.device_count()


@functools.cache
def detected_hardware() -> dict:
    """hardware=auto: the settings of conf/hardware/cpu.yaml without a GPU, gpu.yaml with one,
    gpu8.yaml with several (every one of them used: N training processes and N vLLM engines)."""
    from omegaconf import OmegaConf

    gpus = gpu_count()
    option = "cpu" if gpus == 0 else "gpu" if gpus == 1 else "gpu8"
    settings = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "hardware" / f"{option}.yaml"))
    settings.pop("defaults", None)
    if gpus > 1:
        settings.update(name=f"gpu{gpus}", num_processes=gpus, data_parallel_size=gpus)
    return settings


def shards_weights(accelerate: str | None) -> bool:
    """True when training runs under an accelerate config that shards weights, gradients and
    optimizer state over its processes (FSDP, DeepSpeed ZeRO-3), so a model too big for one device
    can be fully fine-tuned."""
    from selfimprove.training.launch import sharding

    return sharding(accelerate) != "none"


def register_configs() -> None:
    """Put the schemas into Hydra's ConfigStore (as ``<group>/schema_<name>``) and register the
    resolvers they use."""
    from selfimprove import optuna_sweep

    register_resolvers()
    optuna_sweep.register()  # hydra/sweeper=optuna: the resumable study
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for group, schemas in GROUP_SCHEMAS.items():
        for name, node in schemas.items():
            cs.store(group=group, name=f"{SCHEMA_PREFIX}{name}", node=node)
