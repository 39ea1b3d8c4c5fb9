"""Paper-style tables and plots from run and sweep directories: ``selfimprove report PATH``.

Rows are the settings that differ between the runs (read from each run's ``overrides.yaml``, the
seed left out), cells are mean ± std over the seeds of a setting. The columns come from the
``report:`` node of the runs' config (``conf/config.yaml`` and ``conf/experiment/*.yaml``), so a
paper's table layout is config, not code; ``--metrics``/``--iterations`` override it.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from selfimprove.app import keys_outside_run_identity, metrics_from_stages
from selfimprove.pipeline import METRICS, read_metrics
from selfimprove.registry import ConfigError, unknown_choice

FORMATS = {"md": "md", "latex": "tex", "csv": "csv"}


@dataclass
class RunResult:
    path: Path
    setting: dict[str, str]
    rows: dict[int, dict]
    layout: dict


@dataclass
class Column:
    metric: str
    iteration: int
    title: str
    minus: int | None = None
    # the configured iterations (first | last | an integer): first/last are each run's own, so that
    # runs of different lengths in one table (e.g. an evaluated-only baseline) each show their last
    spec: tuple = (None, None)
    # the table's number format: values times ``scale`` with ``decimals`` places (report.scale and
    # report.decimals unless the column sets its own, e.g. scale 1 for a count next to percentages)
    scale: float = 1
    decimals: int = 3


def find_runs(path: Path) -> list[RunResult]:
    """Every run directory at or below ``path`` (hidden folders such as the stage store skipped)."""
    from omegaconf import OmegaConf

    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path} is not a directory; give a run or sweep directory")
    found = sorted({p.parent for name in (METRICS, "config.yaml") for p in path.rglob(name)})
    found = [p for p in found if not any(part.startswith(".") for part in p.relative_to(path).parts)]
    if not found:
        raise ConfigError(f"{path} holds no run directory (no {METRICS} or config.yaml at or below it)")
    runs = []
    # not a setting: the seed (averaged over) and keys that do not change results
    not_settings = keys_outside_run_identity() | {"seed", "hydra.sweep.dir"}
    for run in found:
        overrides = (
            OmegaConf.to_container(OmegaConf.load(run / "overrides.yaml"))
            if (run / "overrides.yaml").exists()
            else []
        )
        setting = {}
        for item in overrides:
            key, _, value = str(item).lstrip("+~").partition("=")
            if key not in not_settings:
                setting[key] = value
        cfg = OmegaConf.load(run / "config.yaml") if (run / "config.yaml").exists() else {}
        layout = OmegaConf.to_container(cfg["report"]) if "report" in cfg else {}
        rows = {r["iteration"]: r for r in metrics_of(run)}
        if rows:
            runs.append(RunResult(run, setting, rows, layout))
    if not runs:
        raise ConfigError(f"{path} holds no finished iteration yet; run the command first")
    return runs


def metrics_of(run: Path) -> list[dict]:
    """The run's metrics lines; when metrics.jsonl is missing, empty or damaged, rebuilt (in memory:
    the report does not own the run) from the outputs of its done stages, said on stderr."""
    rows, problem = read_metrics(run / METRICS)
    if problem is None:
        return rows
    rebuilt = metrics_from_stages(run) if (run / "config.yaml").exists() else []
    print(
        f"note: {run}: {problem}; the report uses {len(rebuilt)} line(s) rebuilt from its stages' outputs"
        + ("" if rebuilt else " (none finished: the run is left out)"),
        file=sys.stderr,
    )
    return rebuilt


def labels(runs: list[RunResult]) -> tuple[list[str], str]:
    """A row label per run (only the keys that differ between runs) and the keys common to all."""
    keys = sorted({k for r in runs for k in r.setting})
    varying = [k for k in keys if len({r.setting.get(k) for r in runs}) > 1]
    common = [f"{k}={runs[0].setting[k]}" for k in keys if k not in varying and k in runs[0].setting]
    out = [", ".join(f"{k}={r.setting.get(k, '-')}" for k in varying) or "all runs" for r in runs]
    return out, ", ".join(common)


def resolve_iteration(value, first: int, last: int) -> int:
    if value in ("first", "last"):
        return first if value == "first" else last
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"report iteration '{value}' is not allowed; use first, last or an integer"
        ) from None


def columns_of(layout: dict, runs: list[RunResult], metrics: list[str] | None, iterations: list[str] | None):
    """The table's columns: the CLI's metric x iteration grid, else the config's list, else every
    acc/* at the first and the last iteration."""
    available = sorted({k for r in runs for row in r.rows.values() for k in row if k != "iteration"})
    its = sorted({i for r in runs for i in r.rows})
    first, last = its[0], its[-1]
    specs = layout.get("columns")
    if metrics or iterations or not specs:
        accs = sorted((k for k in available if k.startswith("acc/")), key=lambda k: (len(k), k))
        grid_metrics = metrics or accs
        grid_its = iterations or ["first", "last"]
        specs = [{"metric": m, "iteration": i} for m in grid_metrics for i in grid_its]
    cols = []
    for spec in specs:
        if spec["metric"] not in available:
            raise unknown_choice("report metric", spec["metric"], available)
        it = resolve_iteration(spec["iteration"], first, last)
        minus = spec.get("minus")
        minus = None if minus is None else resolve_iteration(minus, first, last)
        title = spec.get("title") or (
            f"{spec['metric']} @{it}" if minus is None else f"Δ {spec['metric']} @{minus}→{it}"
        )
        # a column's own format, else the table's (a composed config holds null for "not set")
        scale, decimals = (
            layout.get(key, default) if spec.get(key) is None else spec[key]
            for key, default in (("scale", 1), ("decimals", 3))
        )
        cols.append(
            Column(spec["metric"], it, title, minus, (spec["iteration"], spec.get("minus")), scale, decimals)
        )
    return cols


def cell_values(runs: list[RunResult], col: Column) -> list[float]:
    values = []
    for r in runs:
        it, minus = col.iteration, col.minus
        if col.spec[0] in ("first", "last"):
            it = resolve_iteration(col.spec[0], min(r.rows), max(r.rows))
        if col.spec[1] in ("first", "last"):
            minus = resolve_iteration(col.spec[1], min(r.rows), max(r.rows))
        row, base = r.rows.get(it, {}), r.rows.get(minus, {}) if minus is not None else {}
        if col.metric in row and (minus is None or col.metric in base):
            values.append(float(row[col.metric]) - (float(base[col.metric]) if minus is not None else 0.0))
    return values


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def build_table(runs: list[RunResult], cols: list[Column]) -> list[dict]:
    """Group runs by setting (in first-seen order); per column the mean and std over seeds."""
    row_labels, _ = labels(runs)
    groups: dict[str, list[RunResult]] = {}
    for label, run in zip(row_labels, runs):
        groups.setdefault(label, []).append(run)
    table = []
    for label, members in sorted(groups.items(), key=lambda kv: natural(kv[0])):
        cells = {c.title: mean_std(cell_values(members, c)) for c in cols}
        table.append({"setting": label, "n": len(members), "cells": cells, "runs": members})
    return table


def natural(text: str) -> list:
    """Sort key that orders numbers by value (steps=4 before steps=10)."""
    import re

    return [
        (1, float(x), "") if i % 2 else (0, 0.0, x) for i, x in enumerate(re.split(r"(\d+(?:\.\d+)?)", text))
    ]


def fmt(mean: float, std: float, n: int, scale: float, decimals: int, pm: str) -> str:
    if math.isnan(mean):
        return "–"
    text = f"{mean * scale:.{decimals}f}"
    return text + (f"{pm}{std * scale:.{decimals}f}" if n > 1 else "")


def latex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("&", r"\&"), ("%", r"\%"), ("#", r"\#")):
        text = text.replace(a, b)
    return text


def render(cols: list[Column], table: list[dict], fmt_name: str, caption: str) -> str:
    titles = [c.title for c in cols]
    if fmt_name == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["setting", "n"] + [f"{t} {s}" for t in titles for s in ("mean", "std")])
        for row in table:
            cells = [f"{v * c.scale:.6g}" for c in cols for v in row["cells"][c.title]]
            writer.writerow([row["setting"], row["n"], *cells])
        return buf.getvalue()
    if fmt_name == "md":
        lines = [f"**{caption}**", ""] if caption else []
        lines += ["| setting | seeds | " + " | ".join(titles) + " |", "|---|---:|" + "---:|" * len(titles)]
        for row in table:
            cells = [fmt(*row["cells"][c.title], row["n"], c.scale, c.decimals, " ± ") for c in cols]
            lines.append(f"| {row['setting']} | {row['n']} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        r"\begin{tabular}{l" + "r" * (len(titles) + 1) + "}",
        r"\toprule",
        "setting & seeds & " + " & ".join(latex_escape(t) for t in titles) + r" \\",
        r"\midrule",
    ]
    for row in table:
        cells = [
            "$" + fmt(*row["cells"][c.title], row["n"], c.scale, c.decimals, r" \pm ") + "$" for c in cols
        ]
        lines.append(f"{latex_escape(row['setting'])} & {row['n']} & " + " & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += [rf"\caption{{{latex_escape(caption)}}}"] if caption else []
    return "\n".join(lines + [r"\end{table}"]) + "\n"


def plot(table: list[dict], metrics: list[str], out: Path) -> list[Path]:
    """One PNG per metric: the metric against the iteration, a line per setting, a band of ± std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    written = []
    for metric in metrics:
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for row in table:
            its = sorted({i for r in row["runs"] for i, v in r.rows.items() if metric in v})
            if not its:
                continue
            stats = [
                mean_std([r.rows[i][metric] for r in row["runs"] if metric in r.rows.get(i, {})]) for i in its
            ]
            mean = [m for m, _ in stats]
            std = [s for _, s in stats]
            (line,) = ax.plot(its, mean, marker="o", label=f"{row['setting']} (n={row['n']})")
            lo = [m - s for m, s in zip(mean, std)]
            hi = [m + s for m, s in zip(mean, std)]
            ax.fill_between(its, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("iteration (0 = warm start)")
        ax.set_ylabel(metric)
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{metric.replace('/', '_')}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def report(
    path: Path,
    fmt_name: str = "md",
    out: Path | None = None,
    metrics: list[str] | None = None,
    iterations: list[str] | None = None,
) -> tuple[str, list[Path]]:
    """The table as text (also written to ``out/table.<ext>``) and the PNGs written to ``out``."""
    if fmt_name not in FORMATS:
        raise unknown_choice("report format", fmt_name, list(FORMATS))
    runs = find_runs(path)
    layout = runs[0].layout
    cols = columns_of(layout, runs, metrics, iterations)
    table = build_table(runs, cols)
    _, common = labels(runs)
    caption = layout.get("title") or common
    text = render(cols, table, fmt_name, caption)
    out = Path(out) if out is not None else Path(path) / "report"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"table.{FORMATS[fmt_name]}").write_text(text)
    plotted = metrics or layout.get("plots") or list(dict.fromkeys(c.metric for c in cols))
    available = {k for r in runs for row in r.rows.values() for k in row}
    for metric in plotted:
        if metric not in available:
            raise unknown_choice("report metric", metric, sorted(available - {"iteration"}))
    return text, plot(table, plotted, out)
