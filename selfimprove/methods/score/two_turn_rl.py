"""SCoRe's two-stage multi-turn RL (Kumar et al., 2024) on TRL's GRPOTrainer.

TRL does the RL: sampling groups, the clipped policy-gradient loss, the KL to a reference model,
checkpoints and resume (``training.grpo.train_rl``). What it lacks is a two-turn episode with a
reward per turn, so these pieces live here:

- ``two_turn_rollout``: TRL's ``rollout_func``. From the *current* policy (on-policy), attempt 1,
  then the correction instruction, then attempt 2, returned as one completion whose
  instruction tokens carry ``env_mask = 0`` (TRL leaves them out of the loss).
- ``turn_rewards``: each turn its own instantaneous reward (the paper's gamma = 0, App. A.2), as two
  TRL reward functions: ``turn1`` = r(y1) and ``turn2`` = r(y2) + alpha * (r(y2) - r(y1)) in Stage II
  (Eq. 4 with the bonus of Sec. 5.2); in Stage I ``turn1`` = 0 and ``turn2`` = r(y2) (Eq. 3).
- ``ScoreTrainer``: replaces TRL's one advantage per episode by per-token advantages, each turn's
  from its own reward (group-normalised per turn), and puts the KL coefficient ``beta_first``
  (Stage I's strong beta_2) on attempt-1 tokens and ``rl.beta`` (beta_1) on the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from selfimprove import tasks
from selfimprove.engine.pipeline import Artifact, read_jsonl, stage
from selfimprove.engine.registry import ConfigError
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


def turn_rewards(task: tasks.Task, phase: int, alpha: float) -> list[Callable]:
    """The two turns' rewards as TRL reward functions (TRL logs each mean, and their sum as the
    episode's ``reward``). Stage I: (0, r(y2)); Stage II: (r(y1), r(y2) + alpha * (r(y2) - r(y1))).
    ``turn1`` logs the accuracy of each attempt in the batch (``acc_t1``, ``acc_t2``)."""

    def both(prompts, answer, attempt1, attempt2, meta):
        metas = record_meta(meta, len(prompts))
        r1 = task.reward(prompts=prompts, completions=attempt1, answer=answer, meta=metas)
        return r1, task.reward(prompts=prompts, completions=attempt2, answer=answer, meta=metas)

    def turn1(prompts, completions, answer, attempt1, attempt2, log_metric=None, meta=None, **columns):
        r1, r2 = both(prompts, answer, attempt1, attempt2, meta)
        if log_metric is not None:
            log_metric("acc_t1", sum(r or 0.0 for r in r1) / len(r1))
            log_metric("acc_t2", sum(r or 0.0 for r in r2) / len(r2))
        return [0.0 if phase == 1 and r is not None else r for r in r1]

    def turn2(prompts, completions, answer, attempt1, attempt2, meta=None, **columns):
        r1, r2 = both(prompts, answer, attempt1, attempt2, meta)
        if phase == 1:
            return r2
        return [None if a is None or b is None else b + alpha * (b - a) for a, b in zip(r1, r2)]

    return [turn1, turn2]


def turn_advantages(rewards, group: int, scale: bool):
    """(N, 2) per-turn rewards -> (N, 2) advantages: per turn, GRPO's group baseline (the group's mean
    reward at that turn), divided by the group's std when ``scale``; unscorable rows (NaN) get 0."""
    from trl.trainer.utils import nanstd

    grouped = rewards.view(-1, group, rewards.shape[1])
    advantages = grouped - grouped.nanmean(dim=1, keepdim=True)
    if scale:
        advantages = advantages / (nanstd(grouped, dim=1, keepdim=True) + 1e-4)
    return advantages.reshape(rewards.shape).nan_to_num(0.0)


def first_attempt(tool_mask):
    """Attempt-1 tokens of each completion ``y1 || instruction || y2``: those before the first 0 of
    ``tool_mask`` (TRL's name for the rollout's ``env_mask``)."""
    return (tool_mask == 0).cumsum(dim=1) == 0


def token_advantages(per_turn, tool_mask):
    """(B, 2) per-turn advantages -> (B, T): turn 1's on attempt-1 tokens, turn 2's on the others
    (the instruction's tokens among them, which TRL leaves out of the loss)."""
    import torch

    return torch.where(first_attempt(tool_mask), per_turn[:, :1], per_turn[:, 1:])


class TokenBeta(float):
    """TRL adds ``self.beta * per_token_kl`` to its per-token loss and tests ``self.beta != 0``. This
    float keeps those tests and, multiplied by the (B, T) KL, applies one coefficient per token."""

    def __new__(cls, value: float, weights):
        beta = super().__new__(cls, value)
        beta.weights = weights
        return beta

    def __mul__(self, other):
        return self.weights * other if hasattr(other, "shape") else float(self) * other


def score_trainer_class(beta_first: float, beta: float):
    """GRPOTrainer with per-turn, per-token advantages and the KL coefficient ``beta_first`` on
    attempt-1 tokens, ``beta`` on attempt-2 tokens."""
    import torch
    from trl import GRPOTrainer

    class ScoreTrainer(GRPOTrainer):
        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            self.turn_rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
            return self.turn_rewards  # (N, 2) over all processes: turn1, turn2

        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            local = out["advantages"].shape[0]
            mine = slice(self.accelerator.process_index * local, (self.accelerator.process_index + 1) * local)
            per_turn = turn_advantages(self.turn_rewards, self.num_generations, self.scale_rewards != "none")
            per_turn = per_turn[mine].to(out["advantages"].dtype)
            out["advantages"] = token_advantages(per_turn, out["tool_mask"])
            return out

        def _compute_loss(self, model, inputs):
            if beta_first == beta:
                return super()._compute_loss(model, inputs)
            first = first_attempt(inputs["tool_mask"])
            saved, self.beta = self.beta, TokenBeta(self.beta, torch.where(first, beta_first, beta))
            try:
                return super()._compute_loss(model, inputs)
            finally:
                self.beta = saved

    return ScoreTrainer


@stage(name="score_rl", version=2, resumable=True)
@accelerated
def score_rl(
    out: Path,
    model: Artifact,
    prompts: Artifact,
    dataset: dict,
    phase: int,
    alpha: float,
    beta_first: float,
    train: dict,
    rl: dict,
    hardware: dict,
    seed: int,
) -> dict:
    """Stage: one SCoRe stage (``phase`` 1 or 2) of on-policy two-turn RL from ``model``, the KL to
    ``model`` weighted ``beta_first`` on attempt 1 (Stage I: strong, so attempt 1 stays at the base)
    and ``rl.beta`` on attempt 2."""
    if phase not in STAGES:
        raise ConfigError(f"SCoRe phase {phase} is not allowed; use 1 or 2")
    task = tasks.load(dataset)
    suffix = len(task.turn_prompt("", "", task.correction_instruction))
    beta = rl["beta"]
    # TRL keeps a reference model only when its beta is not 0; ScoreTrainer sets the per-token weights
    rl = {
        **rl,
        "max_completion_length": 2 * rl["max_completion_length"] + suffix,
        "beta": max(beta, beta_first),
    }
    return train_rl(
        out,
        model,
        read_jsonl(prompts.file("prompts.jsonl")),
        turn_rewards(task, phase, alpha),
        train,
        rl,
        hardware,
        seed,
        trainer_class=score_trainer_class(beta_first=beta_first, beta=beta),
        rollout_func=two_turn_rollout(task, (rl["max_completion_length"] - suffix) // 2, rl["temperature"]),
    )
