"""Addition with every number written least-significant digit first and no scratchpad, the format
of Lee et al. (ICML 2025) for length generalisation by self-improvement:

    prompt      375+588=      (573 + 885, digits reversed)
    completion  8541          (1458 reversed)

With ``dataset.pad_answers`` every answer is zero-padded to one digit more than its longest operand,
as in Lee et al.'s code (``52+3=`` -> ``820`` rather than ``82``), so every right label of an
n-digit problem has n+1 digits.

Gold labels exist for the seed levels (digits per operand); the train prompts of round r have
``max(seed_levels) + r`` digits and come in pairs, a+b and b+a, so that a method can keep a
self-generated label only when the model agrees with itself on both orders. Their ``answer`` is
the true sum, used only to score the held-out sets and to measure how good the kept labels are.
The hint format follows the scratchpad task's: ``375+588=`` becomes ``375+588|8541=``.
Test sets are held out as the scratchpad task's are (``arithmetic.py``): drawn first, distinct,
at most half of a level's distinct problems, and never seen -- nor their b+a twins -- in training.
"""

from __future__ import annotations

import random
import re

from selfimprove.engine.registry import ConfigError
from selfimprove.tasks.arithmetic import distinct_problems, operands, test_count, with_twins
from selfimprove.tasks.base import Task

#: dataset.seed_lengths: both operands of a level-n gold problem have n digits; or one has n and the
#: other 1..n digits (either order); or both lengths drawn independently and uniformly over the seed
#: levels, as the reference script and Lee et al.'s data (a problem's level is its longer operand)
SEED_LENGTHS = ("equal", "mixed", "independent")
DIGITS = re.compile(r"[0-9]+")


def rev(number: int) -> str:
    return str(number)[::-1]


class ReversedAddition(Task):
    version = 2  # 2: test problems and their b+a twins held out at every level
    capabilities = frozenset(
        {"demonstrations", "train_prompts", "extract", "hint", "corrupt", "similar", "label_pairs"}
    )

    @classmethod
    def lacking(cls, cfg: dict) -> dict[str, str]:
        out = {"step_checker": "no scratchpad: the completion is the answer alone, with no steps to check"}
        if cfg.get("seed_per_level", 1) == 0 or cfg.get("seed_levels") == []:
            out["demonstrations"] = "dataset.seed_per_level=0 (or no seed_levels) labels none; set it to N"
        if cfg.get("train_per_iteration", 1) == 0:
            out["train_prompts"] = (
                "dataset.train_per_iteration=0 draws none; set dataset.train_per_iteration=N"
            )
            out["label_pairs"] = out["train_prompts"]
        return out

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
        answer = rev(a + b)
        if self.cfg["pad_answers"]:  # Lee et al.: the reversed sum ljust-ed with 0s to n+1 digits
            answer = answer.ljust(digits + 1, "0")
        rec = {
            "id": f"{split}-{digits}-{index}",
            "prompt": f"{rev(a)}+{rev(b)}=",
            "answer": answer,
            # the lengths a label of this problem can have, known without its answer (the length filter)
            "meta": {"level": digits, "a": a, "b": b, "label_lengths": self.label_lengths(digits), **meta},
        }
        if gold:
            rec["completion"] = answer
        return rec

    def label_lengths(self, digits: int) -> list[int]:
        """n+1 digits when answers are zero-padded, else n or n+1 (a carry out of the top digit)."""
        return [digits + 1] if self.cfg["pad_answers"] else [digits, digits + 1]

    def _drawn(self, count: int, draw) -> list[tuple[int, int]]:
        """``count`` pairs from ``draw()``, none a test problem or its b+a twin (at the level of its
        longer operand)."""
        held_out: dict[int, set[tuple[int, int]]] = {}
        out = []
        while len(out) < count:
            pair = draw()
            level = max(len(str(n)) for n in pair)
            if level not in held_out:
                held_out[level] = self._test_pairs(level)
            if pair not in held_out[level]:
                out.append(pair)
        return out

    def _pairs(self, key: str, digits: int, count: int, mixed: bool = False) -> list[tuple[int, int]]:
        """``count`` problems of ``digits`` digits, none held out; ``mixed``: the second operand has
        1..``digits`` digits and the two are in random order."""
        rng = random.Random(key)

        def draw() -> tuple[int, int]:
            pair = (
                self._operand(rng, digits),
                self._operand(rng, rng.randint(1, digits) if mixed else digits),
            )
            return pair[::-1] if mixed and rng.random() < 0.5 else pair

        return self._drawn(count, draw)

    def _test_list(self, digits: int) -> list[tuple[int, int]]:
        """A level's test problems: distinct (a+b and b+a are one), at most half the level's."""
        rng = random.Random(f"reversed-test-{self.cfg['test_seed']}-{digits}")
        return distinct_problems(
            lambda: (self._operand(rng, digits), self._operand(rng, digits)),
            test_count(digits, self.cfg["test_per_level"]),
        )

    def _test_pairs(self, digits: int) -> set[tuple[int, int]]:
        """What training never sees at a level: its test problems and their b+a twins."""
        return with_twins(self._test_list(digits))

    def _independent_pairs(self, count: int) -> list[tuple[int, int]]:
        """``count`` problems whose two operand lengths are drawn independently and uniformly over the
        seed levels (so 36 % have a 5-digit operand with levels 1-5, not 20 %), none held out."""
        rng = random.Random(f"reversed-seed-{self.cfg['seed']}-independent")
        levels = self.cfg["seed_levels"]
        return self._drawn(
            count, lambda: (self._operand(rng, rng.choice(levels)), self._operand(rng, rng.choice(levels)))
        )

    def seed_data(self) -> list[dict]:
        if self.cfg["seed_lengths"] == "independent":
            pairs = self._independent_pairs(self.cfg["seed_per_level"] * len(self.cfg["seed_levels"]))
            return [self._record(a, b, "seed", i, gold=True) for i, (a, b) in enumerate(pairs)]
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

    def train_prompts(self, iteration: int, digits: int | None = None) -> list[dict]:
        """Iteration r's problems: both operands max(seed_levels) + r digits, or ``digits`` (a
        length_gen round that labels a length again: method.advance_at)."""
        digits = max(self.cfg["seed_levels"]) + iteration if digits is None else digits
        key = f"reversed-train-{self.cfg['seed']}-{iteration}"
        out = []
        for i, (a, b) in enumerate(self._pairs(key, digits, self.cfg["train_per_iteration"])):
            out.append(self._record(a, b, f"train{iteration}", i, pair=i, swapped=False))
            out.append({**self._record(b, a, f"train{iteration}", i, pair=i, swapped=True)})
            out[-1]["id"] += "-swap"
        return out

    def test_sets(self) -> dict[str, list[dict]]:
        return {
            str(d): [self._record(a, b, "test", i) for i, (a, b) in enumerate(self._test_list(d))]
            for d in self.cfg["test_levels"]
        }

    def reward(
        self, prompts: list[str], completions: list[str], answer: list[str], **columns
    ) -> list[float | None]:
        return [1.0 if c.strip() == str(a) else 0.0 for c, a in zip(completions, answer)]

    def clean(self, completion: str) -> str:
        return completion.strip()

    def extract(self, completion: str) -> str | None:
        """The completion stripped when it is all digits (the whole answer), else None."""
        answer = completion.strip()
        return answer if DIGITS.fullmatch(answer) else None

    def hint_prompt(self, record: dict) -> str:
        return f"{record['prompt'][:-1]}|{record['answer']}="

    def corrupt(self, record: dict, rng: random.Random) -> str:
        """The gold completion with one digit changed to another (so it is wrong)."""
        gold = record.get("completion", record["answer"])
        i = rng.randrange(len(gold))
        return gold[:i] + rng.choice([d for d in "0123456789" if d != gold[i]]) + gold[i + 1 :]

    def similar(self, record: dict, count: int, seed: int) -> list[dict]:
        """``count`` distinct new problems at the record's level (held-out test problems and the
        record itself left out), the same for the same seed and record."""
        digits, rng = record["meta"]["level"], random.Random(f"reversed-similar-{seed}-{record['id']}")
        test = self._test_pairs(digits)
        own = (record["meta"]["a"], record["meta"]["b"])
        pool = operands(digits) ** 2 - len(test) - 1
        pairs: dict[tuple[int, int], None] = {}
        while len(pairs) < min(count, pool):
            pair = (self._operand(rng, digits), self._operand(rng, digits))
            if pair not in test and pair != own:
                pairs[pair] = None
        return [self._record(a, b, f"similar-{record['id']}", i) for i, (a, b) in enumerate(pairs)]

    def max_new_tokens(self, record: dict) -> int:
        return record["meta"]["level"] + 3
