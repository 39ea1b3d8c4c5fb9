"""n-digit addition with a per-digit scratchpad: the embedded CPU task.

    prompt      573+885:
    completion  3+5+0=08|8;57+88:7+8+0=15|58;5+8:5+8+1=14|458;ans 1458

Each step adds one digit column (least significant first) plus the carry, writes the two-digit
sum and, after ``|``, the partial result so far; from the second step on it first restates what
is left of the operands. The final answer follows ``ans``. Every step is local -- the digits to add
are always the last ones just written and the answer is a copy of the last partial, not a
reversal -- which is what lets a tiny model trained on 1-2 digits (and 32 exemplars at 3 digits)
get a quarter of the 3-digit problems right before any self-improvement (0.05 without the
restating and the partial results). The difficulty level is the number of digits per operand.
Gold rationales exist for the seed levels (and a few exemplars at the train levels, STaR's
few-shot rationales); train prompts at the harder levels carry only the final answer.

The test set of each level is drawn first and held out at every level: no seed, train or similar
problem is a test problem or its b+a twin. A level's test set takes at most ``TEST_SHARE`` of its
distinct problems (a+b and b+a counted once), so training keeps the rest: 1-digit addition has 55
such problems, so acc/1 is scored on 27 and the warm start sees the other 28 (both orders).
"""

from __future__ import annotations

import random
import re

from selfimprove.engine.registry import ConfigError
from selfimprove.tasks.base import Task

ANSWER = re.compile(r"ans (\d+)")
STEP = re.compile(r"^(\d+\+\d+:)?(\d)\+(\d)\+(\d)=(\d\d)\|(\d+)$")
#: ways ``wrong_step`` can make one column step wrong (SPC's sneaky rewrites, synthesised)
WRONG_STEP_KINDS = ("sum", "carry", "copy", "digit")
#: the largest share of a level's distinct problems its test set may hold out
TEST_SHARE = 0.5


def operands(digits: int) -> int:
    """How many operands have ``digits`` digits (0-9 at one digit, no leading zeros above)."""
    return 10 if digits == 1 else 9 * 10 ** (digits - 1)


def test_count(digits: int, wanted: int) -> int:
    """``wanted`` capped at ``TEST_SHARE`` of the level's distinct problems (a+b = b+a)."""
    n = operands(digits)
    return min(wanted, int(TEST_SHARE * n * (n + 1) // 2))


def distinct_problems(draw, count: int) -> list[tuple[int, int]]:
    """``count`` pairs from ``draw()``, no two the same problem (a+b and b+a are one problem)."""
    seen, out = set(), []
    while len(out) < count:
        a, b = draw()
        if (min(a, b), max(a, b)) not in seen:
            seen.add((min(a, b), max(a, b)))
            out.append((a, b))
    return out


def with_twins(pairs) -> set[tuple[int, int]]:
    """The pairs and their commutative twins: what training must never see."""
    return {p for a, b in pairs for p in ((a, b), (b, a))}


def rationale(a: int, b: int, slip: tuple[int, int] | None = None) -> str:
    """The gold scratchpad for a + b; with ``slip=(step, delta)`` the sum written at that step is
    off by ``delta`` and the rest follows from it (a wrong attempt with one arithmetic slip)."""
    width = max(len(str(a)), len(str(b)))
    da, db = str(a).zfill(width)[::-1], str(b).zfill(width)[::-1]
    steps, carry, partial = [], 0, ""
    ra, rb = str(a).zfill(width), str(b).zfill(width)
    for k, (x, y) in enumerate(zip(da, db)):
        total = int(x) + int(y) + carry + (slip[1] if slip and slip[0] == k else 0)
        partial = str(total % 10) + partial
        restated = f"{ra}+{rb}:" if k else ""  # the prompt itself states the operands for step 1
        steps.append(f"{restated}{x}+{y}+{carry}={total:02d}|{partial}")
        ra, rb = ra[:-1], rb[:-1]
        carry = total // 10
    return ";".join(steps) + f";ans {int(f'{carry}{partial}')}"


def extract_answer(completion: str) -> str | None:
    """The final answer in a completion, or None when it has none (malformed)."""
    match = ANSWER.search(completion)
    return match.group(1) if match else None


def steps(solution: str) -> list[str]:
    """The steps of a scratchpad: one per digit column, then ``ans N`` (text after it is dropped)."""
    match = ANSWER.search(solution)
    solution = solution[: match.end()] if match else solution
    return solution.split(";") if solution else []


def first_error(a: int, b: int, solution: str) -> int | None:
    """Index of the first wrong step of a scratchpad for a + b, or None when every step is right.
    Each step is determined by the problem and the steps before it (the digits left, the carry,
    the partial result), so the first wrong step is the first that differs from the recomputed one;
    a solution that stops early is wrong at the step it is missing."""
    written, gold = steps(solution), steps(rationale(a, b))
    for k, (step, right) in enumerate(zip(written, gold)):
        if step != right:
            return k
    return None if len(written) == len(gold) else min(len(written), len(gold))


def wrong_step(a: int, b: int, k: int, kind: str, rng: random.Random) -> str:
    """Column step ``k`` of a + b rewritten into a wrong one of the given kind (the prefix kept):
    ``sum`` the sum off by one; ``carry`` the other carry, summed consistently; ``copy`` the new
    digit of the partial result not the sum's; ``digit`` an operand digit misread by one."""
    restated, x, y, c, s, partial = STEP.match(steps(rationale(a, b))[k]).groups()
    x, y, c, s = int(x), int(y), int(c), int(s)
    if kind == "sum":
        s += rng.choice([d for d in (-1, 1) if 0 <= s + d <= 19])
    elif kind == "carry":
        c = 1 - c
        s = x + y + c
    elif kind == "digit":
        y += rng.choice([d for d in (-1, 1) if 0 <= y + d <= 9])
        s = x + y + c
    elif kind != "copy":
        raise ConfigError(
            f"wrong step kind '{kind}' is not allowed; use one of {', '.join(WRONG_STEP_KINDS)}"
        )
    digit = (s % 10 + rng.choice((-1, 1))) % 10 if kind == "copy" else s % 10
    return f"{restated or ''}{x}+{y}+{c}={s:02d}|{digit}{partial[1:]}"


class Arithmetic(Task):
    version = 4  # 4: test problems and their b+a twins held out at every level
    wrong_step_kinds = WRONG_STEP_KINDS
    capabilities = frozenset(
        {"demonstrations", "train_prompts", "extract", "hint", "corrupt", "similar", "step_checker"}
    )

    @classmethod
    def lacking(cls, cfg: dict) -> dict[str, str]:
        out = {"label_pairs": "each problem is asked once, not as a+b and b+a pairs"}
        gold = cfg.get("seed_per_level", 1) * len(cfg.get("seed_levels", [1]))
        gold += cfg.get("few_shot_per_level", 0) * len(cfg.get("train_levels", []))
        if gold == 0:
            out["demonstrations"] = (
                "dataset.seed_per_level and dataset.few_shot_per_level are 0 (or their levels empty); "
                "set one to N"
            )
        if cfg.get("train_per_iteration", 1) == 0 or cfg.get("train_levels") == []:
            out["train_prompts"] = (
                "dataset.train_per_iteration=0 (or no train_levels) draws none; set it to N"
            )
        return out

    # -- data ----------------------------------------------------------------------------------
    def _operand(self, rng: random.Random, digits: int) -> int:
        low = 0 if digits == 1 else 10 ** (digits - 1)
        return rng.randint(low, 10**digits - 1)

    def _record(self, a: int, b: int, digits: int, split: str, index: int, gold: bool = False) -> dict:
        rec = {
            "id": f"{split}-{digits}-{index}",
            "prompt": f"{a}+{b}:",
            "answer": str(a + b),
            "meta": {"level": digits, "a": a, "b": b},
        }
        if gold:
            rec["completion"] = rationale(a, b)
        return rec

    def _test_pairs(self) -> dict[int, list[tuple[int, int]]]:
        """Each test level's problems, drawn before any training data (distinct, no twins)."""
        if not hasattr(self, "_test_cache"):
            cache = {}
            for digits in self.cfg["test_levels"]:
                rng = random.Random(f"arithmetic-test-{self.cfg['test_seed']}-{digits}")
                cache[digits] = distinct_problems(
                    lambda rng=rng, d=digits: (self._operand(rng, d), self._operand(rng, d)),
                    test_count(digits, self.cfg["test_per_level"]),
                )
            self._test_cache = cache
        return self._test_cache

    def _sample(self, rng: random.Random, digits: int, count: int) -> list[tuple[int, int]]:
        """``count`` distinct problems at one level, none a test problem or its b+a twin."""
        held_out = with_twins(self._test_pairs().get(digits, []))
        count = min(count, operands(digits) ** 2 - len(held_out))  # there are 100 1-digit ones
        pairs: dict[tuple[int, int], None] = {}
        while len(pairs) < count:
            pair = (self._operand(rng, digits), self._operand(rng, digits))
            if pair not in held_out:
                pairs[pair] = None
        return list(pairs)

    def seed_data(self) -> list[dict]:
        rng = random.Random(f"arithmetic-seed-{self.cfg['seed']}")
        out = []
        plan = [(d, self.cfg["seed_per_level"]) for d in self.cfg["seed_levels"]]
        plan += [(d, self.cfg["few_shot_per_level"]) for d in self.cfg["train_levels"]]
        for digits, count in plan:
            for a, b in self._sample(rng, digits, count):
                out.append(self._record(a, b, digits, "seed", len(out), gold=True))
        return out

    def train_prompts(self, iteration: int) -> list[dict]:
        rng = random.Random(f"arithmetic-train-{self.cfg['seed']}-{iteration}")
        out = []
        for digits in self.cfg["train_levels"]:
            for a, b in self._sample(rng, digits, self.cfg["train_per_iteration"]):
                out.append(self._record(a, b, digits, f"train{iteration}", len(out)))
        return out

    def test_sets(self) -> dict[str, list[dict]]:
        return {
            str(digits): [self._record(a, b, digits, "test", i) for i, (a, b) in enumerate(pairs)]
            for digits, pairs in self._test_pairs().items()
        }

    # -- verification ----------------------------------------------------------------------------
    def reward(
        self, prompts: list[str], completions: list[str], answer: list[str], **columns
    ) -> list[float | None]:
        return [1.0 if extract_answer(c) == str(a) else 0.0 for c, a in zip(completions, answer)]

    def extract(self, completion: str) -> str | None:
        return extract_answer(completion)

    def similar(self, record: dict, count: int, seed: int) -> list[dict]:
        digits = record["meta"]["level"]
        rng = random.Random(f"arithmetic-similar-{seed}-{record['id']}")
        return [
            self._record(a, b, digits, f"similar-{record['id']}", i)
            for i, (a, b) in enumerate(self._sample(rng, digits, count))
        ]

    def clean(self, completion: str) -> str:
        match = ANSWER.search(completion)
        return completion[: match.end()] if match else completion

    def corrupt(self, record: dict, rng: random.Random) -> str:
        """Half the time (operands of 2+ digits) a scratchpad that skips one digit column -- the
        mistake the tiny model makes at a length it has barely seen --, else one arithmetic slip."""
        a, b = record["meta"]["a"], record["meta"]["b"]
        width = max(len(str(a)), len(str(b)))
        step = rng.randrange(width)
        if width > 1 and rng.random() < 0.5:
            cut = width - 1 - step  # the column's index from the left
            a2, b2 = (int(str(n).zfill(width)[:cut] + str(n).zfill(width)[cut + 1 :]) for n in (a, b))
            return rationale(a2, b2)
        column = int(str(a).zfill(width)[::-1][step]) + int(str(b).zfill(width)[::-1][step])
        delta = rng.choice([d for d in (-1, 1) if 0 <= column + d <= 18])  # a sum one column can write
        return rationale(a, b, slip=(step, delta))

    # -- steps (SPC's critic): the scratchpad's steps and where the first wrong one is -------------
    def steps(self, solution: str) -> list[str]:
        return steps(solution)

    def first_error(self, record: dict, solution: str) -> int | None:
        return first_error(record["meta"]["a"], record["meta"]["b"], solution)

    def column_steps(self, record: dict) -> int:
        """How many steps of the gold scratchpad are digit columns (the rest is ``ans N``)."""
        return max(len(str(record["meta"]["a"])), len(str(record["meta"]["b"])))

    def wrong_step(self, record: dict, k: int, kind: str, rng: random.Random) -> str:
        return wrong_step(record["meta"]["a"], record["meta"]["b"], k, kind, rng)

    def hint_prompt(self, record: dict) -> str:
        return f"{record['prompt'][:-1]}|{record['answer']}:"

    def max_new_tokens(self, record: dict) -> int:
        digits = max(len(str(record["meta"]["a"])), len(str(record["meta"]["b"])))
        return digits * (2 * digits + 12) + 12
