"""STaR: Self-Taught Reasoner (Zelikman et al., 2022). docs/methods/star.md maps the paper to this.

M0 <- warm start: SFT on the seed rationales (STaR: the few-shot prompt)
for n = 1..N:
    r_i  <- sample k rationales per prompt x_i from M_{n-1}
    r^_i <- rationalize: for x_i with no correct r_i, sample with the answer as a hint
    D_n  <- {(x_i, r_i) : answer(r_i) = y_i} U {(x_i, r^_i) : answer(r^_i) = y_i}   (hints dropped)
            [U D_{n-1} if accumulate: every correct rationale found so far]
    M_n  <- SFT(M_0 if restart_from_base else M_{n-1}, D_n [+ seed replay]) for iteration_steps(n)
    evaluate M_n on held-out sets; monitor exploration / exploitation of the samples
"""

from __future__ import annotations

from omegaconf import DictConfig

from selfimprove import tasks
from selfimprove.engine.pipeline import Run
from selfimprove.generation import generate
from selfimprove.methods.common import MONITOR_NEEDS, held_out_eval, monitored, warm_start, warm_start_needs
from selfimprove.scoring import verify
from selfimprove.stages.data import hint_prompts, keep_correct, task_prompts
from selfimprove.tasks import Need
from selfimprove.training import sft


def needs(cfg: DictConfig) -> list[Need]:
    """What STaR uses of a task (tasks.check_needs refuses a run whose dataset lacks a required one)."""
    hint = [Need("hint", "rationalization (method.rationalize=true)")] if cfg.method.rationalize else []
    return warm_start_needs(cfg) + [Need("train_prompts", "the iterations' prompts"), *hint] + MONITOR_NEEDS


def iteration_steps(m: DictConfig, n: int) -> int:
    """Fine-tuning steps of iteration n (from 1). ``linear``: ``train.steps`` plus
    ``train.steps_growth`` per iteration. ``compound``: ``train.steps`` times ``steps_factor`` per
    iteration, the paper's rule -- 40 steps, then 20 % more each time, ``int(40 * 1.2 ** (n - 1))``
    (ezelikman/STaR iteration_train.py:get_n_steps with --exponential_grow)."""
    if m.steps_rule == "compound":
        return int(m.train.steps * m.steps_factor ** (n - 1))
    return m.train.steps + m.train.steps_growth * (n - 1)


def star(cfg: DictConfig, run: Run) -> None:
    m = cfg.method
    dataset = tasks.spec(cfg.dataset)
    hint_fraction = m.warmstart_hint_fraction if m.rationalize else 0.0

    seeds, model, _ = warm_start(cfg, run, dataset, hint_fraction)
    start, found = model, []

    for it in run.iterations(m.iterations):
        prompts = it.stage("prompts", task_prompts, dataset=dataset, iteration=it.index)
        samples = it.stage("generate", generate, model=model, prompts=prompts, sampling=m.sampling)
        scored = [it.stage("score", verify, samples=samples, dataset=dataset)]
        if m.rationalize:
            hinted = it.stage("hint_prompts", hint_prompts, scored=scored[0], dataset=dataset)
            sampling = m.rationalize_sampling
            rationales = it.stage("rationalize", generate, model=model, prompts=hinted, sampling=sampling)
            scored.append(it.stage("rationalize_score", verify, samples=rationales, dataset=dataset))
        found = (found if m.accumulate else []) + scored
        data = it.stage(
            "build",
            keep_correct,
            scored=found if m.train_on_samples else [],
            dataset=dataset,
            max_per_prompt=m.max_per_prompt,
            replay=seeds if m.replay_seed_data else None,
        )
        watched = monitored(it, model, scored[0], data, dataset)
        train = {**m.train, "steps": iteration_steps(m, it.index)}
        model = it.stage("train", sft, model=start if m.restart_from_base else model, data=data, train=train)
        run.record(it.index, held_out_eval(it, "eval", cfg, model, dataset), data, scored[0], watched)
