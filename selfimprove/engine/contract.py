"""Reproduction contracts: ``selfimprove report DIR --check``.

An experiment file (or ``conf/config.yaml`` for the demo) may declare under ``report.expected`` the
table it should give: per row (its label as ``report`` prints it) the mean of each column, in the
table's units (after ``report.scale``), a tolerance, and where the figures were measured (machine,
commit, date, command). The run's ``config.yaml`` carries them, so the check needs nothing but the
run or sweep directory. ``report`` is never part of a stage's inputs, so a contract changes no
fingerprint and no run directory.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from selfimprove.engine.registry import ConfigError
from selfimprove.engine.report import Column, build_table, columns_of, find_runs, labels


def expected_value(cell, tolerance: float) -> tuple[float, float]:
    """A cell of the contract: a number (the contract's tolerance) or {value, tolerance}."""
    if isinstance(cell, dict):
        return float(cell["value"]), float(cell.get("tolerance", tolerance))
    return float(cell), tolerance


def row_problems(
    row: dict | None, want: dict, cols: dict[str, Column], tolerance: float
) -> tuple[list[str], int]:
    """One line per cell of an expected row that the table misses or that is off by more than its
    tolerance; and how many cells were compared."""
    name = f"row '{want['setting']}'"
    if row is None:
        return [f"{name}: not in this directory's table"], len(want["cells"])
    lines = []
    if want.get("seeds") is not None and row["n"] != want["seeds"]:
        lines.append(
            f"{name}: {row['n']} seed(s), the contract averaged {want['seeds']} (a sweep not finished?)"
        )
    for title, cell in want["cells"].items():
        value, tol = expected_value(cell, tolerance)
        col = cols.get(title)
        if col is None:
            lines.append(f"{name}, column '{title}': no such column (columns: {', '.join(cols)})")
            continue
        values = row["cells"][title]
        if not values:
            lines.append(f"{name}, column '{title}': no value, expected {value:g}")
            continue
        got = statistics.fmean(values) * col.scale
        if abs(got - value) > tol:
            lines.append(
                f"{name}, column '{title}': {got:.{col.decimals}f}, expected {value:g} ± {tol:g} "
                f"(off by {got - value:+.{col.decimals}f})"
            )
    return lines, len(want["cells"])


def check(path: Path) -> tuple[list[str], bool]:
    """The lines to print and whether every expected cell is within its tolerance."""
    runs = find_runs(path)
    layout = runs[0].layout
    expected = layout.get("expected")
    if not expected:
        raise ConfigError(
            f"{path}: its config declares no expected values (report.expected); record them in the "
            "experiment file to make a contract (docs/reproductions.md)"
        )
    cols = {c.title: c for c in columns_of(layout, runs, None, None)}
    table = {row["setting"]: row for row in build_table(runs, list(cols.values()))}
    lines, cells = [], 0
    for want in expected["rows"]:
        problems, compared = row_problems(
            table.get(want["setting"]), want, cols, float(expected["tolerance"])
        )
        lines += problems
        cells += compared
    src = expected["source"]
    origin = f"contract: `{src['command']}` on {src['machine']}, commit {src['commit']}, {src['date']}"
    if not lines:
        return [f"{cells} cells within tolerance ({origin})"], True
    _, common = labels(runs)
    lines.append(f"{len(lines)} problem(s) in {cells} expected cells; {origin}")
    lines.append(f"this directory: rows {', '.join(table)}; settings: {common or 'the defaults'}")
    return lines, False
