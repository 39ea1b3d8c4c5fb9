"""Self-play between a sneaky generator and a step critic (SPC, ``methods/spc.py``): the roles'
prompts and verdicts, the game's rewards, and the stages that play, build and evaluate a round."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

from selfimprove import tasks
from selfimprove.engine.pipeline import Artifact, read_jsonl, stage, write_json_atomic, write_jsonl
from selfimprove.generation import sample
from selfimprove.metrics import by_prompt, fraction, maj_at_k
from selfimprove.scoring import verify_records
from selfimprove.stages.episodes import greedy

CRITIC = "critic"  # the critic's instruction after a solution; it answers a step index or "ok"
UNPARSEABLE = "unparseable"


# -- the two roles' prompts, verdicts and the game's rewards ------------------------------------------
def critic_prompt(task: tasks.Task, record: dict, solution: str) -> str:
    return task.turn_prompt(record["prompt"], solution, CRITIC)


def sneaky_prompt(task: tasks.Task, record: dict, solution: str, k: int) -> str:
    return task.turn_prompt(record["prompt"], solution, f"sneak {k}")


def verdict_text(task: tasks.Task, first_error: int | None) -> str:
    """What the critic should answer: the first wrong step's index, or ok."""
    return task.feedback_ok if first_error is None else str(first_error)


def parse_verdict(task: tasks.Task, text: str) -> int | None | str:
    """A critique as the step index it names, None for ok, or UNPARSEABLE (never coerced)."""
    text = text.strip()
    if text == task.feedback_ok:
        return None
    return int(text) if text.isdigit() and len(text) <= 3 else UNPARSEABLE


def outcome(label: int | None, verdict: int | None | str) -> tuple[int, int]:
    """(critic reward, sneaky reward) of one verdict on a solution whose first wrong step is
    ``label`` (None = correct): the critic wins (+1, -1) when it names exactly that step (or says ok
    to a correct solution), else it was fooled (-1, +1). An unparseable verdict is a loss."""
    return (1, -1) if verdict == label else (-1, 1)


def critique(
    task, critic: Artifact, items: list[tuple[dict, str]], sampling: dict, generator, hardware, seed
):
    """The critic's verdicts on (record, solution) pairs: ``sampling['n']`` parsed verdicts each,
    with the raw texts."""
    records = [
        {"id": r["id"], "prompt": critic_prompt(task, r, s), "answer": r["answer"], "meta": r["meta"]}
        for r, s in items
    ]
    if not records:
        return []
    out = sample(critic, records, sampling, generator, hardware, seed)
    n = sampling["n"]
    return [
        [(parse_verdict(task, o["completion"]), o["completion"].strip()) for o in out[i * n : (i + 1) * n]]
        for i in range(len(records))
    ]


# -- stages ----------------------------------------------------------------------------------------
@stage(name="role_seed_data", version=1)
def role_seed_data(out: Path, seeds: Artifact, dataset: dict, synth: dict, seed: int) -> dict:
    """Stage: the warm start's demonstrations plus synthetic role examples, each labelled by the
    task's step checker. From a ``critic_fraction`` of the gold records (and ``exemplar_examples``
    times from each exemplar at a train level): critic(gold) -> ok, critic(task.corrupt(gold)) -> its
    first wrong step. From a ``sneaky_fraction`` (and the exemplars likewise): sneak k(gold) -> step k
    rewritten wrong (``task.wrong_step`` with a kind drawn from ``sneaky_kinds``)."""
    task = tasks.load(dataset)
    rng = random.Random(seed)
    records = read_jsonl(seeds.file("train.jsonl"))
    extra = []
    for r in records:
        exemplar = r["meta"].get("level") in dataset.get("train_levels", [])
        gold = r["completion"]
        for j in range(synth["exemplar_examples"] if exemplar else 1):
            if exemplar or rng.random() < synth["critic_fraction"]:
                wrong = task.corrupt(r, rng)
                label = task.first_error(r, wrong)
                if label is not None:
                    extra.append(
                        role_example(
                            r,
                            f"critic-{j}",
                            "critic",
                            critic_prompt(task, r, wrong),
                            verdict_text(task, label),
                        )
                    )
                if j == 0:
                    extra.append(
                        role_example(
                            r, "critic-ok", "critic", critic_prompt(task, r, gold), verdict_text(task, None)
                        )
                    )
            if exemplar or rng.random() < synth["sneaky_fraction"]:
                k = rng.randrange(task.column_steps(r))
                kind = rng.choice(list(synth["sneaky_kinds"]))
                step = task.wrong_step(r, k, kind, rng)
                extra.append(
                    role_example(r, f"sneaky-{j}", "sneaky", sneaky_prompt(task, r, gold, k), step, kind)
                )
    data = [{**r, "meta": {**r["meta"], "role": "solver"}} for r in records] + extra
    rng.shuffle(data)
    write_jsonl(out / "train.jsonl", data)
    count = Counter(x["meta"]["role"] for x in data)
    return {"examples": len(data), "critic": count["critic"], "sneaky": count["sneaky"]}


def role_example(r: dict, tag: str, role: str, prompt: str, completion: str, kind: str | None = None) -> dict:
    meta = {**r["meta"], "role": role} | ({"kind": kind} if kind else {})
    return {
        "id": f"{r['id']}-{tag}",
        "prompt": prompt,
        "completion": completion,
        "answer": r["answer"],
        "meta": meta,
    }


@stage(name="bench_solutions", version=1)
def bench_solutions(
    out: Path,
    model: Artifact,
    dataset: dict,
    levels: list,
    sampling: dict,
    generator: dict,
    hardware: dict,
    seed: int,
) -> dict:
    """Stage: the critic benchmark (ProcessBench-style): ``sampling.n`` solutions sampled from the
    warm-started solver for every held-out problem at ``levels``, each labelled with its first wrong
    step (``first_error``, None when every step is right). Writes bench.jsonl."""
    task = tasks.load(dataset)
    sets = task.test_sets()
    records = [r for level in levels for r in sets[str(level)]]
    solutions = verify_records(task, sample(model, records, sampling, generator, hardware, seed))
    bench = [{**s, "completion": task.clean(s["completion"])} for s in solutions]
    bench = [{**s, "first_error": task.first_error(s, s["completion"])} for s in bench]
    write_jsonl(out / "bench.jsonl", bench)
    wrong = sum(s["first_error"] is not None for s in bench)
    return {"solutions": len(bench), "erroneous": wrong, "correct": len(bench) - wrong}


@stage(name="critic_eval", version=1)
def critic_eval(
    out: Path,
    critic: Artifact,
    bench: Artifact,
    dataset: dict,
    max_tokens: int,
    generator: dict,
    hardware: dict,
    seed: int,
) -> dict:
    """Stage: the critic's greedy verdict on every benchmark solution. ProcessBench's metrics:
    ``critic/acc_erroneous`` (names exactly the first wrong step), ``critic/acc_correct`` (says ok to
    a correct solution), ``critic/f1`` (their harmonic mean); and best-of-N over each problem's
    samples: ``bon/critic`` (a sample the critic calls ok, else the one whose named error is latest;
    ties broken at random), ``bon/majority`` (majority answer), ``bon/random`` (expected accuracy of
    a random pick), ``bon/oracle`` (any sample right). Writes metrics.json and verdicts.jsonl."""
    task = tasks.load(dataset)
    items = read_jsonl(bench.file("bench.jsonl"))
    judged = critique(
        task, critic, [(s, s["completion"]) for s in items], greedy(max_tokens), generator, hardware, seed
    )
    items = [{**s, "verdict": v[0][0], "critique": v[0][1]} for s, v in zip(items, judged)]
    wrong = [s for s in items if s["first_error"] is not None]
    right = [s for s in items if s["first_error"] is None]
    mean = lambda xs: fraction(xs, empty=0.0)  # noqa: E731
    acc_wrong = mean([s["verdict"] == s["first_error"] for s in wrong])
    acc_right = mean([s["verdict"] is None for s in right])
    f1 = round(2 * acc_wrong * acc_right / (acc_wrong + acc_right), 4) if acc_wrong + acc_right else 0.0

    rng = random.Random(seed)
    rank = lambda s: 10**9 if s["verdict"] is None else (-1 if s["verdict"] == UNPARSEABLE else s["verdict"])  # noqa: E731
    picks, majority, expected, oracle = [], [], [], []
    for group in by_prompt(items).values():
        best = max(rank(s) for s in group)
        picks.append(rng.choice([s for s in group if rank(s) == best])["reward"] == 1.0)
        majority.append(
            maj_at_k([task.extract(s["completion"]) for s in group], [s["reward"] for s in group], len(group))
        )
        expected.append(mean([s["reward"] == 1.0 for s in group]))
        oracle.append(any(s["reward"] == 1.0 for s in group))
    metrics = {
        "critic/acc_erroneous": acc_wrong,
        "critic/acc_correct": acc_right,
        "critic/f1": f1,
        "critic/unparseable": mean([s["verdict"] == UNPARSEABLE for s in items]),
        "bon/critic": mean(picks),
        "bon/majority": mean(majority),
        "bon/random": mean(expected),
        "bon/oracle": mean(oracle),
    }
    write_json_atomic(out / "metrics.json", metrics)
    write_jsonl(out / "verdicts.jsonl", items)
    return {"solutions": len(items), "erroneous": len(wrong)}


@stage(name="play", version=1)
def play(
    out: Path,
    critic: Artifact,
    sneaky: Artifact,
    solver: Artifact,
    scored: Artifact,
    dataset: dict,
    games: int,
    sneaky_sampling: dict,
    critic_sampling: dict,
    generator: dict,
    hardware: dict,
    seed: int,
) -> dict:
    """Stage: one round of the adversarial game. Up to ``games`` distinct correct solutions (right
    answer and every step right); for each, the sneaky generator rewrites a random column step k,
    the solver continues greedily from it, and the attempt is valid iff its first wrong step is k and
    its final answer changed. The critic samples ``critic_sampling.n`` verdicts on each valid attempt
    and on each plain correct solution; every verdict is one game (``outcome``). A sneaky attempt's
    reward is the mean of its games' sneaky rewards (-1 when invalid). Writes games.jsonl (one line
    per solution shown to the critic, and per invalid attempt) and metrics.json."""
    task = tasks.load(dataset)
    rng = random.Random(seed)
    correct, seen = [], set()
    for r in read_jsonl(scored.file("scored.jsonl")):
        solution = task.clean(r["completion"])
        if r["reward"] == 1.0 and task.first_error(r, solution) is None and (r["id"], solution) not in seen:
            seen.add((r["id"], solution))
            correct.append({**r, "completion": solution})
    rng.shuffle(correct)
    correct = correct[:games]

    # the sneaky generator rewrites step k; the solver writes the rest from there
    ks = [rng.randrange(task.column_steps(r)) for r in correct]
    asks = [
        {
            "id": r["id"],
            "prompt": sneaky_prompt(task, r, r["completion"], k),
            "answer": r["answer"],
            "meta": r["meta"],
        }
        for r, k in zip(correct, ks)
    ]
    rewrites = (
        [
            o["completion"].split("\n")[0].split(";")[0].strip()
            for o in sample(sneaky, asks, {**sneaky_sampling, "n": 1}, generator, hardware, seed)
        ]
        if asks
        else []
    )
    prefixes = [
        ";".join(task.steps(r["completion"])[:k] + [w]) + ";" for r, k, w in zip(correct, ks, rewrites)
    ]
    budget = max([task.max_new_tokens(r) for r in correct], default=1)
    rests = (
        sample(
            solver,
            [{**r, "prompt": r["prompt"] + p} for r, p in zip(correct, prefixes)],
            greedy(budget),
            generator,
            hardware,
            seed,
        )
        if correct
        else []
    )
    attempts = []
    for r, k, w, p, rest in zip(correct, ks, rewrites, prefixes, rests):
        solution = task.clean(p + rest["completion"])
        answer = task.extract(solution)
        valid = task.first_error(r, solution) == k and answer is not None and answer != str(r["answer"])
        attempts.append(
            {
                **r,
                "completion": solution,
                "meta": {**r["meta"], "step": k, "rewrite": w, "valid": valid, "original": r["completion"]},
            }
        )

    # the critic plays every valid attempt (label k) and every plain correct solution (label None)
    valid = [a for a in attempts if a["meta"]["valid"]]
    shown = [(a, a["meta"]["step"], "sneaky") for a in valid] + [(r, None, "plain") for r in correct]
    judged = critique(
        task, critic, [(s, s["completion"]) for s, _, _ in shown], critic_sampling, generator, hardware, seed
    )
    lines = []
    for (s, label, kind), verdicts in zip(shown, judged):
        rewards = [outcome(label, v) for v, _ in verdicts]
        line = {
            **s,
            "kind": kind,
            "label": label,
            "critic_prompt": critic_prompt(task, s, s["completion"]),
            "verdicts": [text for _, text in verdicts],
            "critic_rewards": [c for c, _ in rewards],
        }
        if kind == "sneaky":
            line["sneaky_prompt"] = sneaky_prompt(task, s, s["meta"]["original"], label)
            line["sneaky_reward"] = sum(g for _, g in rewards) / len(rewards)
        lines.append(line)
    lines += [
        {**a, "kind": "invalid", "label": None, "sneaky_reward": -1.0}
        for a in attempts
        if not a["meta"]["valid"]
    ]
    write_jsonl(out / "games.jsonl", lines)

    sneaky_games = [x for x in lines if x["kind"] == "sneaky"]
    critic_acc = lambda kind: round(  # noqa: E731
        sum(c > 0 for x in lines if x["kind"] == kind for c in x["critic_rewards"])
        / max(1, sum(len(x["critic_rewards"]) for x in lines if x["kind"] == kind)),
        4,
    )
    n = max(1, len(attempts))
    metrics = {
        "games": len(attempts),
        "sneaky/valid": round(len(valid) / n, 4),
        "sneaky/success": round(sum(x["sneaky_reward"] > 0 for x in sneaky_games) / n, 4),
        "sneaky/success_valid": round(
            sum(x["sneaky_reward"] > 0 for x in sneaky_games) / max(1, len(valid)), 4
        ),
        "game/critic_acc_erroneous": critic_acc("sneaky"),
        "game/critic_acc_correct": critic_acc("plain"),
    }
    write_json_atomic(out / "metrics.json", metrics)
    return {"games": len(attempts), "valid": len(valid), "shown": len(shown)}


@stage(name="game_data", version=1)
def game_data(
    out: Path, game: Artifact, replay: Artifact, roles: list, seed: int, balance: bool = False
) -> dict:
    """Stage: reward-filtered SFT data from one round's games for ``roles``: the critic's winning
    verdicts (critic reward +1, deduplicated per prompt) and the sneaky generator's winning rewrites
    (mean sneaky reward > 0), plus the warm start's synthetic examples of the same roles (replay).
    With ``balance`` the critic's winning "ok" verdicts are subsampled to at most as many as its
    winning verdicts that name a step."""
    kept: dict[tuple[str, str], dict] = {}
    for x in read_jsonl(game.file("games.jsonl")):
        moves = []
        if "critic" in roles and x["kind"] != "invalid":
            moves += [
                ("critic", x["critic_prompt"], v) for v, c in zip(x["verdicts"], x["critic_rewards"]) if c > 0
            ]
        if "sneaky" in roles and x["kind"] == "sneaky" and x["sneaky_reward"] > 0:
            moves.append(("sneaky", x["sneaky_prompt"], x["meta"]["rewrite"]))
        for role, prompt, completion in moves:
            kept.setdefault(
                (prompt, completion),
                {
                    "id": x["id"],
                    "prompt": prompt,
                    "completion": completion,
                    "answer": x["answer"],
                    "meta": {**x["meta"], "role": role},
                },
            )
    won = list(kept.values())
    if balance:
        said_ok = [
            i for i, r in enumerate(won) if r["meta"]["role"] == "critic" and not r["completion"].isdigit()
        ]
        named = sum(r["meta"]["role"] == "critic" and r["completion"].isdigit() for r in won)
        dropped = set(random.Random(seed).sample(said_ok, max(0, len(said_ok) - named)))
        won = [r for i, r in enumerate(won) if i not in dropped]
    replayed = [r for r in read_jsonl(replay.file("train.jsonl")) if r["meta"]["role"] in roles]
    data = won + replayed
    random.Random(seed).shuffle(data)
    write_jsonl(out / "train.jsonl", data)
    count = Counter(r["meta"]["role"] for r in won)
    return {
        "won_critic": count["critic"],
        "won_sneaky": count["sneaky"],
        "replayed": len(replayed),
        "examples": len(data),
    }


@stage(name="game_rl_data", version=1)
def game_rl_data(out: Path, game: Artifact, replay: Artifact, roles: list, dataset: dict, seed: int) -> dict:
    """Stage: offline-RL data (``update_rule=offline_rl``) from one round's games for ``roles``, every
    move with its outcome, won or lost: each critic verdict on each solution shown (reward: its
    game's critic reward, +1 or -1; an unparseable verdict is a lost game) and each sneaky attempt's
    rewrite (reward: its mean sneaky reward over its games, +1 or -1 when the critic's verdicts
    agree; -1 when the attempt was invalid); plus the warm start's synthetic examples of the same
    roles with ``sft`` true (the NLL term; their reward is unused). No deduplication: a verdict the
    critic sampled twice is two samples of its policy."""
    task = tasks.load(dataset)
    rows = []
    for x in read_jsonl(game.file("games.jsonl")):
        moves = []
        if "critic" in roles and x["kind"] != "invalid":
            moves += [
                ("critic", x["critic_prompt"], v, c) for v, c in zip(x["verdicts"], x["critic_rewards"])
            ]
        if "sneaky" in roles and x["kind"] != "plain":
            prompt = sneaky_prompt(task, x, x["meta"]["original"], x["meta"]["step"])
            moves.append(("sneaky", prompt, x["meta"]["rewrite"], x["sneaky_reward"]))
        rows += [
            {
                "id": x["id"],
                "prompt": prompt,
                "completion": completion,
                "answer": x["answer"],
                "meta": {**x["meta"], "role": role},
                "reward": float(reward),
                "sft": False,
            }
            for role, prompt, completion, reward in moves
        ]
    replayed = [
        {**r, "reward": 1.0, "sft": True}
        for r in read_jsonl(replay.file("train.jsonl"))
        if r["meta"]["role"] in roles
    ]
    data = rows + replayed
    random.Random(seed).shuffle(data)
    write_jsonl(out / "train.jsonl", data)
    count = Counter((r["meta"]["role"], r["reward"] > 0) for r in rows)
    return {
        "critic_won": count["critic", True],
        "critic_lost": count["critic", False],
        "sneaky_won": count["sneaky", True],
        "sneaky_lost": count["sneaky", False],
        "replayed": len(replayed),
        "examples": len(data),
    }
