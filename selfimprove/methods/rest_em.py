"""ReST-EM: Expectation-Maximization for Reinforced Self-Training (Singh et al., 2023).
docs/methods/rest_em.md maps the paper to this.

M0 <- warm start: SFT on the seed rationales (the paper: the pretrained base model)
for i = 1..I:
    E-step: D_i <- sample K solutions per prompt x from M_{i-1}; score with the binary reward r;
            keep (x, y) with r(x, y) >= threshold, at most `max_per_prompt` per prompt
    M-step: M_i <- SFT(M_0, D_i)          always from the base, on this iteration's data only
    evaluate M_i on held-out sets; monitor exploration / exploitation of D_i
"""

from __future__ import annotations

from omegaconf import DictConfig

from selfimprove import tasks
from selfimprove.engine.pipeline import Run
from selfimprove.generation import generate
from selfimprove.methods.common import MONITOR_NEEDS, held_out_eval, monitored, warm_start, warm_start_needs
from selfimprove.scoring import verify
from selfimprove.stages.data import keep_correct, task_prompts
from selfimprove.tasks import Need
from selfimprove.training import sft


def needs(cfg: DictConfig) -> list[Need]:
    """What ReST-EM uses of a task (checked before a run starts: tasks.check_needs)."""
    return warm_start_needs(cfg) + [Need("train_prompts", "the iterations' prompts")] + MONITOR_NEEDS


def rest_em(cfg: DictConfig, run: Run) -> None:
    m = cfg.method
    dataset = tasks.spec(cfg.dataset)
    seeds, base, _ = warm_start(cfg, run, dataset)
    model = base

    for it in run.iterations(m.iterations):
        # the paper reuses one fixed training set every iteration
        prompts = it.stage(
            "prompts", task_prompts, dataset=dataset, iteration=1 if m.fixed_prompts else it.index
        )
        # E-step: sample, score, filter by reward threshold, cap per prompt
        samples = it.stage("generate", generate, model=model, prompts=prompts, sampling=m.sampling)
        scored = it.stage("score", verify, samples=samples, dataset=dataset)
        data = it.stage(
            "build",
            keep_correct,
            scored=[scored],
            dataset=dataset,
            max_per_prompt=m.max_per_prompt,
            replay=seeds if m.replay_seed_data else None,
            min_reward=m.reward_threshold,
        )
        watched = monitored(it, model, scored, data, dataset)
        # M-step: fine-tune the base model, not the previous iterate
        model = it.stage("train", sft, model=base, data=data, train=m.train)
        run.record(it.index, held_out_eval(it, "eval", cfg, model, dataset), samples, scored, data, watched)
