"""Length generalisation by self-improvement (Lee et al., ICML 2025), in miniature.

M_0 <- train from scratch on gold problems of 1..N digits (reversed digits; no positional encoding:
       model.position_encoding=nope, not rope_theta=inf -- docs/methods/length_gen.md),
       warmup-stable-decay,
       optionally short to long: first on 1..K digits only (method.curriculum)
for r = 1..R:
    P_r <- unlabelled problems of the next length (N+r; with method.advance_at the same length again
           until the a+b / b+a labels of round r-1 agreed on that fraction of pairs), as a+b and b+a
    L_r <- greedy labels from M_{r-1}, filtered (method.filter): vote = the length is right and
           M_{r-1} gives the same label for b+a; length = the length alone; none = every label;
           majority = the label most models give, M_{r-1} and the models of the other initial
           draws in method.vote_draws, each trained the same way on the same L_r
    M_r <- SFT(M_{r-1}, L_r + as many older examples: gold 1..N problems, and with method.history
           also L_1..L_{r-1}), from the peak learning rate decayed within the round, AdamW resumed
    evaluate M_r on every held-out length
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from selfimprove import tasks
from selfimprove.config import Curriculum
from selfimprove.engine.pipeline import Artifact, Run, read_jsonl, stage, write_jsonl
from selfimprove.engine.registry import ConfigError
from selfimprove.generation import generate
from selfimprove.models import init_model
from selfimprove.stages.data import seed_data, task_prompts
from selfimprove.stages.evaluation import evaluate
from selfimprove.tasks import Need
from selfimprove.training import sft


def needs(cfg: DictConfig) -> list[Need]:
    """What length generalisation uses of a task (checked before a run starts: tasks.check_needs)."""
    return [
        Need("label_pairs", "each round's a+b / b+a problems at the next length"),
        Need("demonstrations", "training from scratch on the gold lengths"),
    ]


def length_gen(cfg: DictConfig, run: Run) -> None:
    m, hw, gen = cfg.method, cfg.hardware, cfg.generator
    dataset = tasks.spec(cfg.dataset)
    if m.filter not in FILTERS:
        raise ConfigError(f"method.filter={m.filter!r} is not allowed; use one of {', '.join(FILTERS)}")
    if m.advance_at is not None and not 0.0 < m.advance_at <= 1.0:
        raise ConfigError(
            f"method.advance_at={m.advance_at} is not allowed; use a fraction of label pairs in (0, 1] or null"
        )

    curriculum = short_to_long(m.curriculum)
    own_draw, other_draws = vote_draws(cfg)
    short = None
    if curriculum:  # the digit alignment is learnt on short numbers first (see method.curriculum)
        levels = [n for n in dataset["seed_levels"] if n <= curriculum.digits]
        short = run.stage(
            "warmstart/short_data",
            seed_data,
            dataset={**dataset, "seed_levels": levels},
            hint_fraction=0.0,
            seed=cfg.seed,
        )
    seeds = run.stage("warmstart/data", seed_data, dataset=dataset, hint_fraction=0.0, seed=cfg.seed)
    model = warm_start(run, cfg, seeds, short, cfg.model)
    # Lee et al.'s majority vote: models from other initial draws label each round too and train on
    # the same kept labels (the same stages as those draws' own runs, so a sweep's store shares them)
    voters = {
        d: warm_start(run, cfg, seeds, short, OmegaConf.merge(cfg.model, {"init_seed": d}), f"draw{d}/")
        for d in other_draws
    }
    run.record(
        0,
        run.stage(
            "warmstart/eval",
            evaluate,
            model=model,
            dataset=dataset,
            generator=gen,
            hardware=hw,
            seed=cfg.seed,
        ),
    )
    earlier: list[Artifact] = []  # the filter stages of the rounds so far (method.history)
    longest_gold = max(dataset["seed_levels"])
    digits = longest_gold  # the length labelled last
    for it in run.iterations(m.rounds):
        seed = cfg.seed * 1000 + it.index
        if not earlier or advances(earlier[-1], m.advance_at):
            digits += 1
        # the round's length is passed only when it is not N + r (the task's own choice for round r),
        # so the same problems keep one fingerprint with or without advance_at
        held = {} if digits == longest_gold + it.index else {"digits": digits}
        prompts = it.stage("prompts", task_prompts, dataset=dataset, iteration=it.index, **held)
        labels = it.stage(
            "label",
            generate,
            model=model,
            prompts=prompts,
            sampling=m.labelling,
            generator=gen,
            hardware=hw,
            seed=seed,
        )
        voted = {
            d: it.stage(
                f"draw{d}/label",
                generate,
                model=voters[d],
                prompts=prompts,
                sampling=m.labelling,
                generator=gen,
                hardware=hw,
                seed=seed,
            )
            for d in other_draws
        }
        # the label sets in draw order, whichever run this is, so every draw's run makes the same stage
        in_order = [voted.get(d, labels) for d in sorted({own_draw, *other_draws})]
        majority = {"voters": in_order[1:], "majority": m.majority} if m.filter == "majority" else {}
        data = it.stage(
            "filter",
            self_labels,
            labels=in_order[0],
            replay=seeds,
            keep=m.filter,
            replay_min=m.replay_min,
            seed=seed,
            earlier=list(earlier) if m.history else [],
            gold_weight=len(dataset["seed_levels"]),
            **majority,
        )
        earlier.append(data)
        model = it.stage("train", sft, model=model, data=data, train=m.train, hardware=hw, seed=seed)
        for d in other_draws:
            voters[d] = it.stage(
                f"draw{d}/train", sft, model=voters[d], data=data, train=m.train, hardware=hw, seed=seed
            )
        run.record(
            it.index,
            it.stage("eval", evaluate, model=model, dataset=dataset, generator=gen, hardware=hw, seed=seed),
            data,
            digits=digits,
        )


def warm_start(
    run: Run, cfg: DictConfig, seeds: Artifact, short: Artifact | None, model_cfg, prefix: str = ""
):
    """The model of ``model_cfg``'s initial draw trained from scratch on the gold lengths (``seeds``),
    first on the short ones (``short``: method.curriculum) if given; ``prefix`` names the stages of
    a voting model."""
    m, hw = cfg.method, cfg.hardware
    model = run.stage(f"{prefix}init", init_model, model=model_cfg, seed=cfg.seed)
    if short is not None:
        steps = {**m.warmstart, "steps": m.curriculum.steps}
        decay = (m.warmstart.lr_scheduler_kwargs or {}).get("num_decay_steps")
        if decay:  # the same share of the short stage's steps is decayed
            share = m.curriculum.steps / m.warmstart.steps
            steps["lr_scheduler_kwargs"] = {
                **m.warmstart.lr_scheduler_kwargs,
                "num_decay_steps": int(decay * share),
            }
        model = run.stage(
            f"{prefix}warmstart/short", sft, model=model, data=short, train=steps, hardware=hw, seed=cfg.seed
        )
    return run.stage(
        f"{prefix}warmstart/train",
        sft,
        model=model,
        data=seeds,
        train=m.warmstart,
        hardware=hw,
        seed=cfg.seed,
    )


def vote_draws(cfg: DictConfig) -> tuple[int, list[int]]:
    """(this run's initial draw, the other draws that vote), checked: method.filter=majority needs
    at least one other draw of a model built here (a hub model has one set of weights), and
    method.vote_draws means nothing under another filter."""
    m = cfg.method
    own = cfg.model.get("init_seed")
    own = cfg.seed if own is None else own
    others = sorted(set(m.vote_draws) - {own})
    if m.filter != "majority":
        if m.vote_draws:
            raise ConfigError(
                f"method.vote_draws={list(m.vote_draws)} is used only by method.filter=majority; "
                "set method.filter=majority or drop method.vote_draws"
            )
        return own, []
    if cfg.model.source != "tiny":
        raise ConfigError(
            f"method.filter=majority votes across models of different initial draws; model.source="
            f"{cfg.model.source!r} loads one set of weights. Use a model built here (model=tiny)"
        )
    if not others:
        raise ConfigError(
            "method.filter=majority needs the initial draws of other models in method.vote_draws "
            f"(this run's is {own}), e.g. method.vote_draws=[0,1,2]"
        )
    if not 0.0 < m.majority <= 1.0:
        raise ConfigError(
            f"method.majority={m.majority} is not allowed; use a fraction of the models in (0, 1]"
        )
    return own, others


def advances(filtered: Artifact, advance_at: float | None) -> bool:
    """Whether the round after ``filtered`` labels the next length: always with ``advance_at`` null
    (Lee et al.: one length per round), else once the model's a+b and b+a labels of the current
    length agreed on at least that fraction of pairs -- a label-free sign that the length is learnt.
    A round not yet computed (``selfimprove status``'s plan) counts as advancing."""
    agreement = filtered.summary().get("agreement")
    return advance_at is None or agreement is None or agreement >= advance_at


def short_to_long(node) -> DictConfig | None:
    """``method.curriculum`` checked against :class:`Curriculum` (null: no curriculum)."""
    if node is None:
        return None
    try:
        curriculum = OmegaConf.merge(OmegaConf.structured(Curriculum), node)
    except (ValueError, KeyError) as err:  # omegaconf's errors derive from these
        reason = str(err).splitlines()[0]
        raise ConfigError(
            f"method.curriculum={node!r} is not allowed ({reason}); use {{digits: N, steps: N}} or null"
        ) from None
    if curriculum.digits < 1 or curriculum.steps < 1:
        raise ConfigError(f"method.curriculum={node!r}: digits and steps must be at least 1")
    return curriculum


#: method.filter: which self-labels a round keeps
FILTERS = ("vote", "length", "none", "majority")


@stage(name="self_labels", version=4)
def self_labels(
    out: Path,
    labels: Artifact,
    replay: Artifact,
    keep: str,
    replay_min: int,
    seed: int,
    earlier: list[Artifact] = (),
    gold_weight: int = 1,
    voters: list[Artifact] = (),
    majority: float = 1.0,
) -> dict:
    """Stage: keep the model's own labels that pass ``keep`` (``length``: as many digits as the task
    says a label can have, ``meta.label_lengths``: n or n+1, n+1 with zero-padded answers; ``vote``:
    that, and the same label for b+a; ``none``: all), written to kept.jsonl, and mix them half and
    half with older data: as many examples as kept, at least ``replay_min`` (a round that keeps a
    handful of labels would otherwise train all its steps on a handful of examples). The older
    half is gold problems, or, with ``earlier`` rounds (method.history), gold problems and those
    rounds' kept labels drawn with weights ``gold_weight`` : 1 : 1 ... (Lee et al.'s
    get_train_dataset: the original data weighted by its number of lengths, each earlier round by 1).
    ``majority`` (with the a+b labels of other models, ``voters``): the label most of the models give,
    kept when at least that fraction of them give it (Lee et al.'s do_majority_vote).
    The true answers are read only to report ``label_accuracy``."""
    pairs: dict[int, dict[bool, dict]] = defaultdict(dict)
    for r in read_jsonl(labels.file("samples.jsonl")):
        pairs[r["meta"]["pair"]][r["meta"]["swapped"]] = r
    votes = {i: [pair[False]["completion"].strip()] for i, pair in pairs.items()}
    for other in voters:
        for r in read_jsonl(other.file("samples.jsonl")):
            if not r["meta"]["swapped"]:
                votes[r["meta"]["pair"]].append(r["completion"].strip())
    kept, kept_pairs, agreeing = [], 0, 0
    for i, pair in pairs.items():
        label = pair[False]["completion"].strip()
        lengths = pair[False]["meta"]["label_lengths"]
        right_length = label.isdigit() and len(label) in lengths
        agrees = right_length and pair.get(True, {}).get("completion", "").strip() == label
        agreeing += agrees
        passes = {"vote": agrees, "length": right_length}.get(keep, True)
        if keep == "majority":
            label, backing = Counter(votes[i]).most_common(1)[0]
            passes = backing >= majority * len(votes[i])
        if not passes:
            continue
        kept += [{**r, "completion": label} for r in pair.values()]  # both orders share the label
        kept_pairs += 1
    gold = read_jsonl(replay.file("train.jsonl"))
    rng = random.Random(seed)
    older = [read_jsonl(a.file("kept.jsonl")) for a in earlier]
    older = [labels for labels in older if labels]
    count = max(len(kept), replay_min)
    if older:  # each example from a source drawn by weight, with replacement
        sources = rng.choices([gold, *older], weights=[gold_weight] + [1] * len(older), k=count)
        replayed = [rng.choice(source) for source in sources]
    else:
        replayed = rng.sample(gold, min(len(gold), count))
    write_jsonl(out / "kept.jsonl", kept)
    data = kept + replayed
    rng.shuffle(data)
    write_jsonl(out / "train.jsonl", data)
    correct = sum(r["completion"] == r["answer"] for r in kept)
    return {
        "labelled": len(pairs),
        "kept": kept_pairs,
        "label_accuracy": round(correct / len(kept), 4) if kept else 0.0,
        # pairs whose labels pass the vote, whatever ``keep`` is (method.advance_at reads it)
        "agreement": round(agreeing / len(pairs), 4) if pairs else 0.0,
        "replayed": len(replayed),
        "examples": len(data),
    }
