"""Self-Rewarding Language Models (Yuan et al., 2024), with Temporal Self-Rewarding's two phases
(Wang et al., 2025) as options. docs/methods/self_rewarding.md maps the papers to this.

M_1 <- warm start: SFT on IFT data (seed demonstrations) + EFT data (judge examples scored by the verifier)
for t = 1..T:
    x_i          <- new prompts
    y_i^1..N     <- sample N responses from M_t
    r_i^n        <- M_t judges each response with the judge prompt (mean of parseable judgements)
    D_t          <- {(x_i, best y_i, worst y_i)}; ties dropped
                    [anchored rejection: M_1's worst response to x_i, judged by M_t, when it
                     scores below M_t's worst]
                    [future-guided chosen: M_f <- DPO(M_t, D_t); M_f's best response to x_i,
                     judged by M_t, when it scores above the chosen one; D_t rebuilt]
    M_t+1        <- DPO(init M_t, reference M_t, D_t)
    evaluate M_t+1 on held-out sets; log the judge's agreement with the verifier
"""

from __future__ import annotations

from omegaconf import DictConfig

from selfimprove import tasks
from selfimprove.engine.pipeline import Run
from selfimprove.generation import generate
from selfimprove.methods.common import held_out_eval, warm_start, warm_start_needs
from selfimprove.methods.self_rewarding.judge import get_judge, judge_responses, judge_seed_data
from selfimprove.scoring import verify
from selfimprove.stages.data import task_prompts
from selfimprove.stages.preference import judged_pairs
from selfimprove.tasks import Need
from selfimprove.training.dpo import dpo


def needs(cfg: DictConfig) -> list[Need]:
    """What Self-Rewarding uses of a task (checked before a run starts: tasks.check_needs)."""
    eft = Need("corrupt", "the judge's (EFT) warm-start examples", without="the model judges without them")
    return warm_start_needs(cfg) + [Need("train_prompts", "the iterations' prompts"), eft]


def self_rewarding(cfg: DictConfig, run: Run) -> None:
    m = cfg.method
    dataset = tasks.spec(cfg.dataset)
    get_judge(m.judge.name)  # an unknown judge fails before anything is computed

    def with_judge_examples(seeds):
        return run.stage(
            "warmstart/judge_data",
            judge_seed_data,
            seeds=seeds,
            dataset=dataset,
            judge=m.judge,
            fraction=m.judge_examples_fraction,
        )

    _, model, _ = warm_start(cfg, run, dataset, augment=with_judge_examples)
    initial = model

    def respond_and_judge(it, prefix, responder, judge_model, prompts):
        """Sample responses, verify them (for logging only) and let the judge model score them."""
        samples = it.stage(
            f"{prefix}generate", generate, model=responder, prompts=prompts, sampling=m.sampling
        )
        scored = it.stage(f"{prefix}score", verify, samples=samples, dataset=dataset)
        judged = it.stage(
            f"{prefix}judge",
            judge_responses,
            model=judge_model,
            scored=scored,
            dataset=dataset,
            judge=m.judge,
        )
        return scored, judged

    for it in run.iterations(m.iterations):
        prompts = it.stage("prompts", task_prompts, dataset=dataset, iteration=it.index)
        scored, judged = respond_and_judge(it, "", model, model, prompts)
        anchor = None
        if m.anchored_rejection:  # rejected responses may come from the initial model, judged by M_t
            anchor = respond_and_judge(it, "anchor_", initial, model, prompts)[1]
        pairs = it.stage("pairs", judged_pairs, judged=judged, anchor=anchor, dataset=dataset)
        if m.future_guided_chosen:  # a temporary next model proposes chosen responses, judged by M_t
            temporary = it.stage(
                "future_train", dpo, model=model, pairs=pairs, train=m.train, reference=model
            )
            future = respond_and_judge(it, "future_", temporary, model, prompts)[1]
            pairs = it.stage(
                "future_pairs", judged_pairs, judged=judged, anchor=anchor, future=future, dataset=dataset
            )
        model = it.stage("train", dpo, model=model, pairs=pairs, train=m.train, reference=model)
        run.record(it.index, held_out_eval(it, "eval", cfg, model, dataset), scored, judged, pairs)
