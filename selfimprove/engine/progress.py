"""Progress of long work: a rich bar on a terminal; elsewhere (CI, Slurm logs) a plain line at every
~10 % instead, so that a log file gets a dozen lines per stage, not a bar redrawn a thousand times.

    with progress.bar("generate", total=len(prompts), unit="prompts") as advance:
        for batch in batches:
            ...
            advance(len(batch))

One display per process. A bar opened while another is open shows beneath it on a terminal and is
silent in plain lines (the outer bar speaks for the stage). A bar appears with its first progress,
so that what comes before (a hub download's own bar) draws undisturbed, and vanishes from the
terminal when it finishes: the stage's "✓ name 2.3s" line stays. ``SELFIMPROVE_PROGRESS=plain|bar`` overrides the
terminal detection (e.g. ``bar`` inside a notebook, ``plain`` on a terminal that keeps a log).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

MODE_ENV = "SELFIMPROVE_PROGRESS"
#: a prefix for plain lines: the job's name while a sweep's jobs run side by side (local_sweep.py)
LINE_PREFIX_ENV = "SELFIMPROVE_LINE_PREFIX"
#: plain lines: none for work that ends within this many seconds (its stage line says it all)
PLAIN_AFTER_S = 1.0
#: plain lines: one each time the work crosses another tenth of its total
STEPS = 10

_display = None  # the rich Progress shown while any bar is open
_open: list[Bar] = []


def on_terminal() -> bool:
    """Bars when stdout is a terminal (rich's test, which honours FORCE_COLOR/TTY_COMPATIBLE), or as
    ``SELFIMPROVE_PROGRESS`` says."""
    forced = os.environ.get(MODE_ENV)
    if forced in ("bar", "plain"):
        return forced == "bar"
    from rich.console import Console

    return Console().is_terminal


def clock(seconds: float | None) -> str:
    if seconds is None:
        return "-:--:--"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Bar:
    """``total`` units of work (prompts, samples, steps), ``completed`` of them already done (a
    resumed training). ``note(loss=...)`` shows a value after the counts."""

    def __init__(self, description: str, total: int, unit: str, completed: int = 0):
        self.description, self.total, self.unit = description, max(int(total), 0), unit
        self.completed = self.resumed_at = int(completed)
        self.notes: dict[str, str] = {}
        self.started = time.monotonic()
        self.nested = bool(_open)
        self.said_step = self._step()  # plain lines: the last tenth said
        self.terminal, self.task = on_terminal(), None
        _open.append(self)

    def advance(self, n: int = 1) -> None:
        """Count ``n`` more units done; ``advance(0)`` shows the bar before the first unit is."""
        self.set(self.completed + n)

    def set(self, completed: int) -> None:
        self.completed = min(int(completed), self.total) if self.total else int(completed)
        if self.terminal:
            self._draw()
        else:
            self._say()

    def note(self, **values: str) -> None:
        self.notes.update(values)
        if self.terminal:
            self._draw()

    def _draw(self) -> None:
        if self.task is None:  # from resumed_at, so that rich's speed (the ETA) counts this run's work only
            self.task = _live().add_task(
                self.description, total=self.total or None, completed=self.resumed_at, unit=self.unit, note=""
            )
        _display.update(self.task, completed=self.completed, note=self.shown_notes())

    def shown_notes(self) -> str:
        return "  ".join(f"{k} {v}" for k, v in self.notes.items())

    def close(self) -> None:
        global _display
        if self not in _open:
            return
        _open.remove(self)
        if self.task is not None:
            _display.remove_task(self.task)
        if not _open and _display is not None:
            _display.stop()
            _display = None

    # -- plain lines ------------------------------------------------------------------------------
    def _step(self) -> int:
        return self.completed * STEPS // self.total if self.total else 0

    def _say(self) -> None:
        """One line when the work crosses another tenth, once it has run PLAIN_AFTER_S."""
        step = self._step()
        elapsed = time.monotonic() - self.started
        if self.nested or step <= self.said_step or elapsed < PLAIN_AFTER_S:
            return
        self.said_step = step
        print(self.line(elapsed), flush=True)

    def line(self, elapsed: float) -> str:
        done_here = self.completed - self.resumed_at
        left = (self.total - self.completed) * elapsed / done_here if done_here > 0 else None
        percent = 100 * self.completed // self.total
        notes = f"  {self.shown_notes()}" if self.notes else ""
        return (
            f"{os.environ.get(LINE_PREFIX_ENV, '')}  {self.description} {self.completed}/{self.total} {self.unit} ({percent}%){notes}"
            f"  elapsed {clock(elapsed)}  ETA {clock(left)}"
        )


def _live():
    """The rich display, started with the first bar (transient: finished bars leave no trace)."""
    global _display
    if _display is None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        _display = Progress(
            TextColumn("  {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"),
            TextColumn("{task.fields[note]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            transient=True,
        )
        _display.start()
    return _display


@contextmanager
def bar(description: str, total: int, unit: str) -> Iterator:
    """A progress bar for the body; yields ``advance(n=1)``. Closed however the body ends."""
    shown = Bar(description, total, unit)
    try:
        yield shown.advance
    finally:
        shown.close()
