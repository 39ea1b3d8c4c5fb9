"""The Task interface every dataset implements.

Records are plain dicts: ``id``, ``prompt``, ``answer`` (the reference final answer), ``meta``
(e.g. ``{"level": 3}``), and for gold data ``completion``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod


class Task(ABC):
    #: bump when prompts, answers or the verifier change; it feeds the stage fingerprints
    version: int = 1

    # -- two-turn episodes (self-correction): what follows an attempt in the second turn's prompt --
    #: SCoRe's correction instruction: asks for a second attempt, says nothing about correctness
    correction_instruction: str = "recheck"
    #: Self-Refine's critique prompt; the model answers with ``feedback_ok`` or ``feedback_wrong``
    verify_instruction: str = "verify"
    #: feedback that the attempt is right (stop refining) / wrong (refine it)
    feedback_ok: str = "ok"
    feedback_wrong: str = "wrong"

    def __init__(self, cfg: dict):
        self.cfg = dict(cfg)

    @classmethod  # noqa: B027 (an optional hook: most tasks have nothing to check)
    def check(cls, cfg: dict) -> None:
        """Raise ConfigError for a bad dataset setting; cheap, called before a run writes anything."""

    @abstractmethod
    def seed_data(self) -> list[dict]:
        """Gold demonstrations (prompt + completion) for the warm start."""

    @abstractmethod
    def train_prompts(self, iteration: int) -> list[dict]:
        """Unlabelled prompts (answer only, no rationale) for one self-improvement iteration."""

    @abstractmethod
    def test_sets(self) -> dict[str, list[dict]]:
        """Held-out prompts per difficulty, never seen in training."""

    @abstractmethod
    def reward(
        self, prompts: list[str], completions: list[str], answer: list[str], **columns
    ) -> list[float | None]:
        """TRL's reward-function contract: one score per completion; None means "cannot judge"."""

    def extract(self, completion: str) -> str | None:
        """The final answer of a completion (for majority votes), or None when it has none."""
        raise NotImplementedError(
            f"task '{self.cfg.get('name')}' cannot extract answers, so maj@k and agreement are unavailable"
        )

    def similar(self, record: dict, count: int, seed: int) -> list[dict]:
        """``count`` new problems like ``record`` (same difficulty, answer known, not in the test
        set), for test-time self-improvement."""
        raise NotImplementedError(f"task '{self.cfg.get('name')}' cannot synthesise similar problems")

    def clean(self, completion: str) -> str:
        """The completion as it should be trained on (e.g. cut after the final answer)."""
        return completion

    def hint_prompt(self, record: dict) -> str:
        """The prompt with the reference answer as a hint, for STaR's rationalization."""
        raise NotImplementedError(
            f"task '{self.cfg.get('name')}' has no hint format, so method.rationalize must be false"
        )

    def turn_prompt(self, prompt: str, attempt: str, instruction: str) -> str:
        """The prompt of a later turn: the problem, the previous attempt (cut after its answer) and
        an instruction or feedback (``correction_instruction``, ``verify_instruction``,
        ``feedback_wrong``). Only the last attempt is shown, not the whole history."""
        return f"{prompt}{self.clean(attempt)}\n{instruction}:"

    def corrupt(self, record: dict, rng) -> str:
        """A plausible wrong attempt at a gold ``record`` (for two-turn warm-start data)."""
        raise NotImplementedError(
            f"task '{self.cfg.get('name')}' cannot corrupt attempts, so it has no two-turn warm-start data"
        )

    def max_new_tokens(self, record: dict) -> int:
        """A generous completion budget for this record."""
        return int(self.cfg.get("max_new_tokens", 256))
