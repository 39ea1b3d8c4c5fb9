"""TT-SI: Test-Time Self-Improvement (Acikgoz et al., 2025). docs/methods/tt_si.md maps the
paper to this.

M <- warm start: SFT on the seed rationales; evaluate M (accuracy without test-time training)
U <- test items x on which M is uncertain: confidence(M, x) < threshold
for each x in U (or each group of items):
    S_x <- similar problems (drawn by the task) solved by M (TT-SI) or by a teacher T (TT-D)
    M_x <- LoRA fine-tune of M on S_x for a few steps; answer x with M_x; reset the adapter
report accuracy with test-time training (iteration 1) against without (iteration 0), and |S|
"""

from __future__ import annotations

from omegaconf import DictConfig

from selfimprove import tasks
from selfimprove.engine.pipeline import Run
from selfimprove.methods.common import warm_start, warm_start_needs
from selfimprove.methods.tt_si.testtime import adapt_and_answer, synthesize, uncertainty
from selfimprove.tasks import Need


def needs(cfg: DictConfig) -> list[Need]:
    """What TT-SI uses of a task (checked before a run starts: tasks.check_needs)."""
    m = cfg.method
    out = warm_start_needs(cfg) + [Need("similar", "the synthesised training problems")]
    if m.uncertainty.measure == "agreement":
        out.append(Need("extract", "the agreement of sampled answers (method.uncertainty.measure=agreement)"))
    if not m.synthesis.verify:
        out.append(Need("extract", "majority-answer selection (method.synthesis.verify=false)"))
    return out


def tt_si(cfg: DictConfig, run: Run) -> None:
    m = cfg.method
    dataset = tasks.spec(cfg.dataset)
    _, model, evaluated = warm_start(cfg, run, dataset)

    items = run.stage(
        "tt/uncertainty",
        uncertainty,
        model=model,
        evaluated=evaluated,
        dataset=dataset,
        uncertain=m.uncertainty,
    )
    examples = run.stage(
        "tt/synthesize", synthesize, model=model, items=items, dataset=dataset, synthesis=m.synthesis
    )
    answers = run.stage(
        "tt/adapt",
        adapt_and_answer,
        model=model,
        items=items,
        synthesized=examples,
        dataset=dataset,
        adapt=m.adapt,
    )
    run.record(1, items, examples, answers)
