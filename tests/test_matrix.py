"""The composition matrix: every method on every dataset, one iteration with a few steps per stage,
through the real `run` path (preflight, stages, metrics). Each pair either finishes and writes
metrics, or is refused before anything is written with one line; none may fail mid-run.

Models: the character-level tiny Llama where it fits (the synthetic arithmetic tasks), the local
Qwen2 with a BPE tokenizer and a chat template (model=tiny_qwen) on the text datasets. GSM8K and
MATH read small local jsonl files in the hub's column layout. The outcome of every pair goes to
``.pytest_cache/matrix/`` and conftest prints the table at the end of the session.
"""

from __future__ import annotations

import json

import pytest

from selfimprove.app import run
from selfimprove.engine.registry import ConfigError
from selfimprove.methods import METHODS
from tests.conftest import MATRIX_DIR, compose_cfg

pytestmark = pytest.mark.slow

CHAR = ["model=tiny", "model.intermediate_size=128"]
TEXT = [
    "model=tiny_qwen",
    "dataset.completion_tokens=16",
    "dataset.prompt_tokens=320",
    "dataset.turn_tokens=48",
]
GYM = ["dataset.seed_size=8", "dataset.train_per_iteration=8", "dataset.test_size=4"]
DATASETS = {
    "arithmetic": [
        *CHAR,
        "dataset=arithmetic",
        "dataset.seed_per_level=24",
        "dataset.few_shot_per_level=4",
        "dataset.train_per_iteration=8",
        "dataset.test_levels=[2,3]",
        "dataset.test_per_level=4",
    ],
    "reversed_addition": [
        *CHAR,
        "dataset=reversed_addition",
        "dataset.seed_levels=[1,2]",
        "dataset.seed_per_level=24",
        "dataset.train_per_iteration=4",
        "dataset.test_levels=[2,3]",
        "dataset.test_per_level=4",
    ],
    "countdown": [*TEXT, "dataset=countdown", *GYM],
    "chain_sum": [*TEXT, "dataset=reasoning_gym", "dataset.task=chain_sum", *GYM],
    "humaneval": [
        *TEXT,
        "dataset=humaneval",
        "dataset.train_size=4",
        "dataset.test_size=4",
        "dataset.workers=2",
    ],
    "gsm8k": [
        *TEXT,
        "dataset=gsm8k",
        "dataset.seed_size=8",
        "dataset.train_per_iteration=8",
        "dataset.test_size=4",
    ],
    "math": [
        *TEXT,
        "dataset=math",
        "dataset.seed_size=8",
        "dataset.train_per_iteration=8",
        "dataset.test_size=4",
    ],
}
SFT = [
    "method.warmstart.steps=4",
    "method.warmstart.batch_size=8",
    "method.train.steps=2",
    "method.train.batch_size=8",
]
METHOD_RUNS = {
    "star": [*SFT, "method.iterations=1", "method.sampling.n=2"],
    "rest_em": [*SFT, "method.iterations=1", "method.sampling.n=2"],
    "bstar": [
        *SFT,
        "method.iterations=1",
        "method.search.queries=4",
        "method.search.temperatures=[1.0]",
        "method.search.n=[2]",
        "method.search.thresholds=[-1.0,0.5]",
    ],
    "tt_si": [
        "method.warmstart.steps=4",
        "method.warmstart.batch_size=8",
        "method.uncertainty.samples=2",
        "method.synthesis.problems=2",
        "method.synthesis.solutions=2",
        "method.adapt.steps=2",
    ],
    "length_gen": [*SFT, "method.rounds=1", "method.replay_min=8"],
    "self_refine": ["method.warmstart.steps=4", "method.warmstart.batch_size=8", "method.max_rounds=2"],
    "grpo": [
        "method.warmstart.steps=4",
        "method.warmstart.batch_size=8",
        "method.iterations=1",
        "method.train.steps=2",
        "method.train.batch_size=4",
        "method.rl.num_generations=2",
    ],
    # SCoRe's RL trains two attempts as one plain-text completion: on the text datasets the chat
    # model is prompted as a base model (the fix its plan-time refusal names; test_preflight checks it)
    "score": [
        "method.warmstart.steps=4",
        "method.warmstart.batch_size=8",
        "method.stage2_iterations=0",
        "method.train.steps=2",
        "method.train.batch_size=4",
        "method.rl.num_generations=2",
    ],
    "spin": [*SFT, "method.iterations=1", "method.prompts_per_iteration=8", "method.train.batch_size=4"],
    "self_rewarding": [*SFT, "method.iterations=1", "method.sampling.n=2", "method.train.batch_size=4"],
    "spc": [
        *SFT,
        "method.rounds=1",
        "method.games=8",
        "method.bench_sampling.n=2",
        "method.solutions.n=2",
        "method.critic.n=2",
    ],
}
#: pairs refused before they start, and a word their one line must hold (what the dataset lacks)
REFUSED = {
    **{("spc", d): "first wrong step" for d in DATASETS if d != "arithmetic"},
    **{("length_gen", d): "a+b and b+a" for d in DATASETS if d != "reversed_addition"},
    ("tt_si", "humaneval"): "new problems like a given one",
    ("spin", "humaneval"): "gold demonstrations",
}


def gsm8k_rows(count: int, offset: int) -> list[dict]:
    rows = []
    for i in range(count):
        a, b = 3 + i + offset, 11 + 2 * i
        rows.append(
            {
                "question": f"Ann has {a} pens and gets {b} more. How many pens does she have now?",
                "answer": f"She has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} pens.\n#### {a + b}",
            }
        )
    return rows


def math_rows(count: int, offset: int, test: bool) -> list[dict]:
    rows = []
    for i in range(count):
        a = i + offset
        row = {
            "problem": f"Compute ${a} \\cdot 3$.",
            "solution": f"We get ${a} \\cdot 3 = \\boxed{{{3 * a}}}$.",
        }
        rows.append(
            {**row, "answer": str(3 * a), "level": 1 + i % 5}
            if test
            else {**row, "level": f"Level {1 + i % 5}"}
        )
    return rows


@pytest.fixture(scope="module")
def local_files(tmp_path_factory) -> dict[str, list[str]]:
    root = tmp_path_factory.mktemp("hub_layout")
    files = {
        "gsm8k": (gsm8k_rows(24, 0), gsm8k_rows(6, 100)),
        "math": (math_rows(24, 0, test=False), math_rows(6, 100, test=True)),
    }
    out = {}
    for name, (train, test) in files.items():
        for split, rows in (("train", train), ("test", test)):
            (root / f"{name}_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        out[name] = [
            f"dataset.train.path={root / f'{name}_train.jsonl'}",
            f"dataset.test.path={root / f'{name}_test.jsonl'}",
        ]
    return out


def accuracy(row: dict) -> float | None:
    """The mean held-out accuracy of a metrics row (acc/<level>), or None when it has none."""
    values = [v for k, v in row.items() if k.startswith("acc/") and isinstance(v, (int, float))]
    return round(sum(values) / len(values), 3) if values else None


@pytest.mark.parametrize("dataset", list(DATASETS))
@pytest.mark.parametrize("method", METHODS.names())
def test_pair_runs_or_is_refused_before_it_starts(method, dataset, local_files, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    chat_off = (
        ["model.chat_template=false"]
        if method == "score" and dataset not in ("arithmetic", "reversed_addition")
        else []
    )
    overrides = [
        f"method={method}",
        *DATASETS[dataset],
        *local_files.get(dataset, []),
        *METHOD_RUNS[method],
        *chat_off,
        f"run_dir={tmp_path / 'run'}",
        "hardware.checkpoint_steps=null",
    ]
    cfg = compose_cfg(overrides)
    expected = REFUSED.get((method, dataset))
    try:
        rows = run(cfg)
    except ConfigError as err:
        line = str(err)
        record(method, dataset, {"refused": line})
        assert expected is not None, f"{method} x {dataset} was refused: {line}"
        assert expected in line and "\n" not in line
        assert not (tmp_path / "run").exists(), "a refused run writes nothing"
        return
    assert expected is None, f"{method} x {dataset} ran, but should be refused ({expected})"
    assert rows, "a finished run writes metrics"
    before, after = accuracy(rows[0]), accuracy(rows[-1])
    record(method, dataset, {"before": before, "after": after, "iterations": len(rows) - 1})
    assert (tmp_path / "run" / "metrics.jsonl").exists()


def record(method: str, dataset: str, outcome: dict) -> None:
    """One cell of the printed matrix (conftest.pytest_terminal_summary reads these)."""
    MATRIX_DIR.mkdir(parents=True, exist_ok=True)
    (MATRIX_DIR / f"{method}__{dataset}.json").write_text(
        json.dumps({"method": method, "dataset": dataset, **outcome})
    )
