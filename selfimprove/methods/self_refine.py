"""Self-Refine (Madaan et al., 2023), inference only. The paper's feedback is the model's own
(``feedback=self``, the default); ``feedback=oracle_upper_bound`` lets the task's verifier, which
reads the test answer, decide what to refine and when to stop: an upper bound on feedback, not
Self-Refine. docs/methods/self_refine.md maps the paper to this.

M <- warm start: SFT on the seed rationales + a few two-turn examples (fix / keep / refine / critique)
round 1: y_1 <- M(x)                                    the draft
for r = 2..max_rounds, for each problem still open:
    fb_r <- feedback on y_{r-1}: M's own critique of it ("ok" | "wrong"),
            or the task's verifier (oracle_upper_bound: reads the test answer)
    stop if fb_r says it is right (or the critique cannot be parsed)
    y_r <- M(x, y_{r-1}, fb_r)                          the refinement
    stop if the answer of y_r equals that of y_{r-1}
report accuracy after every round, tokens spent per round, Δ^{i→c} / Δ^{c→i} of y_1 against the last
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from selfimprove import tasks
from selfimprove.engine.pipeline import Artifact, Run, read_jsonl, stage, write_json_atomic, write_jsonl
from selfimprove.engine.registry import ConfigError
from selfimprove.generation import sample
from selfimprove.methods.common import warm_start, warm_start_needs
from selfimprove.metrics import fraction
from selfimprove.stages.episodes import by_level, correct, episode_metrics, greedy, start, take_turn
from selfimprove.tasks import Need

# self: the paper's; oracle_upper_bound: the test answer decides (never refines a right answer)
FEEDBACK = ("self", "oracle_upper_bound")


def needs(cfg: DictConfig) -> list[Need]:
    """What Self-Refine uses of a task (checked before a run starts: tasks.check_needs)."""
    unchanged = Need(
        "extract", 'the "unchanged answer" stop', without="it compares the cleaned attempts instead"
    )
    return warm_start_needs(cfg, two_turn=cfg.method.two_turn_fraction > 0) + [unchanged]


def self_refine(cfg: DictConfig, run: Run) -> None:
    m = cfg.method
    if m.feedback not in FEEDBACK:
        raise ConfigError(f"method.feedback='{m.feedback}' is not allowed; use one of {', '.join(FEEDBACK)}")
    dataset = tasks.spec(cfg.dataset)
    _, model, _ = warm_start(cfg, run, dataset, two_turn_fraction=m.two_turn_fraction)

    for it in run.iterations(m.max_rounds):
        # every round samples with the run's seed, not the iteration's: so finished runs keep their fingerprints
        if it.index == 1:
            episodes = it.stage("draft", draft, model=model, dataset=dataset, seed=run.seed)
            run.record(it.index, episodes)
            continue
        episodes = it.stage(
            "refine",
            refine_round,
            model=model,
            previous=episodes,
            dataset=dataset,
            feedback=m.feedback,
            sampling=m.refine_sampling,
            critique_tokens=m.critique_tokens,
            seed=run.seed,
        )
        run.record(it.index, episodes)


def critique(
    task: tasks.Task, model: Artifact, episodes: list[dict], budget: int, generator, hardware, seed
) -> list[tuple[str | None, int]]:
    """The model's verdict on each episode's last attempt: (feedback_ok | feedback_wrong | None when
    unparseable, tokens spent), from greedy decoding after the task's verify instruction."""
    if not episodes:
        return []
    records = [
        {
            "id": e["id"],
            "prompt": task.turn_prompt(e["prompt"], e["turns"][-1]["completion"], task.verify_instruction),
            "answer": e["answer"],
            "meta": e["meta"],
        }
        for e in episodes
    ]
    out = sample(model, records, greedy(budget), generator, hardware, seed)
    verdicts = (task.feedback_ok, task.feedback_wrong)
    return [
        (o["completion"].strip() if o["completion"].strip() in verdicts else None, o["meta"]["tokens"])
        for o in out
    ]


def round_metrics(out: Path, episodes: list[dict], tokens: dict, refined: int) -> dict:
    """Write episodes.jsonl and metrics.json of a round: per level the accuracy of the current
    answers (``acc/<level>``) and first-vs-last turn metrics, the tokens spent in this round
    (``tokens/round``, of which ``tokens/critique``), how many were refined and are still open."""
    metrics: dict = {}
    for level, group in by_level(episodes).items():
        metrics[f"acc/{level}"] = fraction([correct(e["turns"][-1]) for e in group])
        metrics.update(episode_metrics(group, f"/{level}"))
    metrics |= tokens | {"refined": refined, "open": sum(e["stopped"] is None for e in episodes)}
    write_json_atomic(out / "metrics.json", metrics)
    write_jsonl(out / "episodes.jsonl", episodes)
    return {"episodes": len(episodes), "refined": refined}


@stage(name="draft", version=1)
def draft(out: Path, model: Artifact, dataset: dict, generator: dict, hardware: dict, seed: int) -> dict:
    """Stage: round 1, a greedy draft for every held-out problem (episodes with one turn)."""
    task = tasks.load(dataset)
    episodes = [{**start(r), "stopped": None} for records in task.test_sets().values() for r in records]
    episodes = take_turn(task, model, episodes, None, None, generator, hardware, seed)
    tokens = sum(e["turns"][-1]["tokens"] for e in episodes)
    return round_metrics(out, episodes, {"tokens/round": tokens, "tokens/critique": 0}, 0)


@stage(name="refine_round", version=1)
def refine_round(
    out: Path,
    model: Artifact,
    previous: Artifact,
    dataset: dict,
    feedback: str,
    sampling: dict,
    critique_tokens: int,
    generator: dict,
    hardware: dict,
    seed: int,
) -> dict:
    """Stage: one Self-Refine round on the held-out sets: feedback on every open episode's last
    attempt, a refinement of the ones judged wrong (``stopped`` says why an episode closed)."""
    task = tasks.load(dataset)
    episodes = read_jsonl(previous.file("episodes.jsonl"))
    open_ = [e for e in episodes if e["stopped"] is None]
    if feedback == "oracle_upper_bound":  # the task's verifier reads the test answer: never wrong
        verdicts = [(task.feedback_ok if correct(e["turns"][-1]) else task.feedback_wrong, 0) for e in open_]
    else:
        verdicts = critique(task, model, open_, critique_tokens, generator, hardware, seed)
    critique_tokens_spent = sum(t for _, t in verdicts)
    to_refine = []
    for e, (verdict, _) in zip(open_, verdicts):
        if verdict == task.feedback_wrong:
            to_refine.append(e)
        else:  # said done, or an unparseable critique: no feedback to refine with
            e["stopped"] = "feedback_ok" if verdict == task.feedback_ok else "unparseable_feedback"
    settings = (
        {**sampling, "max_tokens": max(task.max_new_tokens(e) for e in to_refine)} if to_refine else None
    )
    refreshed = {
        e["id"]: e
        for e in take_turn(task, model, to_refine, task.feedback_wrong, settings, generator, hardware, seed)
    }
    for e in refreshed.values():
        if task.final(e["turns"][-1]["completion"]) == task.final(e["turns"][-2]["completion"]):
            e["stopped"] = "unchanged"
    episodes = [refreshed.get(e["id"], e) for e in episodes]
    refine_tokens = sum(e["turns"][-1]["tokens"] for e in refreshed.values())
    tokens = {"tokens/round": critique_tokens_spent + refine_tokens, "tokens/critique": critique_tokens_spent}
    return round_metrics(out, episodes, tokens, len(refreshed))
