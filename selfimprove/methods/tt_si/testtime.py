"""Test-time self-improvement (Acikgoz et al. 2025): find the test items the model is uncertain
on, synthesise similar training examples for each, fine-tune a LoRA adapter briefly on them,
answer, and reset the adapter.

The LoRA loop is a few lines of torch over peft rather than a TRL trainer: it runs once per
uncertain item (tens to hundreds of times per evaluation) for ~10 steps, where building a
trainer would cost more than the training."""

from __future__ import annotations

import math
import random
from collections import defaultdict
from pathlib import Path

from selfimprove import tasks
from selfimprove.engine.pipeline import Artifact, read_jsonl, stage, write_json_atomic, write_jsonl
from selfimprove.engine.registry import ConfigError
from selfimprove.generation import sample
from selfimprove.metrics import fraction, majority
from selfimprove.models import load_model, model_meta, prompt_texts
from selfimprove.scoring import verify_records

# relative_softmax: the paper's (margin of the two likeliest candidate answers); agreement,
# self_certainty: alternatives
MEASURES = ("relative_softmax", "agreement", "self_certainty")


def relative_softmax_margin(log_likelihoods: list[float]) -> float:
    """TT-SI's confidence (Acikgoz et al. 2025, Self-Awareness): the candidates' log-likelihoods
    l_n -> p = softmax(l) (computed as exp(l_n - max l)); the margin p(1) - p(2) between the two
    likeliest. One candidate: 1.0 (nothing to doubt)."""
    top = max(log_likelihoods)
    weights = sorted((math.exp(x - top) for x in log_likelihoods), reverse=True)
    return (weights[0] - (weights[1] if len(weights) > 1 else 0.0)) / sum(weights)


def candidate_margins(
    task, model: Artifact, greedy: list[dict], drawn: list[dict], hardware: dict
) -> list[float]:
    """Per test item, the relative softmax margin over its candidate answers: the distinct final
    answers of the greedy completion and the sampled ones (an unparseable answer is a candidate
    too), each answer scored by the log-likelihood of its likeliest completion."""
    from selfimprove.scoring.certainty import certainties, log_likelihood

    records = [*greedy, *drawn]
    scores = certainties(model, records, hardware, of=log_likelihood)
    best: dict[str, dict] = defaultdict(dict)
    for r, score in zip(records, scores):
        answer = task.extract(r["completion"])
        if score is not None and score > best[r["id"]].get(answer, -math.inf):
            best[r["id"]][answer] = score
    return [relative_softmax_margin(list(best[r["id"]].values())) if best[r["id"]] else 0.0 for r in greedy]


def greedy_records(evaluated: Artifact) -> list[dict]:
    """The greedy answers of an evaluate stage (its samples.jsonl minus sampled ones)."""
    return [r for r in read_jsonl(evaluated.file("samples.jsonl")) if not r["meta"].get("sampled")]


@stage(name="uncertainty", version=1)
def uncertainty(
    out: Path,
    model: Artifact,
    evaluated: Artifact,
    dataset: dict,
    uncertain: dict,
    generator: dict,
    hardware: dict,
    seed: int,
) -> dict:
    """Stage: a confidence per test item -- the relative softmax margin of its candidate answers
    (the greedy one and ``samples`` sampled ones), the agreement of ``samples`` answers with their
    majority, or the self-certainty of the greedy answer; items below ``threshold`` are uncertain."""
    if uncertain["measure"] not in MEASURES:
        raise ConfigError(
            f"method.uncertainty.measure='{uncertain['measure']}' is not allowed; use {' or '.join(MEASURES)}"
        )
    task = tasks.load(dataset)
    greedy = greedy_records(evaluated)
    if uncertain["measure"] in ("relative_softmax", "agreement"):
        sampling = {
            "n": uncertain["samples"],
            "temperature": uncertain["temperature"],
            "top_p": 1.0,
            "stop": [],
        }
        sampling["max_tokens"] = max(task.max_new_tokens(r) for r in greedy)
        drawn = sample(model, greedy, sampling, generator, hardware, seed)
    if uncertain["measure"] == "relative_softmax":
        confidence = candidate_margins(task, model, greedy, drawn, hardware)
    elif uncertain["measure"] == "agreement":
        answers = defaultdict(list)
        for r in drawn:
            answers[r["id"]].append(task.extract(r["completion"]))
        confidence = []
        for r in greedy:
            top = majority(answers[r["id"]])
            confidence.append(sum(a == top for a in answers[r["id"]]) / len(answers[r["id"]]) if top else 0.0)
    else:
        from selfimprove.scoring.certainty import certainties

        confidence = certainties(model, greedy, hardware)
    records = [
        {**r, "confidence": c, "uncertain": c is None or c < uncertain["threshold"]}
        for r, c in zip(greedy, confidence)
    ]
    write_jsonl(out / "items.jsonl", records)
    flagged = [r for r in records if r["uncertain"]]
    return {
        "tt/uncertain": len(flagged),
        "tt/uncertain_greedy_acc": fraction([r["reward"] == 1.0 for r in flagged], 0.0),
        "tt/certain_greedy_acc": fraction([r["reward"] == 1.0 for r in records if not r["uncertain"]], 0.0),
    }


@stage(name="synthesize", version=1)
def synthesize(
    out: Path,
    model: Artifact,
    items: Artifact,
    dataset: dict,
    synthesis: dict,
    generator: dict,
    hardware: dict,
    seed: int,
) -> dict:
    """Stage: for each uncertain item, ``problems`` similar problems drawn by the task, each solved
    ``solutions`` times by ``model`` (TT-SI) or by the model folder ``teacher`` names (TT-D). With ``verify``
    only solutions with the right answer are kept; otherwise each problem's majority-answer
    solution (no label used). Writes train.jsonl with ``meta.for_id``."""
    task = tasks.load(dataset)
    solver = Path(synthesis["teacher"]) if synthesis["teacher"] else model
    flagged = [r for r in read_jsonl(items.file("items.jsonl")) if r["uncertain"]]
    problems = [
        {**p, "meta": {**p["meta"], "for_id": r["id"]}}
        for r in flagged
        for p in task.similar(r, synthesis["problems"], seed)
    ]
    if not problems:
        write_jsonl(out / "train.jsonl", [])
        return {"tt/problems": 0, "tt/train_samples": 0, "tokens/synthesis": 0}
    sampling = {
        "n": synthesis["solutions"],
        "temperature": synthesis["temperature"],
        "top_p": 1.0,
        "stop": [],
    }
    sampling["max_tokens"] = max(task.max_new_tokens(p) for p in problems)
    drawn = verify_records(task, sample(solver, problems, sampling, generator, hardware, seed))
    by_problem = defaultdict(list)
    for r in drawn:
        by_problem[(r["meta"]["for_id"], r["id"])].append(r)
    kept = []
    for group in by_problem.values():
        if synthesis["verify"]:
            chosen = [r for r in group if r["reward"] == 1.0][:1]
        else:
            top = majority([task.extract(r["completion"]) for r in group])
            chosen = [r for r in group if top is not None and task.extract(r["completion"]) == top][:1]
        kept += [{**r, "completion": task.clean(r["completion"])} for r in chosen]
    write_jsonl(out / "train.jsonl", kept)
    return {
        "tt/problems": len(problems),
        "tt/train_samples": len(kept),
        "tt/train_samples_correct": sum(r["reward"] == 1.0 for r in kept),
        "tokens/synthesis": sum(r["meta"]["tokens"] for r in drawn),
    }


def lora_model(model: Artifact, adapt: dict, hardware: dict):
    """The model wrapped with a fresh LoRA adapter, and the adapter's initial weights (to reset)."""
    from peft import LoraConfig, get_peft_model

    lm, tokenizer = load_model(model, hardware)
    config = LoraConfig(
        r=adapt["rank"], lora_alpha=adapt["alpha"], lora_dropout=0.0, target_modules=adapt["target_modules"]
    )
    peft_lm = get_peft_model(lm, config)
    initial = {k: v.detach().clone() for k, v in peft_lm.named_parameters() if v.requires_grad}
    return peft_lm, tokenizer, initial


def completion_rows(tokenizer, meta: dict, examples: list[dict]) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per example: the prompt as generation writes it (chat template or not,
    ``meta``: the model's :func:`model_meta`), then the completion and EOS, the only tokens with loss."""
    rows = []
    texts, special_tokens = prompt_texts(meta, tokenizer, [r["prompt"] for r in examples])
    for text, r in zip(texts, examples):
        p = tokenizer(text, add_special_tokens=special_tokens)["input_ids"]
        c = tokenizer(r["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((p + c, [-100] * len(p) + c))
    return rows


def fine_tune(peft_lm, tokenizer, meta: dict, initial: dict, examples: list[dict], adapt: dict) -> None:
    """Reset the adapter, then ``adapt.steps`` full-batch AdamW steps on :func:`completion_rows`."""
    import torch

    with torch.no_grad():
        params = dict(peft_lm.named_parameters())
        for name, value in initial.items():
            params[name].copy_(value)
    trainable = [p for p in peft_lm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=adapt["lr"], weight_decay=0.0)
    rows = completion_rows(tokenizer, meta, examples)
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor(
        [x + [tokenizer.pad_token_id] * (width - len(x)) for x, _ in rows], device=peft_lm.device
    )
    labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in rows], device=peft_lm.device)
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in rows], device=peft_lm.device)
    peft_lm.train()
    for _ in range(adapt["steps"]):
        loss = peft_lm(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_lm.eval()


def answer(peft_lm, tokenizer, meta: dict, records: list[dict], max_tokens: int) -> list[str]:
    """Greedy answers, prompted as the generation backends prompt (chat template or not)."""
    import torch

    texts, special_tokens = prompt_texts(meta, tokenizer, [r["prompt"] for r in records])
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=special_tokens)
    batch = batch.to(peft_lm.device)
    with torch.inference_mode():
        seqs = peft_lm.generate(
            **batch,
            max_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    return tokenizer.batch_decode(seqs[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


@stage(name="adapt_and_answer", version=1)
def adapt_and_answer(
    out: Path,
    model: Artifact,
    items: Artifact,
    synthesized: Artifact,
    dataset: dict,
    adapt: dict,
    hardware: dict,
    seed: int,
) -> dict:
    """Stage: for each group of ``items_per_adapter`` uncertain items, reset the LoRA adapter,
    fine-tune it on the group's synthesised examples, answer greedily. Certain items keep their
    greedy answer. Writes answers.jsonl and metrics.json (acc/<level> with test-time training)."""
    import torch

    task = tasks.load(dataset)
    records = read_jsonl(items.file("items.jsonl"))
    examples = defaultdict(list)
    for r in read_jsonl(synthesized.file("train.jsonl")):
        examples[r["meta"]["for_id"]].append(r)
    flagged = [r for r in records if r["uncertain"]]
    torch.manual_seed(seed)
    random.seed(seed)
    peft_lm, tokenizer, initial = lora_model(model, adapt, hardware)
    meta = model_meta(model)
    size = adapt["items_per_adapter"]
    if size < 1:
        raise ConfigError(f"method.adapt.items_per_adapter={size} must be >= 1")
    new_answers, used, adapted = {}, 0, 0
    for start in range(0, len(flagged), size):
        group = flagged[start : start + size]
        train = [x for r in group for x in examples[r["id"]]]
        if not train:  # nothing survived synthesis: keep the greedy answers
            continue
        fine_tune(peft_lm, tokenizer, meta, initial, train, adapt)
        used += len(train)
        adapted += len(group)
        completions = answer(peft_lm, tokenizer, meta, group, max(task.max_new_tokens(r) for r in group))
        new_answers.update({r["id"]: c for r, c in zip(group, completions)})
    final = [
        {
            **r,
            "completion": new_answers.get(r["id"], r["completion"]),
            "meta": {**r["meta"], "adapted": r["id"] in new_answers},
        }
        for r in records
    ]
    final = verify_records(task, final)
    levels = defaultdict(list)
    for r in final:
        levels[str(r["meta"]["level"])].append(r["reward"] == 1.0)
    before = {r["id"]: r["reward"] == 1.0 for r in records}
    metrics = {f"acc/{level}": fraction(v) for level, v in sorted(levels.items())}
    metrics.update(
        {
            "tt/adapted_items": adapted,
            "tt/train_samples_used": used,
            "tt/fixed": sum(r["reward"] == 1.0 and not before[r["id"]] for r in final),
            "tt/broken": sum(r["reward"] != 1.0 and before[r["id"]] for r in final),
        }
    )
    write_jsonl(out / "answers.jsonl", final)
    write_json_atomic(out / "metrics.json", metrics)
    return {"tt/adapted_items": adapted}
