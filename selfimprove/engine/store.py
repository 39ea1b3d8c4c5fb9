"""A fingerprint-keyed store of finished stages, shared by the runs of a sweep.

Runs whose stages have the same fingerprint (same function, settings and upstream artifacts) --
e.g. ``init``, the warm start and the first sampling round of a sweep that varies only
``method.train.*`` -- compute such a stage once; the other runs link it into their own run
directory (hardlinks, or a copy across filesystems), so every run directory stays complete and
readable on its own.

    <store_dir>/<fingerprint>/       a finished stage folder, _DONE.json included
    <store_dir>/<fingerprint>.lock   held (fcntl) while one process computes or publishes it

A process holds the lock of a fingerprint from "is it in the store?" until it has either linked
it or computed and published it, so parallel jobs (joblib, submitit) never compute the same stage
twice; a killed process releases its lock with its file descriptors. A process holds at most one
lock at a time, so jobs cannot deadlock.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from selfimprove.engine.markers import damage, read_marker
from selfimprove.engine.pipeline import DONE, write_json_atomic


def link_or_copy(src: str, dst: str) -> None:
    """Hardlink a file (free, and the run directory survives deleting the store); copy across filesystems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class Store:
    def __init__(self, root: Path | str):
        self.root = Path(root)

    def has(self, fp: str) -> bool:
        """A stored stage counts when its marker is whole and its files are as the marker says (a
        run's hardlinked file cut in place cuts the stored one too)."""
        record, _ = read_marker(self.root / fp / DONE)
        return record is not None and not damage(self.root / fp, record)

    @contextmanager
    def lock(self, fp: str) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f"{fp}.lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # blocks while another job computes this stage
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def fetch(self, fp: str, path: Path, name: str) -> bool:
        """Put the stored stage ``fp`` at ``path`` under the run-directory contract (partial folder,
        rename, _DONE.json last). False when the store does not have it."""
        if not self.has(fp):
            return False
        stored = self.root / fp
        partial = path.with_name(path.name + ".partial")
        for stale in (path, partial):
            if stale.exists():
                shutil.rmtree(stale)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(stored, partial, copy_function=link_or_copy, ignore=shutil.ignore_patterns(DONE))
        os.replace(partial, path)
        record, _ = read_marker(stored / DONE)
        record.update(stage=name, shared_from=str(stored), shared_at=time.time())
        write_json_atomic(path / DONE, record)
        return True

    def publish(self, fp: str, path: Path) -> None:
        """Link a finished stage folder into the store (atomically: rename of a complete folder)."""
        if self.has(fp):
            return
        partial = self.root / f"{fp}.partial"
        if partial.exists():  # left by a process killed while publishing
            shutil.rmtree(partial)
        shutil.copytree(path, partial, copy_function=link_or_copy)
        if (self.root / fp).exists():  # a folder without a marker: never trust it
            shutil.rmtree(self.root / fp)
        os.replace(partial, self.root / fp)
