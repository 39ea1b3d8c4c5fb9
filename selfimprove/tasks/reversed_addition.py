"""Addition with every number written least-significant digit first and no scratchpad, the format
of Lee et al. (ICML 2025) for length generalisation by self-improvement:

    prompt      375+588=      (573 + 885, digits reversed)
    completion  8541          (1458 reversed)

Gold labels exist for the seed levels (digits per operand); the train prompts of round r have
``max(seed_levels) + r`` digits and come in pairs, a+b and b+a, so that a method can keep a
self-generated label only when the model agrees with itself on both orders. Their ``answer`` is
the true sum, used only to score the held-out sets and to measure how good the kept labels are.
"""

from __future__ import annotations

import random

from selfimprove.registry import ConfigError
from selfimprove.tasks.base import Task

#: dataset.seed_lengths: both operands of a level-n gold problem have n digits, or one has n and the
#: other 1..n digits (either order), as the lengths are drawn independently in Lee et al.'s data
SEED_LENGTHS = ("equal", "mixed")


def rev(number: int) -> str:
    return str(number)[::-1]


class ReversedAddition(Task):
    version = 1

    @classmethod
    def check(cls, cfg: dict) -> None:
        if cfg["seed_lengths"] not in SEED_LENGTHS:
            raise ConfigError(
                f"dataset.seed_lengths={cfg['seed_lengths']!r} is not allowed; use one of "
                + ", ".join(SEED_LENGTHS)
            )

    def _operand(self, rng: random.Random, digits: int) -> int:
        return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)

    def _record(self, a: int, b: int, split: str, index: int, gold: bool = False, **meta) -> dict:
        digits = max(len(str(a)), len(str(b)))
        rec = {
            "id": f"{split}-{digits}-{index}",
            "prompt": f"{rev(a)}+{rev(b)}=",
            "answer": rev(a + b),
            "meta": {"level": digits, "a": a, "b": b, **meta},
        }
        if gold:
            rec["completion"] = rev(a + b)
        return rec

    def _pairs(
        self, key: str, digits: int, count: int, held_out: bool = True, mixed: bool = False
    ) -> list[tuple[int, int]]:
        """``count`` problems (held-out test problems excluded unless this draws the test set);
        ``mixed``: the second operand has 1..``digits`` digits and the two are in random order."""
        rng = random.Random(key)
        test = self._test_pairs(digits) if held_out and digits > 1 else set()
        out = []
        while len(out) < count:
            pair = (
                self._operand(rng, digits),
                self._operand(rng, rng.randint(1, digits) if mixed else digits),
            )
            if mixed and rng.random() < 0.5:
                pair = pair[::-1]
            if pair not in test:
                out.append(pair)
        return out

    def _test_pairs(self, digits: int) -> set[tuple[int, int]]:
        key = f"reversed-test-{self.cfg['test_seed']}-{digits}"
        return set(self._pairs(key, digits, self.cfg["test_per_level"], held_out=False))

    def seed_data(self) -> list[dict]:
        out = []
        for digits in self.cfg["seed_levels"]:
            for a, b in self._pairs(
                f"reversed-seed-{self.cfg['seed']}-{digits}",
                digits,
                self.cfg["seed_per_level"],
                mixed=self.cfg["seed_lengths"] == "mixed",
            ):
                out.append(self._record(a, b, "seed", len(out), gold=True))
        return out

    def train_prompts(self, iteration: int) -> list[dict]:
        digits = max(self.cfg["seed_levels"]) + iteration
        key = f"reversed-train-{self.cfg['seed']}-{iteration}"
        out = []
        for i, (a, b) in enumerate(self._pairs(key, digits, self.cfg["train_per_iteration"])):
            out.append(self._record(a, b, f"train{iteration}", i, pair=i, swapped=False))
            out.append({**self._record(b, a, f"train{iteration}", i, pair=i, swapped=True)})
            out[-1]["id"] += "-swap"
        return out

    def test_sets(self) -> dict[str, list[dict]]:
        return {
            str(d): [
                self._record(a, b, "test", i)
                for i, (a, b) in enumerate(
                    self._pairs(
                        f"reversed-test-{self.cfg['test_seed']}-{d}", d, self.cfg["test_per_level"], False
                    )
                )
            ]
            for d in self.cfg["test_levels"]
        }

    def reward(
        self, prompts: list[str], completions: list[str], answer: list[str], **columns
    ) -> list[float | None]:
        return [1.0 if c.strip() == str(a) else 0.0 for c, a in zip(completions, answer)]

    def clean(self, completion: str) -> str:
        return completion.strip()

    def max_new_tokens(self, record: dict) -> int:
        return record["meta"]["level"] + 3
