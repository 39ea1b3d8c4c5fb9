"""SPIN: Self-Play Fine-Tuning (Chen et al., 2024). docs/methods/spin.md maps the paper to this.

θ_0 <- warm start: SFT on the seed demonstrations (the paper: the SFT model, e.g. zephyr-7b-sft-full)
for t = 0..T-1:
    y'_i <- sample a response from p_θt for each prompt x_i of the SFT data {(x_i, y_i)}
    D_t  <- {(x_i, chosen = y_i, rejected = y'_i)}        [U D_{t-1} if mix_previous]
    θ_t+1 <- DPO(init θ_t, reference θ_t, D_t)             (SPIN's loss = DPO's logistic loss)
    evaluate θ_t+1 on held-out sets
"""

from __future__ import annotations

from omegaconf import DictConfig

from selfimprove import tasks
from selfimprove.engine.pipeline import Run
from selfimprove.generation import generate
from selfimprove.methods.common import held_out_eval, warm_start, warm_start_needs
from selfimprove.stages.preference import sft_prompts, spin_pairs
from selfimprove.tasks import Need
from selfimprove.training.dpo import dpo


def needs(cfg: DictConfig) -> list[Need]:
    """What SPIN uses of a task (checked before a run starts: tasks.check_needs): its prompts and
    chosen responses are the SFT data itself."""
    return warm_start_needs(cfg) + [Need("demonstrations", "SPIN's prompts and chosen (gold) responses")]


def spin(cfg: DictConfig, run: Run) -> None:
    m = cfg.method
    dataset = tasks.spec(cfg.dataset)
    seeds, model, _ = warm_start(cfg, run, dataset)
    previous = None

    for it in run.iterations(m.iterations):
        prompts = it.stage("prompts", sft_prompts, seeds=seeds, size=m.prompts_per_iteration)
        # the opponent: the previous iterate answers the SFT prompts
        samples = it.stage("generate", generate, model=model, prompts=prompts, sampling=m.sampling)
        pairs = it.stage(
            "pairs",
            spin_pairs,
            samples=samples,
            dataset=dataset,
            previous=previous if m.mix_previous else None,
        )
        # the main player: DPO from the previous iterate, which is also the reference
        model = it.stage("train", dpo, model=model, pairs=pairs, train=m.train, reference=model)
        run.record(it.index, held_out_eval(it, "eval", cfg, model, dataset), pairs)
        previous = pairs
