"""RLVR baseline: GRPO (Shao et al., 2024) with the task's verifier as the reward, through TRL's
GRPOTrainer. docs/methods/grpo.md maps the paper to this.

M0 <- warm start: SFT on the seed rationales (as STaR's)
for i = 1..I:                                   each iteration one resumable train stage
    P_i <- the iteration's unlabelled prompts (answers only)
    pi_ref <- M_{i-1}                           this iteration's start (the paper's Algorithm 1:
                                                pi_ref <- pi_theta at each iteration), not M0
    for each step: sample G completions per prompt from M (on-policy), reward r = verifier(answer),
                   advantage = (r - mean_group(r)) [/ std_group(r)], clipped policy-gradient update
                   [+ beta * KL(M || pi_ref)]
    M_i <- M after train.steps updates
    evaluate M_i on held-out sets
"""

from __future__ import annotations

from omegaconf import DictConfig

from selfimprove import tasks
from selfimprove.engine.pipeline import Run
from selfimprove.methods.common import held_out_eval, warm_start, warm_start_needs
from selfimprove.stages.data import task_prompts
from selfimprove.tasks import Need
from selfimprove.training.grpo import check_rl
from selfimprove.training.grpo import grpo as grpo_stage


def needs(cfg: DictConfig) -> list[Need]:
    """What GRPO uses of a task (checked before a run starts: tasks.check_needs)."""
    return warm_start_needs(cfg) + [Need("train_prompts", "the iterations' prompts")]


def grpo(cfg: DictConfig, run: Run) -> None:
    m = cfg.method
    check_rl(m.train, m.rl)
    dataset = tasks.spec(cfg.dataset)
    _, model, _ = warm_start(cfg, run, dataset)

    for it in run.iterations(m.iterations):
        prompts = it.stage("prompts", task_prompts, dataset=dataset, iteration=it.index)
        model = it.stage(
            "train", grpo_stage, model=model, prompts=prompts, dataset=dataset, train=m.train, rl=m.rl
        )
        run.record(it.index, held_out_eval(it, "eval", cfg, model, dataset), model)
