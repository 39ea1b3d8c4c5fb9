"""LLM-as-a-judge: the model scores responses itself (Self-Rewarding LMs, Yuan et al. 2024).

A judge is a prompt template plus its parser, checked when built: ``template`` shows the problem
and a response, the model answers with ``verdict`` filled in with a score from 0 to ``max_score``.
The same ``verdict`` format writes the judge's training targets (``render``), so that what the
model learns to write is exactly what ``parse`` reads. An unparseable judgement is None (skipped),
never coerced to 0.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from selfimprove import tasks
from selfimprove.engine import progress
from selfimprove.engine.pipeline import Artifact, read_jsonl, stage, write_json_atomic, write_jsonl
from selfimprove.engine.registry import ConfigError, unknown_choice
from selfimprove.generation import sample
from selfimprove.metrics import fraction as mean  # eft_examples has a stage input named fraction


@dataclass(frozen=True)
class Judge:
    #: the judge's prompt, with ``{prompt}`` (the problem) and ``{response}`` (the answer judged)
    template: str
    #: how the judge writes its score, with ``{score}`` (an integer 0..max_score)
    verdict: str
    max_score: int
    pattern: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for key, text in (
            ("{prompt}", self.template),
            ("{response}", self.template),
            ("{score}", self.verdict),
        ):
            if text.count(key) != 1:
                raise ConfigError(f"judge text {text!r} must contain {key} exactly once")
        regex = re.escape(self.verdict).replace(re.escape("{score}"), r"(\d+)")
        object.__setattr__(self, "pattern", re.compile(regex))

    def prompt(self, prompt: str, response: str) -> str:
        return self.template.replace("{prompt}", prompt).replace("{response}", response)

    def render(self, score: int) -> str:
        return self.verdict.replace("{score}", str(score))

    def parse(self, text: str) -> float | None:
        """The score in a judgement, or None when it has none or one out of range."""
        match = self.pattern.search(text)
        if match is None or int(match.group(1)) > self.max_score:
            return None
        return float(match.group(1))


JUDGES = {
    # short enough for the tiny character-level model, which learns it from the warm start's EFT data
    "verdict": Judge(template="{prompt}{response}\njudge:", verdict=" {score}", max_score=1),
    # the paper's additive 5-point rubric, word for word (Yuan et al. 2024, Figure 2; PDF line breaks
    # joined), for instruct models
    "additive_5": Judge(
        template=(
            "Review the user’s question and the corresponding response using the additive 5-point "
            "scoring system described below. Points are accumulated based on the satisfaction of each "
            "criterion:\n"
            "- Add 1 point if the response is relevant and provides some information related to the "
            "user’s inquiry, even if it is incomplete or contains some irrelevant content.\n"
            "- Add another point if the response addresses a substantial portion of the user’s question, "
            "but does not completely resolve the query or provide a direct answer.\n"
            "- Award a third point if the response answers the basic elements of the user’s question in a "
            "useful way, regardless of whether it seems to have been written by an AI Assistant or if it "
            "has elements typically found in blogs or search results.\n"
            "- Grant a fourth point if the response is clearly written from an AI Assistant’s perspective, "
            "addressing the user’s question directly and comprehensively, and is well-organized and "
            "helpful, even if there is slight room for improvement in clarity, conciseness or focus.\n"
            "- Bestow a fifth point for a response that is impeccably tailored to the user’s question "
            "by an AI Assistant, without extraneous information, reflecting expert knowledge, and "
            "demonstrating a high-quality, engaging, and insightful answer.\n"
            "User: {prompt}\n"
            "<response>{response}</response>\n"
            "After examining the user’s instruction and the response:\n"
            "- Briefly justify your total score, up to 100 words.\n"
            "- Conclude with the score using the format: “Score: <total points>”\n"
            "Remember to assess from the AI Assistant perspective, utilizing web search knowledge as "
            "necessary. To evaluate the response in alignment with this additive scoring model, we’ll "
            "systematically attribute points based on the outlined criteria."
        ),
        verdict="Score: {score}",
        max_score=5,
    ),
}


def get_judge(name: str) -> Judge:
    if name not in JUDGES:
        raise unknown_choice("judge", name, list(JUDGES))
    return JUDGES[name]


def says_correct(judge: Judge, score: float) -> bool:
    """The judge's score read as a verdict on correctness: at least half the points."""
    return score >= judge.max_score / 2


@stage(name="judge_seed_data", version=1)
def judge_seed_data(
    out: Path, seeds: Artifact, dataset: dict, judge: dict, fraction: float, seed: int
) -> dict:
    """Stage: the warm start's demonstrations plus judge examples (the paper's EFT data): for a
    ``fraction`` of them, the gold response and a corrupted one (``task.corrupt``), each with the
    verifier's verdict as the target score (max_score if correct, else 0)."""
    task, j = tasks.load(dataset), get_judge(judge["name"])
    records = read_jsonl(seeds.file("train.jsonl"))
    rng = random.Random(seed)
    examples = []
    for r in records if "corrupt" in task.capabilities else []:  # else none (said when the run starts)
        if rng.random() >= fraction:
            continue
        for kind, response in (("gold", r["completion"]), ("corrupt", task.corrupt(r, rng))):
            (reward,) = task.reward(
                prompts=[r["prompt"]], completions=[response], answer=[r["answer"]], meta=[r.get("meta", {})]
            )
            examples.append(
                {
                    "id": f"{r['id']}-judge-{kind}",
                    "prompt": j.prompt(r["prompt"], response),
                    "completion": j.render(j.max_score if reward == 1.0 else 0),
                    "answer": r["answer"],
                    "meta": {**r["meta"], "judge_example": kind},
                }
            )
    data = records + examples
    rng.shuffle(data)
    write_jsonl(out / "train.jsonl", data)
    return {"examples": len(data), "judge_examples": len(examples)}


def agreement(judge: Judge, records: list[dict]) -> dict:
    """How the judge's scores relate to the verifier: the fraction parsed, and among the responses
    with both a score and a reward, the fraction whose verdict matches the verifier's."""
    parsed = [r for r in records if r["judge"] is not None]
    both = [r for r in parsed if r["reward"] is not None]
    agree = [says_correct(judge, r["judge"]) == (r["reward"] == 1.0) for r in both]
    return {
        "judge/parsed": mean([r["judge"] is not None for r in records]),
        "judge/agreement": mean(agree),
        "judge/says_correct": mean([says_correct(judge, r["judge"]) for r in parsed]),
    }


@stage(name="judge_responses", version=1)
def judge_responses(
    out: Path,
    model: Artifact,
    scored: Artifact,
    dataset: dict,
    judge: dict,
    generator: dict,
    hardware: dict,
    seed: int,
) -> dict:
    """Stage: ``model`` judges every scored response ``judge.samples`` times; the response's score
    is the mean of the parseable judgements (None if none parses). Writes judged.jsonl (each record
    with ``judge`` and the raw ``meta.judgements``) and metrics.json (agreement with the verifier)."""
    task, j = tasks.load(dataset), get_judge(judge["name"])
    records = read_jsonl(scored.file("scored.jsonl"))
    requests = [
        {"id": str(i), "prompt": j.prompt(r["prompt"], task.clean(r["completion"])), "answer": None}
        for i, r in enumerate(records)
    ]
    sampling = {
        "n": judge["samples"],
        "temperature": judge["temperature"],
        "top_p": 1.0,
        "max_tokens": judge["max_tokens"],
        "stop": [],
    }
    if sampling["temperature"] == 0 and sampling["n"] > 1:
        raise ConfigError(
            f"judge.samples={judge['samples']} with judge.temperature=0 repeats one judgement; set samples=1 or temperature>0"
        )
    texts: dict[str, list[str]] = defaultdict(list)
    with progress.bar("judge", len(requests), "responses") as advance:
        for o in sample(model, requests, sampling, generator, hardware, seed, advance) if records else []:
            texts[o["id"]].append(o["completion"])
    judged = []
    for i, r in enumerate(records):
        scores = [s for s in (j.parse(t) for t in texts[str(i)]) if s is not None]
        judge_score = sum(scores) / len(scores) if scores else None
        judged.append({**r, "judge": judge_score, "meta": {**r["meta"], "judgements": texts[str(i)]}})
    write_jsonl(out / "judged.jsonl", judged)
    metrics = agreement(j, judged)
    write_json_atomic(out / "metrics.json", metrics)
    return {"judged": len(judged), **metrics}
