"""The warm start every rejection-sampling method begins with (STaR's few-shot prompt analogue)."""

from __future__ import annotations

from collections.abc import Callable

from omegaconf import DictConfig

from selfimprove import tasks
from selfimprove.engine.pipeline import Artifact, Iteration, Run
from selfimprove.models import init_model
from selfimprove.scoring.certainty import certainty
from selfimprove.stages.data import seed_data
from selfimprove.stages.episodes import two_turn_eval, two_turn_seed_data
from selfimprove.stages.evaluation import evaluate
from selfimprove.stages.monitoring import monitor
from selfimprove.tasks import Need
from selfimprove.training import sft

#: the monitor stage (monitoring.py) reads answers for one of its numbers
MONITOR_NEEDS = [
    Need("extract", "the monitor's explore/distinct_answers", without="explore/distinct_answers is left out")
]


def warm_start_needs(cfg: DictConfig, two_turn: bool = False) -> list[Need]:
    """What :func:`warm_start` and the held-out evaluation use of a task: demonstrations (without
    them the warm start is skipped), wrong attempts for two-turn examples, answers for maj@k."""
    needs = []
    if cfg.method.warmstart.steps > 0:
        skipped = "the warm start is skipped: iteration 1 starts from the model itself"
        needs.append(Need("demonstrations", "the warm start", without=skipped))
    if two_turn:
        needs.append(Need("corrupt", "two-turn warm-start examples", without="the warm start has none"))
    if cfg.eval.sampled:
        needs.append(Need("extract", "eval.sampled's maj@k", without="maj@k is left out (pass@k stays)"))
    return needs


def warm_start(
    cfg: DictConfig,
    run: Run,
    dataset: dict,
    hint_fraction: float = 0.0,
    two_turn_fraction: float | None = None,
    augment: Callable[[Artifact], Artifact] | None = None,
) -> tuple[Artifact, Artifact, Artifact]:
    """M0: build the model, fine-tune it on the seed demonstrations, evaluate it (iteration 0).
    Returns (seed data, warm-started model, its evaluation). Same stages and inputs as STaR's warm start.
    With ``two_turn_fraction`` (self-correction methods) the demonstrations gain two-turn examples
    (``warmstart/two_turn``) and the evaluation is two-turn (``episodes.two_turn_eval``).
    ``augment(seeds)`` runs a stage that adds to the demonstrations (e.g. judge examples) and
    returns its artifact."""
    m = cfg.method
    base = run.stage("init", init_model, model=cfg.model)
    seeds = run.stage("warmstart/data", seed_data, dataset=dataset, hint_fraction=hint_fraction)
    if two_turn_fraction is not None:
        seeds = run.stage(
            "warmstart/two_turn", two_turn_seed_data, seeds=seeds, dataset=dataset, fraction=two_turn_fraction
        )
    if augment is not None:
        seeds = augment(seeds)
    if m.warmstart.steps == 0 or not tasks.has(dataset, "demonstrations"):
        model = base  # no warm start ("zero RL" from a base model, or nothing to learn from): M0 is the model
    else:
        model = run.stage("warmstart/train", sft, model=base, data=seeds, train=m.warmstart)
    evaluated = held_out_eval(
        run, "warmstart/eval", cfg, model, dataset, two_turn=two_turn_fraction is not None
    )
    run.record(0, evaluated)
    return seeds, model, evaluated


def held_out_eval(
    owner: Run | Iteration, name: str, cfg: DictConfig, model: Artifact, dataset: dict, two_turn: bool = False
) -> Artifact:
    """The evaluation stage every method runs after each training stage (same inputs everywhere);
    ``two_turn`` (self-correction methods): two greedy attempts (``episodes.two_turn_eval``)."""
    if two_turn:
        return owner.stage(name, two_turn_eval, model=model, dataset=dataset)
    return owner.stage(name, evaluate, model=model, dataset=dataset, eval=cfg.eval)


def monitored(
    it: Iteration,
    model: Artifact,
    scored: Artifact,
    kept: Artifact,
    dataset: dict,
    certain: Artifact | None = None,
) -> Artifact:
    """The monitor stage (exploration / exploitation of an iteration's samples, monitoring.py), after
    the self-certainty of the samples under the model that drew them (``certain`` when already run)."""
    certain = certain or it.stage("certainty", certainty, model=model, scored=scored)
    return it.stage("monitor", monitor, scored=certain, kept=kept, dataset=dataset)
