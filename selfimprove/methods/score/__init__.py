"""SCoRe: Training Language Models to Self-Correct via Reinforcement Learning (Kumar et al., 2024),
and the baselines of its table. docs/methods/score.md maps the paper to this.

M0 <- warm start: SFT on the seed rationales + a few two-turn examples (so attempt 2 means something)
variant base:      M0 prompted to self-correct (evaluated only)
variant star_sft:  star_iterations times: episodes (y1, instruction, y2) ~ the latest model on fresh
                   train prompts; SFT(M0, those with r(y2) = 1)
variant pair_sft:  attempts ~ M0; SFT(M0, problem + wrong attempt + instruction -> correct attempt)
variant score:
    Stage I:  on-policy two-turn RL from M0; turn 2 rewarded r(y2), turn 1 nothing; KL to M0
              strong on attempt 1 (beta_stage1, holding it at the base), rl.beta on attempt 2 -> M1
    Stage II: on-policy two-turn RL from M1 (stage2_iterations times); each turn its own reward:
              turn 1 r(y1), turn 2 r(y2) + alpha * (r(y2) - r(y1)); KL rl.beta           -> M2 ...
each model: two greedy attempts on the held-out sets -> Acc@t1, Acc@t2, Δ, Δ^{i→c}, Δ^{c→i}
"""

from __future__ import annotations

from omegaconf import DictConfig

from selfimprove import tasks
from selfimprove.engine.pipeline import Run
from selfimprove.engine.registry import ConfigError
from selfimprove.methods.common import held_out_eval, warm_start, warm_start_needs
from selfimprove.methods.score.two_turn_rl import score_rl
from selfimprove.stages.data import task_prompts
from selfimprove.stages.episodes import correction_data, sample_episodes
from selfimprove.tasks import Need
from selfimprove.training import sft
from selfimprove.training.grpo import check_rl

VARIANTS = ("base", "star_sft", "pair_sft", "score")


def needs(cfg: DictConfig) -> list[Need]:
    """What SCoRe (and its baselines) use of a task (checked before a run starts: tasks.check_needs)."""
    m = cfg.method
    prompts = [Need("train_prompts", "the traces' and RL stages' prompts")] if m.variant != "base" else []
    return warm_start_needs(cfg, two_turn=m.two_turn_fraction > 0) + prompts


def score(cfg: DictConfig, run: Run) -> None:
    m = cfg.method
    if m.variant not in VARIANTS:
        raise ConfigError(f"method.variant='{m.variant}' is not allowed; use one of {', '.join(VARIANTS)}")
    check_rl(m.train, m.rl)
    dataset = tasks.spec(cfg.dataset)
    seeds, base, _ = warm_start(cfg, run, dataset, two_turn_fraction=m.two_turn_fraction)

    if m.variant in ("star_sft", "pair_sft"):  # SFT on self-generated correction traces
        # STaR: star_iterations rounds, traces from the latest model, SFT from M0 (Singh et al. 2024's
        # protocol, as SCoRe Sec. 4 runs it); Pair-SFT: one round (Welleck et al. 2023)
        model = base
        for it in run.iterations(m.star_iterations if m.variant == "star_sft" else 1):
            prompts = it.stage("prompts", task_prompts, dataset=dataset, iteration=it.index)
            episodes = it.stage(
                "traces", sample_episodes, model=model, prompts=prompts, dataset=dataset, sampling=m.traces
            )
            data = it.stage(
                "build",
                correction_data,
                episodes=episodes,
                dataset=dataset,
                kind=m.variant,
                max_per_prompt=m.max_per_prompt,
                replay=seeds,
            )
            model = it.stage("train", sft, model=base, data=data, train=m.sft)
            run.record(
                it.index, held_out_eval(it, "eval", cfg, model, dataset, two_turn=True), episodes, data
            )

    if m.variant == "score":  # Stage I once, then Stage II
        model = base
        for it in run.iterations(1 + m.stage2_iterations):
            phase = 1 if it.index == 1 else 2
            prompts = it.stage("prompts", task_prompts, dataset=dataset, iteration=it.index)
            model = it.stage(
                f"stage{phase}",
                score_rl,
                model=model,
                prompts=prompts,
                dataset=dataset,
                phase=phase,
                alpha=m.alpha,
                beta_first=m.beta_stage1 if phase == 1 else m.rl.beta,
                train=m.train,
                rl=m.rl,
            )
            run.record(it.index, held_out_eval(it, "eval", cfg, model, dataset, two_turn=True), model)
