"""Broken run directories and refused commands, on copies of one real finished tiny run.

Damage (a marker, metrics.jsonl, an output file): `status` shows it, the same `run` command
recomputes only what it must, says so in one line, and ends with the metrics of the undamaged run;
`report` copes with a damaged metrics.jsonl. Refusals (on_change=refuse, the lock held by another
process, a preflight refusal): exit 2, one line, and not one byte or mtime of the run directory (or
of anything beside it) changes. The module prints the table case -> exit code -> what happened.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from selfimprove.engine.pipeline import DONE, read_jsonl
from tests.conftest import TINY_RUN, selfimprove

pytestmark = pytest.mark.slow

COMMAND = ["run", *TINY_RUN, "out_root=outputs"]
ENV = {**os.environ, "COLUMNS": "400"}  # rich wraps at 80 columns off a terminal: one line per message
RESULTS: list[tuple[str, int, str]] = []


def run_dir(cwd: Path) -> Path:
    (found,) = [p for p in (cwd / "outputs").iterdir() if p.is_dir() and not p.name.startswith(".")]
    return found


def metrics_without_times(root: Path) -> list[dict]:
    return [
        {k: v for k, v in row.items() if "seconds" not in k} for row in read_jsonl(root / "metrics.jsonl")
    ]


def snapshot(tree: Path) -> dict[str, tuple]:
    """Every path below ``tree``: its size, mtime (ns) and, for files, a hash of its bytes."""
    out = {}
    for p in sorted(tree.rglob("*")):
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
        out[str(p.relative_to(tree))] = (st.st_size, st.st_mtime_ns, digest)
    return out


#: files that hold wall times or the folder they were written in, not results
TIMES_AND_PATHS = {DONE, "log_history.json", "training_args.bin"}


def files_of(folder: Path) -> dict[str, str]:
    """A stage's output files by a hash of their bytes (weights, samples, metrics...)."""
    return {k: v[2] for k, v in snapshot(folder).items() if v[2] and Path(k).name not in TIMES_AND_PATHS}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One finished run (the store beside it): every case works on a copy (cp -a keeps the hardlinks
    between the run's files and the store's, as a real out_root has them)."""
    cwd = tmp_path_factory.mktemp("reference")
    selfimprove(*COMMAND, cwd=cwd, env=ENV)
    return cwd


@pytest.fixture(scope="module", autouse=True)
def print_table(request):
    yield
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    if reporter is None or not RESULTS:
        return
    with request.config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        reporter.section("damaged runs and refused commands: case -> exit code -> what happened")
        reporter.write_line("| case | exit | what happened |")
        reporter.write_line("|---|---:|---|")
        for case, code, what in RESULTS:
            reporter.write_line(f"| {case} | {code} | {what} |")


def copy_of(reference: Path, tmp_path: Path) -> Path:
    subprocess.run(["cp", "-a", str(reference), str(tmp_path / "copy")], check=True)
    return tmp_path / "copy"


def cut(path: Path, keep: float = 0.5) -> None:
    """Truncate a file in place (same inode: its hardlinked copy in the store is cut too)."""
    with open(path, "r+b") as f:
        f.truncate(int(path.stat().st_size * keep))


def overwrite(path: Path, text: str) -> None:
    with open(path, "w") as f:  # in place, as a disk or an editor would leave it
        f.write(text)


def drop_outputs_from_markers(root: Path) -> None:
    """Markers as a version before ``outputs`` wrote them (the store's included)."""
    for marker in [*root.rglob(DONE), *(root.parent / ".store").rglob(DONE)]:
        record = json.loads(marker.read_text())
        record.pop("outputs", None)
        overwrite(marker, json.dumps(record))


@dataclass
class Damage:
    case: str
    damage: Callable[[Path], None]  # applied to the run directory
    status: str  # expected in `selfimprove status` ("" = every stage done)
    said: str  # the line the rerun says ("" = nothing to say)
    redone: dict[str, str]  # the stages the rerun computes or links again from the store


DAMAGES = [
    Damage(
        "_DONE.json garbage",
        lambda r: overwrite(r / "iter_01/generate" / DONE, "{not json"),
        "iter_01/generate: its generate/_DONE.json does not parse",
        "! iter_01/generate: its generate/_DONE.json does not parse; recomputing",
        {"iter_01/generate": "computed"},
    ),
    Damage(
        "_DONE.json empty",
        lambda r: overwrite(r / "iter_02/score" / DONE, ""),
        "iter_02/score: its score/_DONE.json is empty",
        "! iter_02/score: its score/_DONE.json is empty; recomputing",
        {"iter_02/score": "computed"},
    ),
    Damage(
        "_DONE.json not an object",
        lambda r: overwrite(r / "warmstart/eval" / DONE, "[1, 2]"),
        "warmstart/eval: its eval/_DONE.json is not an object",
        "! warmstart/eval: its eval/_DONE.json is not an object; recomputing",
        {"warmstart/eval": "computed"},
    ),
    Damage(
        "_DONE.json without fingerprint",
        lambda r: overwrite(r / "iter_01/build" / DONE, '{"stage": "iter_01/build"}'),
        "iter_01/build: its build/_DONE.json lacks fingerprint, counts, finished",
        "! iter_01/build: its build/_DONE.json lacks fingerprint, counts, finished; recomputing",
        {"iter_01/build": "computed"},
    ),
    Damage(
        "metrics.jsonl truncated mid-line",
        lambda r: cut(r / "metrics.jsonl", 0.6),
        "metrics.jsonl line 3 is damaged",
        "metrics.jsonl line 3 is damaged",
        {},
    ),
    Damage(
        "metrics.jsonl empty",
        lambda r: overwrite(r / "metrics.jsonl", ""),
        "metrics.jsonl is empty",
        "metrics.jsonl is empty",
        {},
    ),
    Damage(
        "metrics.jsonl missing", lambda r: (r / "metrics.jsonl").unlink(), "metrics.jsonl is missing", "", {}
    ),
    Damage(
        "samples.jsonl cut in place",
        lambda r: cut(r / "iter_01/generate/samples.jsonl"),
        "iter_01/generate: its output samples.jsonl is",
        "when it was done; recomputing",
        {"iter_01/generate": "computed"},
    ),
    Damage(
        "model weights cut in place",
        lambda r: cut(r / "iter_02/train/model/model.safetensors", 0.9),
        "iter_02/train: its output model/model.safetensors is",
        "! iter_02/train: its output model/model.safetensors is",
        {"iter_02/train": "computed"},
    ),
    Damage(
        "eval metrics.json deleted",
        lambda r: (r / "iter_02/eval/metrics.json").unlink(),
        "iter_02/eval: its output metrics.json is missing",
        # the store's hardlink of the file survives the deletion: linked again, not recomputed
        "! iter_02/eval: its output metrics.json is missing; linking it again from the store",
        {"iter_02/eval": "shared"},
    ),
    Damage("old markers (no outputs), files whole", drop_outputs_from_markers, "", "", {}),
    Damage(
        "old markers, samples.jsonl cut",
        lambda r: (drop_outputs_from_markers(r), cut(r / "iter_02/generate/samples.jsonl")),
        "iter_02/generate: its output samples.jsonl is damaged",
        "! iter_02/generate: its output samples.jsonl is damaged; recomputing",
        {"iter_02/generate": "computed"},
    ),
]


def redone_since(root: Path, seen: int) -> dict[str, str]:
    return {
        e["stage"]: e["action"] for e in read_jsonl(root / "events.jsonl")[seen:] if e["action"] != "reused"
    }


@pytest.mark.parametrize("d", DAMAGES, ids=[d.case for d in DAMAGES])
def test_damage_is_shown_recomputed_and_ends_with_the_undamaged_metrics(d: Damage, reference, tmp_path):
    cwd = copy_of(reference, tmp_path)
    root = run_dir(cwd)
    d.damage(root)

    status = " ".join(selfimprove("status", str(root), cwd=cwd, env=ENV).stdout.split())
    if d.status.startswith("metrics.jsonl"):  # a derived file: said, no stage damaged
        assert f"damaged {d.status}" in status and "rebuilds it" in status, status
        assert " 1 damaged" not in status, status
    elif d.status:
        assert f"damaged {d.status}" in status and "1 damaged" in status, status
    else:
        assert "damaged" not in status and "pending" not in status, status

    seen = len(read_jsonl(root / "events.jsonl"))
    proc = selfimprove(*COMMAND, cwd=cwd, env=ENV)
    said = [line for line in proc.stdout.splitlines() if line.startswith("! ")]
    if d.said:
        assert len(said) == 1 and d.said in said[0], proc.stdout
    else:
        assert not said, said
    redone = redone_since(root, seen)
    stages = len(list(run_dir(reference).rglob(DONE)))
    assert redone == d.redone
    for name in redone:  # recomputed (seeded): the same bytes as the undamaged run's
        assert files_of(root / name) == files_of(run_dir(reference) / name), name
    assert metrics_without_times(root) == metrics_without_times(run_dir(reference))
    computed = sum(a == "computed" for a in redone.values())
    assert (
        f"{computed} stages computed, {stages - len(redone)} reused, {len(redone) - computed} shared"
        in proc.stdout
    )
    RESULTS.append(
        (
            d.case,
            proc.returncode,
            f"{said[0] if said else 'nothing said'}; redone: "
            f"{', '.join(f'{k} {v}' for k, v in redone.items()) or 'nothing'}; metrics identical to the undamaged run",
        )
    )


@pytest.mark.parametrize(
    "case, damage, said",
    [
        ("report: metrics.jsonl truncated", lambda r: cut(r / "metrics.jsonl", 0.6), "is damaged"),
        ("report: metrics.jsonl empty", lambda r: overwrite(r / "metrics.jsonl", ""), "is empty"),
    ],
)
def test_report_rebuilds_a_damaged_metrics_file_from_the_stages(case, damage, said, reference, tmp_path):
    ref_report = selfimprove(
        "report",
        str(run_dir(reference)),
        "--format",
        "csv",
        "--out",
        str(tmp_path / "a"),
        cwd=tmp_path,
        env=ENV,
    )
    cwd = copy_of(reference, tmp_path)
    damage(run_dir(cwd))
    before = snapshot(run_dir(cwd))
    proc = selfimprove(
        "report", str(run_dir(cwd)), "--format", "csv", "--out", str(tmp_path / "b"), cwd=cwd, env=ENV
    )
    (note,) = proc.stderr.strip().splitlines()
    assert said in note and "rebuilt from its stages' outputs" in note, note
    table_text = proc.stdout.split("table:")[0]  # the table, before its file's path
    assert table_text == ref_report.stdout.split("table:")[0]
    assert (tmp_path / "b" / "table.csv").read_text() == (tmp_path / "a" / "table.csv").read_text()
    assert snapshot(run_dir(cwd)) == before, "report does not write into the run it reads"
    RESULTS.append((case, proc.returncode, f"{note}; table identical to the undamaged run's"))


def hold_lock(root: Path):
    handle = open(root / ".lock", "a+")
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return handle


@pytest.mark.parametrize(
    "case, extra, refused",
    [
        (
            "on_change=refuse, a changed setting",
            ["method.train.steps=11", "on_change=refuse"],
            "was done with other settings",
        ),
        ("run directory locked by another process", [], "is in use by another selfimprove process"),
        (
            "preflight refusal (stop_after names no stage)",
            ["stop_after=nope"],
            "stop_after='nope' names no stage",
        ),
    ],
)
def test_a_refused_command_changes_nothing_on_disk(case, extra, refused, reference, tmp_path):
    cwd = copy_of(reference, tmp_path)
    root = run_dir(cwd)
    lock = hold_lock(root) if "locked" in case else None
    before = snapshot(cwd)
    try:
        # the run directory named explicitly, as a user pins a run to change a setting in it
        proc = selfimprove(*COMMAND, *extra, f"run_dir='{root}'", cwd=cwd, check=False, env=ENV)
    finally:
        if lock is not None:
            lock.close()
    (line,) = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and refused in line, proc.stderr
    after = snapshot(cwd)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"changed on disk: {changed}"
    RESULTS.append(
        (case, proc.returncode, f"{line.replace(str(root), 'RUN')}; {len(before)} paths: 0 changed")
    )
