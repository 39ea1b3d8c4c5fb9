"""The Task interface every dataset implements.

Records are plain dicts: ``id``, ``prompt``, ``answer`` (the reference final answer), ``meta``
(e.g. ``{"level": 3}``), and for gold data ``completion``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

#: What a task can do beyond prompts, test sets and its verifier: each is needed by some method or
#: stage (methods say which in their ``needs``), checked before a run writes anything. A task lists
#: the ones it has in ``capabilities``; docs/tasks.md has the table (tests/test_capabilities.py
#: checks it against this code and calls every capability a task claims).
CAPABILITIES = {
    "demonstrations": "gold demonstrations (prompt + completion) for a warm start",
    "train_prompts": "unlabelled training prompts",
    "extract": "reading a completion's final answer (majority votes, agreement)",
    "hint": "a prompt with the reference answer as a hint (STaR's rationalization)",
    "corrupt": "wrong attempts made from gold ones (two-turn and judge warm-start examples)",
    "similar": "new problems like a given one, with their answers (test-time self-improvement)",
    "step_checker": "the first wrong step of a solution (SPC's critic and sneaky generator)",
    "label_pairs": "unlabelled problems at a new length, asked as a+b and b+a (length generalisation)",
}


class Task(ABC):
    #: bump when prompts, answers or the verifier change; it feeds the stage fingerprints
    version: int = 1
    #: the CAPABILITIES this task has (with its default settings; see ``lacking``)
    capabilities: frozenset[str] = frozenset()

    # -- two-turn episodes (self-correction): what follows an attempt in the second turn's prompt --
    # The defaults are single words for the tiny character-level model on arithmetic; tasks in
    # natural language override the instructions with sentences (SCoRe's wording where it exists).
    #: SCoRe's correction instruction: asks for a second attempt, says nothing about correctness
    correction_instruction: str = "recheck"
    #: Self-Refine's critique prompt; the model answers with ``feedback_ok`` or ``feedback_wrong``
    verify_instruction: str = "verify"
    #: feedback that the attempt is right (stop refining) / wrong (refine it); keep each a single
    #: short word: Self-Refine's critique parser compares the whole stripped reply with them
    feedback_ok: str = "ok"
    feedback_wrong: str = "wrong"

    def __init__(self, cfg: dict):
        self.cfg = dict(cfg)

    @classmethod  # noqa: B027 (an optional hook: most tasks have nothing to check)
    def check(cls, cfg: dict) -> None:
        """Raise ConfigError for a bad dataset setting; cheap, called before a run writes anything."""

    @classmethod
    def lacking(cls, cfg: dict) -> dict[str, str]:
        """The CAPABILITIES this task lacks with the settings ``cfg``, each with why (and, when a
        setting is the cause, the fix). Cheap: reads the config only, never the data."""
        return {c: "it has none" for c in CAPABILITIES if c not in cls.capabilities}

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
        """The final answer of a completion (for majority votes), or None when it has none; two
        completions with equal extracted answers give the same answer."""
        raise NotImplementedError(
            f"task '{self.cfg.get('name')}' cannot extract answers, so maj@k and agreement are unavailable"
        )

    def final(self, completion: str) -> str | None:
        """What two completions are compared by (Self-Refine's "unchanged answer" stop): the
        extracted answer where the task can extract one, else the cleaned completion itself."""
        if "extract" in self.capabilities:
            return self.extract(completion)
        return self.clean(completion)

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
        return int(self.cfg.get("completion_tokens", 256))
