"""SCoRe's two-stage multi-turn RL (Kumar et al., 2024) on TRL's GRPOTrainer.

TRL does the RL: sampling groups, the group baseline, the clipped policy-gradient loss, the KL to a
reference model (``beta``), checkpoints and resume (``training.grpo.train_rl``). What it lacks is a
two-turn episode, so three small pieces live here:

- ``two_turn_rollout``: TRL's ``rollout_func``. From the *current* policy (on-policy), attempt 1,
  then the correction instruction, then attempt 2, returned as one completion whose
  instruction tokens carry ``env_mask = 0`` (TRL leaves them out of the loss).
- ``shaped_reward``: Stage I pays r(y2); Stage II pays r(y1) + r(y2) + alpha * (r(y2) - r(y1)).
- ``ScoreTrainer``: in Stage I the advantage is applied to attempt-2 tokens only (per-token
  advantages, which TRL's loss accepts), so attempt 1 moves only under the KL that holds it to the
  base model; Stage II trains both attempts.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from selfimprove import tasks
from selfimprove.pipeline import Artifact, read_jsonl, stage
from selfimprove.registry import ConfigError
from selfimprove.training.grpo import record_meta, train_rl
from selfimprove.training.launch import accelerated

STAGES = (1, 2)


def sample_ids(
    model, tokenizer, contexts: list[list[int]], max_new: int, temperature: float
) -> list[list[int]]:
    """One sampled continuation per context (token ids, cut at the first EOS, which is kept)."""
    import torch

    width = max(len(c) for c in contexts)
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(c)) + c for c in contexts])
    mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in contexts])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids.to(model.device),
            attention_mask=mask.to(model.device),
            max_new_tokens=max_new,
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None,
            top_p=1.0,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    rows = []
    for seq in out[:, ids.shape[1] :].tolist():
        if tokenizer.eos_token_id in seq:
            seq = seq[: seq.index(tokenizer.eos_token_id) + 1]
        rows.append([t for t in seq if t != tokenizer.pad_token_id])
    return rows


def two_turn_rollout(task: tasks.Task, max_new: int, temperature: float) -> Callable:
    """TRL ``rollout_func``: attempt 1 from the prompt, attempt 2 after the correction instruction,
    both sampled from the trainer's current model; one completion per prompt it is given (TRL has
    already repeated each prompt num_generations times)."""
    suffix = task.turn_prompt("", "", task.correction_instruction)  # what follows attempt 1

    def rollout(prompts: list, trainer) -> dict:
        if not isinstance(prompts[0], str):
            raise ConfigError("method=score builds plain-text turns; use a model without a chat template")
        model, tokenizer = trainer.model, trainer.processing_class
        encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
        instruction = encode(suffix)
        prompt_ids = [encode(p) for p in prompts]
        training = model.training
        model.eval()
        first = sample_ids(model, tokenizer, prompt_ids, max_new, temperature)
        attempt1 = [task.clean(tokenizer.decode(ids, skip_special_tokens=True)) for ids in first]
        first = [encode(text) for text in attempt1]  # cut after the answer, as the turn prompt shows it
        second = sample_ids(
            model, tokenizer, [p + a + instruction for p, a in zip(prompt_ids, first)], max_new, temperature
        )
        model.train(training)
        return {
            "prompt_ids": prompt_ids,
            "completion_ids": [a + instruction + b for a, b in zip(first, second)],
            "logprobs": None,
            "env_mask": [[1] * len(a) + [0] * len(instruction) + [1] * len(b) for a, b in zip(first, second)],
            "attempt1": attempt1,
            "attempt2": [tokenizer.decode(ids, skip_special_tokens=True) for ids in second],
        }

    return rollout


def shaped_reward(task: tasks.Task, phase: int, alpha: float) -> Callable:
    """Stage I: r(y2). Stage II: r(y1) + r(y2) + alpha * (r(y2) - r(y1)) (SCoRe's progress bonus).
    Logs the accuracy of each attempt in the batch (``acc_t1``, ``acc_t2``)."""

    def score_reward(prompts, completions, answer, attempt1, attempt2, log_metric=None, meta=None, **columns):
        metas = record_meta(meta, len(completions))
        r1 = task.reward(prompts=prompts, completions=attempt1, answer=answer, meta=metas)
        r2 = task.reward(prompts=prompts, completions=attempt2, answer=answer, meta=metas)
        if log_metric is not None:
            log_metric("acc_t1", sum(r or 0.0 for r in r1) / len(r1))
            log_metric("acc_t2", sum(r or 0.0 for r in r2) / len(r2))
        if phase == 1:
            return r2
        return [None if a is None or b is None else a + b + alpha * (b - a) for a, b in zip(r1, r2)]

    return score_reward


def score_trainer_class(train_first_attempt: bool):
    """GRPOTrainer whose advantages reach attempt 1 only when ``train_first_attempt`` (Stage II)."""
    from trl import GRPOTrainer

    class ScoreTrainer(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            if not train_first_attempt:
                # tool_mask (TRL's name for env_mask): 1 = model token; attempt 2 starts after the first 0
                second = (out["tool_mask"] == 0).cumsum(dim=1) > 0
                out["advantages"] = out["advantages"].reshape(-1, 1) * second.to(out["advantages"].dtype)
            return out

    return ScoreTrainer


@stage(version=1, resumable=True)
@accelerated
def score_rl(
    out: Path,
    model: Artifact,
    prompts: Artifact,
    dataset: dict,
    phase: int,
    alpha: float,
    train: dict,
    rl: dict,
    hardware: dict,
    seed: int,
) -> dict:
    """Stage: one SCoRe stage (``phase`` 1 or 2) of on-policy two-turn RL from ``model``; TRL's
    ``beta`` is the KL coefficient to ``model`` (Stage I: strong, so attempt 1 stays at the base)."""
    if phase not in STAGES:
        raise ConfigError(f"SCoRe phase {phase} is not allowed; use 1 or 2")
    task = tasks.load(dataset)
    suffix = len(task.turn_prompt("", "", task.correction_instruction))
    rl = {**rl, "max_completion_length": 2 * rl["max_completion_length"] + suffix}
    return train_rl(
        out,
        model,
        read_jsonl(prompts.file("prompts.jsonl")),
        shaped_reward(task, phase, alpha),
        train,
        rl,
        hardware,
        seed,
        trainer_class=score_trainer_class(train_first_attempt=phase == 2),
        rollout_func=two_turn_rollout(task, (rl["max_completion_length"] - suffix) // 2, rl["temperature"]),
    )
