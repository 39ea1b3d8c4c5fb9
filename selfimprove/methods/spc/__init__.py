"""SPC: Self-Play Critic (Chen et al., 2025). docs/methods/spc.md maps the paper to this.

M0 <- warm start: SFT on the seed solutions + synthetic critic examples (a solution with a step
      corrupted by program, labelled by the step checker: its first wrong step, or "ok") + synthetic
      sneaky examples (a correct solution and a step index -> that step made wrong)
benchmark: solutions sampled from M0 on held-out problems, labelled by the step checker
critic_0 = sneaky_0 = M0                                  (roles=separate: two copies from here on)
for round r = 1..R:
    S_r   <- correct solutions sampled from the solver M0 on fresh prompts (every step checked)
    for s in S_r: the sneaky generator rewrites a random step k of s; the solver continues from it;
          the attempt is valid iff step k is wrong (step checker) and the final answer changed
    the critic gives its first wrong step (or "ok") on every valid attempt and on every plain s;
          critic right -> critic +1, sneaky -1; fooled -> critic -1, sneaky +1
    update_rule=sft (default):                                            (one update when shared)
        critic_r <- SFT(critic_{r-1}, winning critic verdicts + critic replay)
        sneaky_r <- SFT(sneaky_{r-1}, winning sneaky rewrites + sneaky replay)
    update_rule=offline_rl (the released code: PPO-clip on the outcomes + sft_coeff x NLL of the replay):
        critic_r <- OfflineRL(critic_{r-1}, every critic verdict with its +1/-1, critic replay)
        sneaky_r <- OfflineRL(sneaky_{r-1}, every sneaky rewrite with its reward, sneaky replay)
    evaluate critic_r: ProcessBench-style F1, and best-of-N by its verdicts vs majority vs random
"""

from __future__ import annotations

from omegaconf import DictConfig

from selfimprove import tasks
from selfimprove.engine.pipeline import Run
from selfimprove.engine.registry import ConfigError
from selfimprove.generation import generate
from selfimprove.methods.common import held_out_eval
from selfimprove.methods.spc.offline_rl import offline_rl
from selfimprove.methods.spc.selfplay import (
    bench_solutions,
    critic_eval,
    game_data,
    game_rl_data,
    play,
    role_seed_data,
)
from selfimprove.models import init_model
from selfimprove.scoring import verify
from selfimprove.stages.data import seed_data, task_prompts
from selfimprove.tasks import Need
from selfimprove.training import launch, sft

ROLES = ("shared", "separate")


def needs(cfg: DictConfig) -> list[Need]:
    """What SPC uses of a task (checked before a run starts: tasks.check_needs)."""
    return [
        Need("step_checker", "the critic's labels and the sneaky generator's rewrites"),
        Need("demonstrations", "the solver's warm start and the role examples"),
        Need("train_prompts", "the iterations' prompts"),
    ]


def spc(cfg: DictConfig, run: Run) -> None:
    m = cfg.method
    check(cfg)
    dataset = tasks.spec(cfg.dataset)

    base = run.stage("init", init_model, model=cfg.model)
    seeds = run.stage("warmstart/data", seed_data, dataset=dataset, hint_fraction=0.0)
    roles_data = run.stage("warmstart/roles", role_seed_data, seeds=seeds, dataset=dataset, synth=m.synth)
    solver = run.stage("warmstart/train", sft, model=base, data=roles_data, train=m.warmstart)
    bench = run.stage(
        "bench/solutions",
        bench_solutions,
        model=solver,
        dataset=dataset,
        levels=m.bench_levels,
        sampling=m.bench_sampling,
    )
    judge = dict(bench=bench, dataset=dataset, max_tokens=m.critic.max_tokens)
    run.record(
        0,
        held_out_eval(run, "warmstart/eval", cfg, solver, dataset),
        run.stage("warmstart/critic_eval", critic_eval, critic=solver, **judge),
    )

    models = {"critic": solver, "sneaky": solver}
    game_set = {**dataset, "train_levels": list(m.game_levels)} if m.game_levels else dataset
    for it in run.iterations(m.rounds):
        prompts = it.stage("prompts", task_prompts, dataset=game_set, iteration=it.index)
        solutions = it.stage("solutions", generate, model=solver, prompts=prompts, sampling=m.solutions)
        game = it.stage(
            "game",
            play,
            critic=models["critic"],
            sneaky=models["sneaky"],
            solver=solver,
            scored=it.stage("score", verify, samples=solutions, dataset=dataset),
            dataset=dataset,
            games=m.games,
            sneaky_sampling=m.sneaky,
            critic_sampling=m.critic,
        )
        groups = [["critic", "sneaky"]] if m.roles == "shared" else [["critic"], ["sneaky"]]
        for roles in groups:
            suffix = "" if m.roles == "shared" else f"_{roles[0]}"
            start = models[roles[0]]
            if m.update_rule == "offline_rl":
                data = it.stage(
                    f"build{suffix}", game_rl_data, game=game, replay=roles_data, roles=roles, dataset=dataset
                )
                trained = it.stage(
                    f"train{suffix}", offline_rl, model=start, data=data, train=m.train, rl=m.offline_rl
                )
            else:
                data = it.stage(
                    f"build{suffix}",
                    game_data,
                    game=game,
                    replay=roles_data,
                    roles=roles,
                    balance=m.balance_critic,
                )
                trained = it.stage(f"train{suffix}", sft, model=start, data=data, train=m.train)
            models.update({role: trained for role in roles})
        run.record(it.index, it.stage("critic_eval", critic_eval, critic=models["critic"], **judge), game)


def check(cfg: DictConfig) -> None:
    """Refuse, before anything runs, bad role or level names (a task without a step checker is
    refused earlier, by ``needs``)."""
    task = tasks.TASKS.get(cfg.dataset.name)  # the class: nothing is loaded or downloaded to check it
    m = cfg.method
    if m.roles not in ROLES:
        raise ConfigError(f"method.roles='{m.roles}' is not allowed; use one of {', '.join(ROLES)}")
    unknown = sorted(set(m.synth.sneaky_kinds) - set(task.wrong_step_kinds))
    if unknown or not m.synth.sneaky_kinds:
        raise ConfigError(
            f"method.synth.sneaky_kinds has unknown or no kinds {unknown}; allowed: {', '.join(task.wrong_step_kinds)}"
        )
    if m.game_levels is not None and (not m.game_levels or min(m.game_levels) < 1):
        raise ConfigError(
            f"method.game_levels={list(m.game_levels)} must be null or a non-empty list of levels >= 1"
        )
    if m.update_rule == "offline_rl":
        check_offline_rl(cfg)
    missing = sorted(set(m.bench_levels) - set(cfg.dataset.test_levels))
    if missing or not m.bench_levels:
        raise ConfigError(
            f"method.bench_levels={list(m.bench_levels)} must be non-empty held-out levels (dataset.test_levels={list(cfg.dataset.test_levels)})"
        )


def check_offline_rl(cfg: DictConfig) -> None:
    """Refuse what ``update_rule=offline_rl`` cannot do: an option of the SFT rule, coefficients
    out of range, and sharded training (the reference is a whole frozen copy of the model)."""
    m = cfg.method
    rl = m.offline_rl
    if m.balance_critic:
        raise ConfigError(
            "method.balance_critic=true subsamples the winning verdicts of update_rule=sft; offline_rl trains "
            "on every verdict with its +1/-1 outcome: set method.balance_critic=false or method.update_rule=sft"
        )
    if not 0 < rl.clip < 1 or rl.kl_coeff < 0 or rl.sft_coeff < 0:
        raise ConfigError(
            f"method.offline_rl: clip={rl.clip} must be in (0, 1), kl_coeff={rl.kl_coeff} and "
            f"sft_coeff={rl.sft_coeff} must be >= 0 (the released code: 0.2, 0.1, 0.15)"
        )
    sharding = launch.sharding(cfg.hardware.accelerate)
    if sharding != "none":
        raise ConfigError(
            f"method.update_rule=offline_rl keeps a whole frozen copy of the model as its reference, which "
            f"{sharding} sharding (hardware.accelerate={cfg.hardware.accelerate}) cannot hold; use "
            "hardware.accelerate=ddp or null, or method.update_rule=sft"
        )
