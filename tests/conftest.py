"""Shared fixtures: the real config tree composed with Hydra, shrunk for speed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from selfimprove.app import CONF_DIR
from selfimprove.config import register_configs

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "PYTEST_XDIST_WORKER" in os.environ:
    # `pytest -n auto` runs one worker per core: one torch thread each (and in the runs they start),
    # so workers do not fight over cores. The tiny models gain little from a second thread.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # vLLM's CPU engines (tests/test_vllm.py runs on two workers): each worker's on its own core
    worker = int(os.environ["PYTEST_XDIST_WORKER"].removeprefix("gw") or 0)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", str(worker % (os.cpu_count() or 1)))
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")

# A STaR run small enough for a test (~20 s): few steps, few prompts, two iterations
# (conf/debug/: the sizes per model, method and dataset; what users run as a smoke test).
TINY_RUN = ["debug=tiny"]


#: where tests/test_matrix.py leaves one JSON file per method x dataset pair for the summary below
MATRIX_DIR = Path(__file__).resolve().parent.parent / ".pytest_cache" / "matrix"


#: where tests/test_bad_inputs.py leaves one JSON file per case for the bad-input table
BAD_INPUTS_DIR = MATRIX_DIR.parent / "bad_inputs"


def pytest_sessionstart(session: pytest.Session) -> None:
    if not hasattr(session.config, "workerinput"):  # the controller (or a run without xdist)
        shutil.rmtree(MATRIX_DIR, ignore_errors=True)
        shutil.rmtree(BAD_INPUTS_DIR, ignore_errors=True)


def print_bad_inputs(terminalreporter) -> None:
    """The bad-input table: case -> exit code -> the one line the user reads."""
    rows = (
        [json.loads(p.read_text()) for p in sorted(BAD_INPUTS_DIR.glob("*.json"))]
        if BAD_INPUTS_DIR.exists()
        else []
    )
    if not rows:
        return
    terminalreporter.section(f"bad inputs: {len(rows)} cases, case -> exit code -> message")
    terminalreporter.write_line("| case | exit | message |")
    terminalreporter.write_line("|---|---|---|")
    for r in rows:
        message = r["message"].replace("|", r"\|")  # a Markdown table cell
        terminalreporter.write_line(f"| {r['case']} | {r['code']} | {message} |")


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """Print the composition matrix: method x dataset -> accuracy before -> after, or the refusal."""
    print_bad_inputs(terminalreporter)
    cells = (
        [json.loads(p.read_text()) for p in sorted(MATRIX_DIR.glob("*.json"))] if MATRIX_DIR.exists() else []
    )
    if not cells:
        return
    datasets = list(dict.fromkeys(c["dataset"] for c in cells))
    methods = sorted({c["method"] for c in cells})
    by_pair = {(c["method"], c["dataset"]): c for c in cells}
    terminalreporter.section("composition matrix: mean held-out accuracy before -> after, or refused")
    terminalreporter.write_line("| method | " + " | ".join(datasets) + " |")
    terminalreporter.write_line("|---" * (len(datasets) + 1) + "|")
    for m in methods:
        row = []
        for d in datasets:
            c = by_pair.get((m, d))
            row.append("" if c is None else "refused" if "refused" in c else f"{c['before']} -> {c['after']}")
        terminalreporter.write_line(f"| {m} | " + " | ".join(row) + " |")
    for c in cells:
        if "refused" in c:
            terminalreporter.write_line(f"refused {c['method']} x {c['dataset']}: {c['refused']}")


#: modules whose tests are independent of one another (no module-scoped fixture they must share
#: with a worker): xdist spreads their tests over the workers one by one
SPREAD = {"tests.test_matrix"}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules marked ``longest`` first: ``pytest -n auto --dist loadgroup`` hands groups to workers in
    collection order, and the STaR module (~5 min) collected last kept one core idle for minutes.
    Every module is one group (its tests share module-scoped fixtures on one worker), except the
    SPREAD ones, whose tests go to whichever worker is free, and a test that names its own group.
    Needs pytest < 9.2 (.ci/constraints.txt): xdist marks a group by rewriting ``item._nodeid``,
    which pytest 9.2's ``nodeid`` (``str(item._id)``) no longer reads, so there every test goes to
    whichever worker is free and a module's fixtures are set up once per worker (measured with
    pytest-xdist 3.8: a 6-test group went to one worker with 9.1.1, to both with 9.2.0)."""
    items.sort(key=lambda item: item.get_closest_marker("longest") is None)
    for item in items:
        if item.module.__name__ not in SPREAD and item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


def compose_cfg(overrides: list[str]) -> DictConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name="config", overrides=overrides)


def selfimprove(*args: str, cwd: Path, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run the real console entry point in a subprocess."""
    proc = subprocess.run(
        [sys.executable, "-m", "selfimprove.cli", *args], cwd=cwd, capture_output=True, text=True, **kwargs
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"selfimprove {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def complete_checkpoint(cwd: Path, stage_glob: str) -> Callable[[], list[Path]]:
    """A ``kill_when`` test for a training stage: a checkpoint whose trainer_state.json (written last,
    not atomically) is whole. Matching the file name alone races its write: a kill at that instant
    leaves a checkpoint the stage rightly ignores, and the rerun starts over."""
    from selfimprove.training.sft import complete

    return lambda: [p for p in cwd.glob(f"{stage_glob}/trainer/checkpoint-*") if complete(p)]


def kill_when(
    args: list[str],
    cwd: Path,
    ready: str | Callable[[], object],
    timeout: float = 300,
    env: dict | None = None,
):
    """Start ``selfimprove *args`` in a subprocess and SIGKILL it as soon as ``ready`` holds: a glob
    under ``cwd`` that matches, or a callable that returns something truthy (which is returned).
    Fails when the run finishes first or never gets there."""
    if isinstance(ready, str):
        pattern, ready = ready, lambda: list(cwd.glob(pattern))
    proc = subprocess.Popen(
        [sys.executable, "-m", "selfimprove.cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            found = ready()
            if found:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return found
            if proc.poll() is not None:
                raise AssertionError(
                    f"the run finished (exit {proc.returncode}) before the kill point was reached"
                )
            time.sleep(0.01)
        raise AssertionError(f"the kill point was not reached in {timeout:.0f} s")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def tiny_cfg(tmp_path):
    return compose_cfg([*TINY_RUN, f"run_dir={tmp_path / 'run'}"])
