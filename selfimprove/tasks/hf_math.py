"""GSM8K and MATH (MATH-500 and friends) through the ``datasets`` library, checked by math-verify.

    prompt      <question>\\nPlease reason step by step, and put your final answer within \\boxed{}.
    completion  ... reasoning ... The final answer is \\boxed{72}.

Each split comes from a hub id (``openai/gsm8k`` / ``main``) or a local .jsonl/.json/.parquet/.csv
file or folder (``dataset.train.path=/data/gsm8k_train.jsonl``). Gold answers: GSM8K's after
``####`` in the solution; MATH's in ``answer`` when the dataset has it, else the solution's last
``\\boxed{}``. Both datasets carry gold solutions, so ``seed_data`` returns ``seed_size`` of them
(GSM8K's calculator annotations ``<<48/2=24>>`` removed, the answer restated as ``\\boxed{}``).

Answers are compared by math-verify: ``extract`` gives a canonical string (``0.5`` and
``\\frac{1}{2}`` both read ``1/2``), so compare it with ``canonical_answer(record["answer"])``, not
with the raw reference. ``similar`` draws other problems from the train split only (never one of
the test split), preferring, when ``test_group_key`` is set, train rows of the record's group.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from selfimprove.engine.registry import ConfigError
from selfimprove.scoring.mathverify import end_of_last_boxed, final_answer, last_boxed, math_rewards
from selfimprove.tasks.base import Task

LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
CALCULATOR = re.compile(r"<<[^>]*>>")
#: Self-Refine's critique prompt for tasks in natural language (ours, not quoted: the model must
#: answer with one word, feedback_ok or feedback_wrong, which the critique parser compares whole)
VERIFY_INSTRUCTION = "Is the answer above correct? Reply with one word: ok or wrong."


def load_split(source: dict):
    """A ``datasets.Dataset`` from a hub id or a local file/folder (the ``train``/``test`` node)."""
    from datasets import load_dataset

    path = Path(source["path"]).expanduser()
    if path.is_file():
        check_local_file(path, "dataset file")
        # a single local file is one split, which `datasets` names "train"
        try:
            return load_dataset(LOCAL_BUILDERS[path.suffix], data_files=str(path), split="train")
        except Exception as err:  # `datasets` tells a bad file in dozens of lines
            reason = " ".join(str(err.__cause__ or err).split())[:200]
            raise ConfigError(f"dataset file {path} cannot be read as {path.suffix}: {reason}") from err
    kwargs = {"revision": source["revision"]} if source.get("revision") else {}
    return load_dataset(str(source["path"]), source.get("subset"), split=source["split"], **kwargs)


def check_local_file(path: Path, key: str) -> None:
    """A local split is a readable, non-empty file of a known format; a JSON Lines file's rows are
    each a JSON object (`datasets` reports a bad row in 85 lines without its number)."""
    try:
        if not path.exists():
            raise ConfigError(f"{key}={path}: no such file or folder; check the path")
        if path.is_dir():
            return
        if path.suffix not in LOCAL_BUILDERS:
            raise ConfigError(
                f"{key}={path} has suffix '{path.suffix}'; allowed: {', '.join(LOCAL_BUILDERS)}"
            )
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise ConfigError(f"{key}={path} cannot be read ({err.strerror}); make it readable") from None
    if not data.strip():
        raise ConfigError(f"{key}={path} is empty; point it at a file with rows")
    if path.suffix == ".jsonl":
        check_json_lines(path, data)


def check_json_lines(path: Path, data: bytes) -> None:
    """Every non-blank line of a .jsonl file is one JSON object: the first that is not is named."""
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise ConfigError(
                f"{path}, line {number}: not valid JSON ({err}); fix or delete that line"
            ) from None
        if not isinstance(row, dict):
            raise ConfigError(f"{path}, line {number}: a row must be a JSON object, not {type(row).__name__}")


def check_template(template: str, field: str = "question") -> str:
    if "{" + field + "}" not in template:
        raise ConfigError(f"dataset.prompt_template must contain '{{{field}}}' (got {template!r})")
    return template


def hinted(prompt: str, answer: str) -> str:
    """The prompt with the reference answer as a hint after it (STaR's rationalization); the prompt
    comes first, so a chat template still wraps one user message."""
    return f"{prompt}\nHint: the final answer is {answer}."


def paragraph_turn(prompt: str, attempt: str, instruction: str) -> str:
    """A later turn laid out as SCoRe's prompts are: problem, attempt, the instruction on its own
    paragraph (plain text: the model has no chat template)."""
    return f"{prompt}{attempt}\n\n{instruction}\n"


def missing_counts(cfg: dict) -> dict[str, str]:
    """Capabilities that a zero count in the settings removes (demonstrations, train prompts)."""
    out = {}
    if cfg.get("seed_size", 1) == 0:
        out["demonstrations"] = "dataset.seed_size=0 takes none; set dataset.seed_size=N"
    if cfg.get("train_per_iteration", 1) == 0:
        out["train_prompts"] = "dataset.train_per_iteration=0 draws none; set dataset.train_per_iteration=N"
    return out


def group_value(value) -> str | None:
    """A group label (e.g. a MATH level) in a form that matches across datasets: its digits
    (MATH-500's test level is the int ``3``, MATH-lighteval's train level the string ``"Level 3"``:
    both give ``"3"``), else the lower-cased text; None for no value."""
    if value is None:
        return None
    digits = "".join(re.findall(r"\d+", str(value)))
    return digits or str(value).strip().lower()


def fill(template: str, **values: str) -> str:
    """``str.format`` for templates that also hold literal braces (``\\boxed{}``)."""
    out = template
    for key, value in values.items():
        out = out.replace("{" + key + "}", value)
    return out


class MathTask(Task):
    """Shared by GSM8K and MATH: split loading, sizes, prompts, the math-verify reward and the
    two-turn (self-correction) prompts of SCoRe's MATH experiments."""

    version = 4  # 4: no training on test questions; SCoRe's "Only output the final solution!" restored
    capabilities = frozenset({"demonstrations", "train_prompts", "extract", "hint", "corrupt", "similar"})
    #: the first three sentences of SCoRe's MATH self-correction instruction (Kumar et al. 2024,
    #: App. C), word for word. Its last sentence, the answer format ("At the end of the Solution, when
    #: you give your final answer, write it in the form "Final Answer: The final answer is $answer$.
    #: I hope it is correct.""), is left out: our prompt asks for \boxed{}, which math-verify reads
    correction_instruction = (
        "There might be an error in the solution above because of lack of understanding of the "
        "question. Please correct the error, if any, and rewrite the solution. Only output the final "
        "solution!"
    )
    verify_instruction = VERIFY_INSTRUCTION

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        check_template(self.cfg["prompt_template"])
        self._rows: dict[str, list[dict]] = {}
        self._pool: list[tuple[dict, str]] | None = None

    @classmethod
    def lacking(cls, cfg: dict) -> dict[str, str]:
        out = {
            "step_checker": "free-form solutions have no step verifier",
            "label_pairs": "not an addition task asked as a+b and b+a",
            **missing_counts(cfg),
        }
        if not cfg.get("solution_key"):
            out["demonstrations"] = "dataset.solution_key is null: no gold solutions"
        return out

    # -- per-dataset hooks -------------------------------------------------------------------------
    def gold_answer(self, row: dict) -> str | None:
        raise NotImplementedError

    def gold_completion(self, row: dict) -> str | None:
        raise NotImplementedError

    # -- data ----------------------------------------------------------------------------------
    def rows(self, which: str) -> list[dict]:
        if which not in self._rows:
            data = load_split(self.cfg[which])
            missing = [
                k
                for k in (self.cfg["question_key"], self.cfg.get("solution_key"))
                if k and k not in data.column_names
            ]
            if missing:
                raise ConfigError(
                    f"dataset.{which} ({self.cfg[which]['path']}) has no column '{missing[0]}'; "
                    f"columns: {', '.join(data.column_names)}"
                )
            self._rows[which] = [dict(r, _index=i) for i, r in enumerate(data)]
        return self._rows[which]

    def record(self, row: dict, split: str, completion: bool = False) -> dict:
        rec = {
            "id": f"{split}-{row['_index']}",
            "prompt": fill(self.cfg["prompt_template"], question=str(row[self.cfg["question_key"]])),
            "answer": self.gold_answer(row),
            "meta": {"level": split, "index": row["_index"]},
        }
        group = self.cfg.get("test_group_key")
        if split == "test" and group and group in row:
            rec["meta"]["level"] = str(row[group])
        if completion:
            rec["completion"] = self.gold_completion(row)
        return rec

    def _test_questions(self) -> set[str]:
        """Every test-split question: no seed, train or similar problem may be one of them."""
        return {str(r[self.cfg["question_key"]]) for r in self.rows("test")}

    def _shuffled_train(self) -> list[dict]:
        rows = [r for r in self.rows("train") if self.gold_answer(r) is not None]
        held_out, question = self._test_questions(), self.cfg["question_key"]
        rows = [r for r in rows if str(r[question]) not in held_out]
        random.Random(f"{self.cfg['name']}-{self.cfg['seed']}").shuffle(rows)
        return rows

    def seed_data(self) -> list[dict]:
        if not self.cfg.get("solution_key"):
            return []  # no gold rationales in this dataset
        rows = self._shuffled_train()[: self.cfg["seed_size"]]
        return [r for r in (self.record(x, "seed", completion=True) for x in rows) if r["completion"]]

    def train_prompts(self, iteration: int) -> list[dict]:
        """The ``train_per_iteration`` problems after the seed rows, a new slice each iteration
        (wrapping around when the split runs out)."""
        pool = self._shuffled_train()[self.cfg["seed_size"] :]
        n = self.cfg["train_per_iteration"]
        if not pool or n == 0:
            return []
        start = (max(iteration, 1) - 1) * n
        picked = [pool[(start + k) % len(pool)] for k in range(min(n, len(pool)))]
        return [self.record(r, f"train{iteration}") for r in picked]

    def test_sets(self) -> dict[str, list[dict]]:
        rows = [r for r in self.rows("test") if self.gold_answer(r) is not None]
        if self.cfg.get("test_size") is not None:
            rows = rows[: self.cfg["test_size"]]
        sets: dict[str, list[dict]] = {}
        for r in rows:
            rec = self.record(r, "test")
            sets.setdefault(rec["meta"]["level"], []).append(rec)
        return sets

    # -- verification ----------------------------------------------------------------------------
    def reward(
        self, prompts: list[str], completions: list[str], answer: list[str], **columns
    ) -> list[float | None]:
        return math_rewards(completions, answer)

    def clean(self, completion: str) -> str:
        """Cut after the sentence holding the last ``\\boxed{}`` (junk often follows it)."""
        end = end_of_last_boxed(completion)
        if end is None:
            return completion
        stop = completion.find("\n", end)
        return completion[: stop if stop != -1 else len(completion)].rstrip()

    def extract(self, completion: str) -> str | None:
        return final_answer(completion)

    def hint_prompt(self, record: dict) -> str:
        return hinted(record["prompt"], record["answer"])

    # -- similar problems (test-time self-improvement) ---------------------------------------------
    def similar(self, record: dict, count: int, seed: int) -> list[dict]:
        """``count`` other train-split problems (never a test-split one), the record's group first
        when ``test_group_key`` is set; the same for the same seed and record."""
        rng = random.Random(f"{self.cfg['name']}-similar-{seed}-{record['id']}")
        group = self._group(record)
        key = self.cfg.get("test_group_key")
        same, other = [], []
        for row, prompt in self._train_pool():
            if prompt != record["prompt"]:
                (same if group is not None and group_value(row.get(key)) == group else other).append(row)
        rng.shuffle(same)
        rng.shuffle(other)
        out = []
        for k, row in enumerate((same + other)[:count]):
            rec = self.record(row, "similar")
            rec["id"] = f"similar-{record['id']}-{k}"
            rec["meta"]["level"] = record["meta"]["level"]
            out.append(rec)
        return out

    def _train_pool(self) -> list[tuple[dict, str]]:
        """Train rows with an answer whose question is not in the test split, with their prompts
        (built once: ``similar`` is called for every uncertain test item)."""
        if self._pool is None:
            question, held_out = self.cfg["question_key"], self._test_questions()
            self._pool = [
                (r, self.record(r, "similar")["prompt"])
                for r in self.rows("train")
                if self.gold_answer(r) is not None and str(r[question]) not in held_out
            ]
        return self._pool

    def _group(self, record: dict) -> str | None:
        """The normalised ``test_group_key`` value of the row a record was made from (test records
        from the test split, every other record from the train split), or None."""
        key = self.cfg.get("test_group_key")
        if not key:
            return None
        split = "test" if record["id"].startswith("test-") else "train"
        return group_value(self.rows(split)[record["meta"]["index"]].get(key))

    # -- two-turn episodes -------------------------------------------------------------------------
    def turn_prompt(self, prompt: str, attempt: str, instruction: str) -> str:
        """Problem, the previous attempt (cut after its boxed answer), then the instruction on its
        own paragraph, as SCoRe's prompts lay it out (plain text: the model has no chat template)."""
        return paragraph_turn(prompt, self.clean(attempt), instruction)

    def corrupt(self, record: dict, rng) -> str:
        """The gold solution with a wrong final answer: an integer moved by 1-9, anything else
        plus one (so math-verify rejects it), for SCoRe's two-turn warm-start examples."""
        completion = record["completion"]
        end = end_of_last_boxed(completion)
        answer = last_boxed(completion)
        if end is None or answer is None:
            raise ConfigError(f"gold completion of {record['id']} has no \\boxed{{}} answer to corrupt")
        stripped = answer.strip().replace(",", "")
        if re.fullmatch(r"-?\d+", stripped):
            wrong = str(int(stripped) + rng.choice([-1, 1]) * rng.randint(1, 9))
        else:
            wrong = f"{answer}+1"
        start = end - len(answer) - 1
        return completion[:start] + wrong + completion[end - 1 :]


class GSM8K(MathTask):
    """Gold answer after ``####``; the solution's reasoning (without calculator annotations) plus
    ``The final answer is \\boxed{...}.`` is the gold completion."""

    def _solution(self, row: dict) -> str:
        return str(row[self.cfg["solution_key"]]) if self.cfg.get("solution_key") else ""

    def gold_answer(self, row: dict) -> str | None:
        if self.cfg.get("answer_key"):
            return str(row[self.cfg["answer_key"]]).strip()
        solution = self._solution(row)
        if "####" not in solution:
            return None
        return solution.rsplit("####", 1)[1].strip().replace(",", "")

    def gold_completion(self, row: dict) -> str | None:
        solution = self._solution(row)
        answer = self.gold_answer(row)
        if not solution or answer is None:
            return None
        reasoning = CALCULATOR.sub("", solution.rsplit("####", 1)[0]).strip()
        return f"{reasoning}\nThe final answer is \\boxed{{{answer}}}."


class MATH(MathTask):
    """Gold answer from ``answer_key`` (MATH-500) or the solution's last ``\\boxed{}`` (MATH);
    the solution, which ends in that box, is the gold completion."""

    def gold_answer(self, row: dict) -> str | None:
        if self.cfg.get("answer_key") and row.get(self.cfg["answer_key"]) not in (None, ""):
            return str(row[self.cfg["answer_key"]]).strip()
        if self.cfg.get("solution_key"):
            return last_boxed(str(row[self.cfg["solution_key"]]))
        return None

    def gold_completion(self, row: dict) -> str | None:
        solution = str(row[self.cfg["solution_key"]]) if self.cfg.get("solution_key") else ""
        return solution.strip() if last_boxed(solution) is not None else None
