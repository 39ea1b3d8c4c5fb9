"""The shared-stage store on small real stages: a second run links what the first computed, the
linked folder is a complete stage folder, other settings are computed, and two processes asking
for the same stage at once compute it once."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

from selfimprove.engine.pipeline import DONE, Run, read_jsonl, stage
from selfimprove.engine.store import Store


@stage(name="slow_number")
def slow_number(out: Path, value: int, log: str) -> dict:
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(1.0)  # long enough that the other process asks while this one computes
    (out / "value.txt").write_text(str(value))
    return {"value": value}


@stage(name="plus")
def plus(out: Path, source) -> dict:
    (out / "value.txt").write_text(str(int(source.file("value.txt").read_text()) + 1))
    return {}


def two_stages(root: Path, store: Store | None, value: int, log: Path) -> Run:
    with Run(root, log=lambda _: None, store=store) as run:
        run.stage("plus", plus, source=run.stage("number", slow_number, value=value, log=str(log)))
    return run


def actions(root: Path) -> dict[str, str]:
    return {e["stage"]: e["action"] for e in read_jsonl(root / "events.jsonl")}


def test_second_run_links_the_stored_stages(tmp_path):
    store, log = Store(tmp_path / ".store"), tmp_path / "calls.log"
    first = two_stages(tmp_path / "a", store, 1, log)
    second = two_stages(tmp_path / "b", store, 1, log)
    assert first.counts == {"computed": 2, "reused": 0, "shared": 0}
    assert second.counts == {"computed": 0, "reused": 0, "shared": 2}
    assert len(log.read_text().splitlines()) == 1
    assert actions(tmp_path / "b") == {"number": "shared", "plus": "shared"}
    b = tmp_path / "b" / "plus"
    assert (b / "value.txt").read_text() == "2" and not list(tmp_path.rglob("*.partial"))
    marker = json.loads((b / DONE).read_text())
    assert marker["stage"] == "plus" and marker["shared_from"] == str(
        tmp_path / ".store" / marker["fingerprint"]
    )
    # the run directory is self-contained: it survives deleting the store, and resumes as done
    for p in sorted((tmp_path / ".store").rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    again = two_stages(tmp_path / "b", Store(tmp_path / ".store"), 1, log)
    assert again.counts == {"computed": 0, "reused": 2, "shared": 0}
    # other settings are not shared
    other = two_stages(tmp_path / "c", store, 5, log)
    assert other.counts["computed"] == 2 and (tmp_path / "c" / "plus" / "value.txt").read_text() == "6"


def test_without_store_every_run_computes(tmp_path):
    log = tmp_path / "calls.log"
    two_stages(tmp_path / "a", None, 1, log)
    assert two_stages(tmp_path / "b", None, 1, log).counts["computed"] == 2
    assert not (tmp_path / ".store").exists()


def test_parallel_jobs_compute_a_stage_once(tmp_path):
    log = tmp_path / "calls.log"
    ctx = multiprocessing.get_context("fork")
    jobs = [
        ctx.Process(target=two_stages, args=(tmp_path / name, Store(tmp_path / ".store"), 7, log))
        for name in ("a", "b")
    ]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(60)
        assert job.exitcode == 0
    assert len(log.read_text().splitlines()) == 1, "the stage was computed once"
    got = sorted(actions(tmp_path / n)["number"] for n in ("a", "b"))
    assert got == ["computed", "shared"]
    assert all((tmp_path / n / "plus" / "value.txt").read_text() == "8" for n in ("a", "b"))
