"""Two-turn (multi-turn) episodes: the record of self-correction, and the stages that make them.

An episode is one problem answered in turns, each scored by the task's verifier::

    {"id", "prompt", "answer", "meta",
     "turns": [{"prompt", "completion", "reward", "tokens", "feedback"}, ...]}

Turn 1's prompt is the problem; a later turn's prompt is ``task.turn_prompt(problem, previous
attempt, instruction)`` where the instruction is SCoRe's correction instruction (no information)
or feedback (Self-Refine: the model's own critique, or an external verifier's). ``feedback`` is the
text that led to this turn (None for the first). Metrics compare the first and the last turn
(``metrics.self_correction``: Acc@t1, Acc@t2, Δ, Δ^{i→c}, Δ^{c→i}).
"""

from __future__ import annotations

import random
from pathlib import Path

from selfimprove import tasks
from selfimprove.engine.pipeline import Artifact, read_jsonl, stage, write_json_atomic, write_jsonl
from selfimprove.engine.registry import ConfigError
from selfimprove.generation import sample
from selfimprove.metrics import self_correction
from selfimprove.scoring import verify_records


def start(record: dict) -> dict:
    """An episode with no turns yet."""
    return {k: record.get(k) for k in ("id", "prompt", "answer")} | {
        "meta": record.get("meta", {}),
        "turns": [],
    }


def next_prompt(task: tasks.Task, episode: dict, instruction: str) -> str:
    """The prompt of the episode's next turn: the problem, or the last attempt plus ``instruction``."""
    if not episode["turns"]:
        return episode["prompt"]
    return task.turn_prompt(episode["prompt"], episode["turns"][-1]["completion"], instruction)


def greedy(max_tokens: int) -> dict:
    """Greedy decoding settings (one sample, temperature 0) with a completion budget: the one copy
    that evaluation, critiques and continuations use."""
    return {"n": 1, "temperature": 0.0, "top_p": 1.0, "max_tokens": max_tokens, "stop": []}


def take_turn(
    task: tasks.Task,
    model: Artifact,
    episodes: list[dict],
    instruction: str | None,
    sampling: dict | None,
    generator: dict,
    hardware: dict,
    seed: int,
) -> list[dict]:
    """Every episode with one more scored attempt (one sample each; ``sampling`` None = greedy
    with the task's budget). ``instruction`` is what follows the previous attempt."""
    if not episodes:
        return []
    records = [
        {"id": e["id"], "prompt": next_prompt(task, e, instruction), "answer": e["answer"], "meta": e["meta"]}
        for e in episodes
    ]
    settings = sampling or greedy(max(task.max_new_tokens(r) for r in records))
    scored = verify_records(task, sample(model, records, {**settings, "n": 1}, generator, hardware, seed))
    return [
        {
            **e,
            "turns": e["turns"]
            + [
                {
                    "prompt": r["prompt"],
                    "completion": task.clean(r["completion"]),
                    "reward": r["reward"],
                    "tokens": r["meta"]["tokens"],
                    "feedback": instruction if e["turns"] else None,
                }
            ],
        }
        for e, r in zip(episodes, scored)
    ]


def correct(turn: dict) -> bool:
    return turn["reward"] is not None and turn["reward"] >= 1.0


def episode_metrics(episodes: list[dict], suffix: str = "") -> dict:
    """SCoRe's metrics of the first against the last turn of each judged episode, keys suffixed."""
    judged = [e for e in episodes if all(t["reward"] is not None for t in (e["turns"][0], e["turns"][-1]))]
    metrics = self_correction(
        [correct(e["turns"][0]) for e in judged], [correct(e["turns"][-1]) for e in judged]
    )
    return {f"{k}{suffix}": v for k, v in metrics.items()}


def by_level(episodes: list[dict]) -> dict[str, list[dict]]:
    levels: dict[str, list[dict]] = {}
    for e in episodes:
        levels.setdefault(str(e["meta"].get("level", "all")), []).append(e)
    return levels


@stage(name="two_turn_eval", version=1)
def two_turn_eval(
    out: Path, model: Artifact, dataset: dict, generator: dict, hardware: dict, seed: int
) -> dict:
    """Stage: SCoRe's evaluation on the held-out sets. Attempt 1 greedy from the problem, attempt 2
    greedy after the task's correction instruction; per level ``acc@t1/<level>``, ``acc@t2/…``,
    ``delta/…``, ``delta_i2c/…``, ``delta_c2i/…`` and ``acc/<level>`` (= Acc@t1, the single-turn
    greedy accuracy every method reports). Writes metrics.json and episodes.jsonl."""
    task = tasks.load(dataset)
    metrics, episodes = {}, []
    for level, records in task.test_sets().items():
        level_episodes = [start(r) for r in records]
        for _ in range(2):
            level_episodes = take_turn(
                task, model, level_episodes, task.correction_instruction, None, generator, hardware, seed
            )
        turn_metrics = episode_metrics(level_episodes, f"/{level}")
        metrics[f"acc/{level}"] = turn_metrics[f"acc@t1/{level}"]
        metrics.update(turn_metrics)
        episodes += level_episodes
    metrics["tokens/eval"] = sum(t["tokens"] for e in episodes for t in e["turns"])
    write_json_atomic(out / "metrics.json", metrics)
    write_jsonl(out / "episodes.jsonl", episodes)
    return {"episodes": len(episodes)}


@stage(name="two_turn_seed_data", version=3)
def two_turn_seed_data(out: Path, seeds: Artifact, dataset: dict, fraction: float, seed: int) -> dict:
    """Stage: the warm-start demonstrations plus two-turn examples built from a ``fraction`` of them
    and from every exemplar at a train level (``dataset.train_levels``: without those, a 3-digit
    second attempt was never seen, and refinements of 3-digit problems came out as 2-digit ones),
    so that a second attempt means something to a model trained from scratch. No new gold problems.
    For each chosen gold record (the problem ``x``, its gold attempt ``y``, corrupted attempts ``w``):

        x + w + correction instruction -> y        (fix a wrong attempt)
        x + y + correction instruction -> y        (keep a right one)
        x + w' + feedback "wrong"      -> y        (refine after negative feedback)
        x + w'' + verify instruction   -> "wrong"  (critique: a wrong attempt)
        x + y + verify instruction     -> "ok"     (critique: a right attempt)
    """
    task = tasks.load(dataset)
    records = read_jsonl(seeds.file("train.jsonl"))
    rng = random.Random(seed)
    extra = []
    for r in records if "corrupt" in task.capabilities else []:  # else none (said when the run starts)
        exemplar = r["meta"].get("level") in dataset.get("train_levels", [])  # the few at the hard level
        if r["meta"].get("hinted") or not (exemplar or rng.random() < fraction):
            continue
        gold = r["completion"]
        examples = [
            ("fix", task.correction_instruction, task.corrupt(r, rng), gold),
            ("keep", task.correction_instruction, gold, gold),
            ("refine", task.feedback_wrong, task.corrupt(r, rng), gold),
            ("verify_wrong", task.verify_instruction, task.corrupt(r, rng), task.feedback_wrong),
            ("verify_ok", task.verify_instruction, gold, task.feedback_ok),
        ]
        for kind, instruction, attempt, target in examples:
            extra.append(
                {
                    **r,
                    "id": f"{r['id']}-{kind}",
                    "prompt": task.turn_prompt(r["prompt"], attempt, instruction),
                    "completion": target,
                    "meta": {**r["meta"], "two_turn": kind},
                }
            )
    data = records + extra
    rng.shuffle(data)
    write_jsonl(out / "train.jsonl", data)
    return {"examples": len(data), "two_turn": len(extra)}


@stage(name="sample_episodes", version=1)
def sample_episodes(
    out: Path,
    model: Artifact,
    prompts: Artifact,
    dataset: dict,
    sampling: dict,
    generator: dict,
    hardware: dict,
    seed: int,
) -> dict:
    """Stage: ``sampling.n`` two-turn episodes per train prompt from ``model`` (attempt 1, the
    correction instruction, attempt 2; both sampled with ``sampling``). Writes episodes.jsonl."""
    task = tasks.load(dataset)
    records = read_jsonl(prompts.file("prompts.jsonl"))
    episodes = [
        {**start(r), "meta": {**r["meta"], "sample": j}} for r in records for j in range(sampling["n"])
    ]
    for _ in range(2):
        episodes = take_turn(
            task, model, episodes, task.correction_instruction, sampling, generator, hardware, seed
        )
    write_jsonl(out / "episodes.jsonl", episodes)
    return {"episodes": len(episodes), **episode_metrics(episodes)}


CORRECTION_DATA = ("star_sft", "pair_sft")


@stage(name="correction_data", version=1)
def correction_data(
    out: Path, episodes: Artifact, dataset: dict, kind: str, max_per_prompt: int, replay: Artifact, seed: int
) -> dict:
    """Stage: SFT data for self-correction from sampled episodes (SCoRe's baselines), plus the
    replayed warm-start demonstrations. ``star_sft`` (STaR on traces): every episode whose second
    attempt is correct, as (problem + attempt 1 + instruction -> attempt 2). ``pair_sft`` (Welleck et
    al.'s pairs): a wrong attempt of a problem paired with a correct attempt of the same problem
    (problem + wrong + instruction -> correct). At most ``max_per_prompt`` distinct per problem."""
    if kind not in CORRECTION_DATA:
        raise ConfigError(
            f"correction data kind '{kind}' is not allowed; use one of {', '.join(CORRECTION_DATA)}"
        )
    task = tasks.load(dataset)
    rng = random.Random(seed)
    groups: dict[str, list[dict]] = {}
    for e in read_jsonl(episodes.file("episodes.jsonl")):
        groups.setdefault(e["id"], []).append(e)
    kept, fixes = [], 0
    for group in groups.values():
        # every attempt of the problem, judged by the verifier's reward of its turn
        judged = {t["completion"]: correct(t) for e in group for t in e["turns"] if t["reward"] is not None}
        if kind == "star_sft":
            pairs = [
                (e["turns"][0]["completion"], e["turns"][1]["completion"])
                for e in group
                if correct(e["turns"][1])
            ]
        else:
            right = sorted(a for a, ok in judged.items() if ok)
            wrong = sorted(a for a, ok in judged.items() if not ok)
            pairs = [(w, rng.choice(right)) for w in wrong] if right else []
        unique = list(dict.fromkeys(pairs))[:max_per_prompt]
        fixes += sum(not judged.get(first, False) for first, _ in unique)
        kept += [
            {
                "id": group[0]["id"],
                "prompt": task.turn_prompt(group[0]["prompt"], first, task.correction_instruction),
                "completion": task.clean(second),
                "answer": group[0]["answer"],
                "meta": {**group[0]["meta"], "correction": kind},
            }
            for first, second in unique
        ]
    data = kept + read_jsonl(replay.file("train.jsonl"))
    rng.shuffle(data)
    write_jsonl(out / "train.jsonl", data)
    return {"kept": len(kept), "kept_fixes": fixes, "examples": len(data)}
