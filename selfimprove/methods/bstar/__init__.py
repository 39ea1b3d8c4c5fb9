"""B-STaR: Balanced Self-Taught Reasoner (Zeng et al., 2024). docs/methods/bstar.md maps the
paper to this.

M0 <- warm start: SFT on the seed rationales
for t = 1..T:
    (temperature, n, tau) <- argmax balance score on a small query subset, sampled from M_{t-1}
    samples <- n responses per prompt from M_{t-1} at the chosen temperature
    D_t     <- responses with 1(correct) + reward (self-certainty in [-1, 1]) > tau
    M_t     <- SFT(M_{t-1}, D_t [+ seed replay])
    evaluate M_t; log the chosen settings, balance score, exploration and exploitation
"""

from __future__ import annotations

from omegaconf import DictConfig

from selfimprove import tasks
from selfimprove.engine.pipeline import Run
from selfimprove.methods.bstar.balance import balance_search, generate_searched, select
from selfimprove.methods.common import MONITOR_NEEDS, held_out_eval, monitored, warm_start, warm_start_needs
from selfimprove.scoring import verify
from selfimprove.scoring.certainty import certainty
from selfimprove.stages.data import keep_correct, task_prompts
from selfimprove.tasks import Need
from selfimprove.training import sft


def needs(cfg: DictConfig) -> list[Need]:
    """What B-STaR uses of a task (checked before a run starts: tasks.check_needs)."""
    return warm_start_needs(cfg) + [Need("train_prompts", "the iterations' prompts")] + MONITOR_NEEDS


def bstar(cfg: DictConfig, run: Run) -> None:
    m = cfg.method
    dataset = tasks.spec(cfg.dataset)
    seeds, model, _ = warm_start(cfg, run, dataset)

    for it in run.iterations(m.iterations):
        prompts = it.stage("prompts", task_prompts, dataset=dataset, iteration=it.index)
        settings = it.stage(
            "search",
            balance_search,
            model=model,
            prompts=prompts,
            dataset=dataset,
            search=m.search,
            sampling=m.sampling,
        )
        samples = it.stage(
            "generate",
            generate_searched,
            model=model,
            prompts=prompts,
            settings=settings,
            sampling=m.sampling,
        )
        scored = it.stage("score", verify, samples=samples, dataset=dataset)
        certain = it.stage("certainty", certainty, model=model, scored=scored)
        chosen = it.stage(
            "select", select, scored=certain, settings=settings, dataset=dataset, monitor_s=m.monitor_s
        )
        data = it.stage(
            "build",
            keep_correct,
            scored=[chosen],
            dataset=dataset,
            max_per_prompt=m.max_per_prompt,
            replay=seeds if m.replay_seed_data else None,
            min_reward=0.0,  # select applied B-STaR's rule: wrong answers that passed it are trained on
        )
        watched = monitored(it, model, scored, data, dataset, certain=certain)
        model = it.stage("train", sft, model=model, data=data, train=m.train)
        run.record(
            it.index,
            held_out_eval(it, "eval", cfg, model, dataset),
            samples,
            scored,
            settings,
            chosen,
            data,
            watched,
        )
