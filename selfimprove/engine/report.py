"""Paper-style tables and plots from run and sweep directories: ``selfimprove report PATH``.

Rows are the settings that differ between the runs (read from each run's ``overrides.yaml``, the
seed left out), cells are the mean over the seeds of a setting, ± their std or standard error
(``spread``), optionally with a row per seed. The columns come from the ``report:`` node of the
runs' config (``conf/config.yaml`` and ``conf/experiment/*.yaml``), so a paper's table layout is
config, not code; ``--metrics``/``--iterations`` override it. Each column says which way is better,
and its best value is bold.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from selfimprove.config import Better, ReportColumn
from selfimprove.engine.pipeline import METRICS, read_metrics, write_text_atomic
from selfimprove.engine.registry import ConfigError, unknown_choice

FORMATS = {"md": "md", "latex": "tex", "csv": "csv"}
# what follows a mean: the std over seeds, the standard error of the mean (std / sqrt(n)), nothing
SPREADS = {"std": "std", "se": "s.e.", "none": ""}
# LaTeX's special characters, and the non-ASCII ones our titles use that pdflatex does not know
LATEX_CHARS = {
    **{c: "\\" + c for c in "&%$#_{}"},
    "\\": r"\textbackslash{}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "<": r"\textless{}",
    ">": r"\textgreater{}",
    "|": r"\textbar{}",
    "Δ": r"\ensuremath{\Delta}",
    "→": r"\ensuremath{\rightarrow}",
    "±": r"\ensuremath{\pm}",
    "×": r"\ensuremath{\times}",
    "≤": r"\ensuremath{\leq}",
    "≥": r"\ensuremath{\geq}",
    "−": r"\ensuremath{-}",
    "–": "--",
    "—": "---",
}


@dataclass
class RunResult:
    path: Path
    setting: dict[str, str]
    rows: dict[int, dict]
    layout: dict
    seed: str = "?"


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
    # higher | lower | none: which value is best (bold) in the table
    better: str = ReportColumn.better.value
    # the title as LaTeX source; None = the title, escaped
    latex: str | None = None

    def text(self, value: float) -> str:
        """A value as the table shows it."""
        return f"{value * self.scale:.{self.decimals}f}"


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
    from selfimprove.app import keys_outside_run_identity  # the run-identity keys live in conf/

    runs = []
    # not a setting: the seeds (averaged over: the run's, and model.init_seed, a draw of the initial
    # weights) and keys that do not change results
    not_settings = keys_outside_run_identity() | {"seed", "model.init_seed", "hydra.sweep.dir"}
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
        # a null value (a metric a method writes only where it applies) counts as missing
        rows = {r["iteration"]: {k: v for k, v in r.items() if v is not None} for r in metrics_of(run)}
        if rows:
            runs.append(RunResult(run, setting, rows, layout, seed_label(cfg)))
    if not runs:
        raise ConfigError(f"{path} holds no finished iteration yet; run the command first")
    return runs


def seed_label(cfg) -> str:
    """A run's seeds as its per-seed row names them: ``0``, or ``0, init 3`` with model.init_seed."""
    seed = str(cfg["seed"]) if "seed" in cfg else "?"
    init = (cfg.get("model") or {}).get("init_seed") if cfg else None
    return seed if init is None else f"{seed}, init {init}"


def metrics_of(run: Path) -> list[dict]:
    """The run's metrics lines; when metrics.jsonl is missing, empty or damaged, rebuilt (in memory:
    the report does not own the run) from the outputs of its done stages, said on stderr."""
    rows, problem = read_metrics(run / METRICS)
    if problem is None:
        return rows
    from selfimprove.app import metrics_from_stages  # replays the run's method: the app's layer

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


def at_iteration(text: str, iteration: int) -> str:
    """``{iteration}`` in a column's title or latex is the column's iteration, so that "iter
    {iteration}" names the last iteration of the runs at hand, not of the runs the layout was
    written for."""
    return text.replace("{iteration}", str(iteration))


#: a grid column of counts (e.g. ``kept``): as they are, not in the table's percent scale
COUNT_FORMAT = {"scale": 1, "decimals": 0, "better": "none"}


def is_count(metric: str, runs: list[RunResult]) -> bool:
    """Whether every value the runs logged for ``metric`` is an integer (a count, not a rate)."""
    values = [row[metric] for r in runs for row in r.rows.values() if row.get(metric) is not None]
    return bool(values) and all(isinstance(v, int) and not isinstance(v, bool) for v in values)


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
        counts = {m for m in grid_metrics if is_count(m, runs)}
        specs = [
            {"metric": m, "iteration": i, **(COUNT_FORMAT if m in counts else {})}
            for m in grid_metrics
            for i in grid_its
        ]
    cols = []
    for spec in specs:
        if spec["metric"] not in available:
            raise unknown_choice("report metric", spec["metric"], available)
        it = resolve_iteration(spec["iteration"], first, last)
        minus = spec.get("minus")
        minus = None if minus is None else resolve_iteration(minus, first, last)
        title = at_iteration(spec.get("title") or "", it) or (
            f"{spec['metric']} @{it}" if minus is None else f"Δ {spec['metric']} @{minus}→{it}"
        )
        # a column's own format, else the table's (a composed config holds null for "not set")
        scale, decimals = (
            layout.get(key, default) if spec.get(key) is None else spec[key]
            for key, default in (("scale", 1), ("decimals", 3))
        )
        better = spec.get("better") or Column.better
        if better not in Better.__members__:
            raise unknown_choice(f"report column '{title}' better", better, list(Better.__members__))
        cols.append(
            Column(
                spec["metric"],
                it,
                title,
                minus,
                (spec["iteration"], spec.get("minus")),
                scale,
                decimals,
                better,
                at_iteration(spec["latex"], it) if spec.get("latex") else None,
            )
        )
    return cols


def run_value(r: RunResult, col: Column) -> float | None:
    """One run's value in a column (None when its metrics lack it)."""
    it, minus = col.iteration, col.minus
    if col.spec[0] in ("first", "last"):
        it = resolve_iteration(col.spec[0], min(r.rows), max(r.rows))
    if col.spec[1] in ("first", "last"):
        minus = resolve_iteration(col.spec[1], min(r.rows), max(r.rows))
    row, base = r.rows.get(it, {}), r.rows.get(minus, {}) if minus is not None else {}
    if col.metric not in row or (minus is not None and col.metric not in base):
        return None
    return float(row[col.metric]) - (float(base[col.metric]) if minus is not None else 0.0)


def cell_values(runs: list[RunResult], col: Column) -> list[float]:
    return [v for v in (run_value(r, col) for r in runs) if v is not None]


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def mean_spread(values: list[float], spread: str) -> tuple[float, float | None]:
    """The mean and what ``spread`` names (std, se = std / sqrt(n)); None for one value or none."""
    mean, std = mean_std(values)
    if spread == "none" or len(values) < 2:
        return mean, None
    return mean, std / math.sqrt(len(values)) if spread == "se" else std


def build_table(runs: list[RunResult], cols: list[Column]) -> list[dict]:
    """Group runs by setting (in natural order of the labels); per column the seeds' values."""
    row_labels, _ = labels(runs)
    groups: dict[str, list[RunResult]] = {}
    for label, run in zip(row_labels, runs):
        groups.setdefault(label, []).append(run)
    table = []
    for label, members in sorted(groups.items(), key=lambda kv: natural(kv[0])):
        cells = {c.title: cell_values(members, c) for c in cols}
        table.append({"setting": label, "n": len(members), "cells": cells, "runs": members})
    return table


def best_rows(table: list[dict], col: Column) -> set[int]:
    """Rows holding the column's best mean as shown (ties all count), none when every row shows the
    same value (nothing to single out) or the column has no direction."""
    shown = {
        i: float(col.text(statistics.fmean(row["cells"][col.title])))
        for i, row in enumerate(table)
        if row["cells"][col.title]
    }
    if col.better == Better.none.value or len(set(shown.values())) < 2:
        return set()
    best = (max if col.better == Better.higher.value else min)(shown.values())
    return {i for i, v in shown.items() if v == best}


def natural(text: str) -> list:
    """Sort key that orders numbers by value (steps=4 before steps=10)."""
    import re

    return [
        (1, float(x), "") if i % 2 else (0, 0.0, x) for i, x in enumerate(re.split(r"(\d+(?:\.\d+)?)", text))
    ]


def latex_escape(text: str) -> str:
    """Plain text as LaTeX source that prints it (one pass, so no escape is escaped again)."""
    return "".join(LATEX_CHARS.get(ch, ch) for ch in text)


@dataclass
class Cell:
    mean: float | None  # None when the runs lack the value
    spread: float | None = None
    bold: bool = False


def shown_rows(cols: list[Column], table: list[dict], spread: str, per_seed: bool) -> list[dict]:
    """The rows as printed: per setting its mean row (seeds, mean, spread, bold if best), then with
    ``per_seed`` one row per run of it (its seed and its own values)."""
    best = {c.title: best_rows(table, c) for c in cols}
    out = []
    for i, row in enumerate(table):
        cells = []
        for c in cols:
            mean, spread_value = mean_spread(row["cells"][c.title], spread)
            cells.append(Cell(None if math.isnan(mean) else mean, spread_value, i in best[c.title]))
        out.append({"setting": row["setting"], "seed": None, "n": row["n"], "cells": cells})
        for run in row["runs"] if per_seed else []:
            cells = [Cell(run_value(run, c)) for c in cols]
            out.append({"setting": row["setting"], "seed": run.seed, "n": "", "cells": cells})
    return out


def render_csv(cols: list[Column], rows: list[dict], caption: str, spread: str, per_seed: bool) -> str:
    """6 significant digits in the table's scale; a column per mean and spread."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    kinds = ["mean"] + ([spread] if spread != "none" else [])
    header = ["setting", *(["seed"] if per_seed else []), "n"]
    writer.writerow(header + [f"{c.title} {kind}" for c in cols for kind in kinds])
    for row in rows:
        cells = []
        for c, cell in zip(cols, row["cells"]):
            for value in (cell.mean, cell.spread)[: len(kinds)]:
                cells.append("" if value is None else f"{value * c.scale:.6g}")
        writer.writerow([row["setting"], *([row["seed"] or ""] if per_seed else []), row["n"], *cells])
    return buf.getvalue()


def render_md(cols: list[Column], rows: list[dict], caption: str, spread: str, per_seed: bool) -> str:
    def cell(col: Column, c: Cell) -> str:
        if c.mean is None:
            return "–"
        mean = f"**{col.text(c.mean)}**" if c.bold else col.text(c.mean)
        return mean + ("" if c.spread is None else f" ± {col.text(c.spread)}")

    lines = [f"**{caption}**", ""] if caption else []
    lines += [
        "| setting | seeds | " + " | ".join(c.title for c in cols) + " |",
        "|---|---:|" + "---:|" * len(cols),
    ]
    for row in rows:
        label = row["setting"] if row["seed"] is None else f"↳ seed={row['seed']}"
        lines.append(f"| {label} | {row['n']} | " + " | ".join(map(cell, cols, row["cells"])) + " |")
    return "\n".join(lines) + "\n"


def render_latex(cols: list[Column], rows: list[dict], caption: str, spread: str, per_seed: bool) -> str:
    """A booktabs table: labels and titles escaped (a column's ``latex`` title is used as is), numbers
    in math mode, the best mean of a column in bold."""

    def cell(col: Column, c: Cell) -> str:
        if c.mean is None:
            return "--"
        mean = rf"\mathbf{{{col.text(c.mean)}}}" if c.bold else col.text(c.mean)
        return f"${mean}" + ("" if c.spread is None else rf" \pm {col.text(c.spread)}") + "$"

    what = "mean" + (rf" \pm {SPREADS[spread]}" if spread != "none" else "")
    lines = [
        rf"% selfimprove report: needs \usepackage{{booktabs}}; cells: {what} over the seeds of a setting,"
        " the best of each column in bold",
        r"\begin{table}[t]",
        r"\centering",
        r"\begin{tabular}{l" + "r" * (len(cols) + 1) + "}",
        r"\toprule",
        "setting & seeds & " + " & ".join(c.latex or latex_escape(c.title) for c in cols) + r" \\",
        r"\midrule",
    ]
    for row in rows:
        seed = row["seed"]
        label = latex_escape(row["setting"]) if seed is None else rf"\quad seed={latex_escape(seed)}"
        lines.append(f"{label} & {row['n']} & " + " & ".join(map(cell, cols, row["cells"])) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += [rf"\caption{{{latex_escape(caption)}}}"] if caption else []
    return "\n".join(lines + [r"\end{table}"]) + "\n"


RENDERERS = {"md": render_md, "latex": render_latex, "csv": render_csv}


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


def table_data(path: Path) -> tuple[list[str], list[list]]:
    """``report``'s table of ``path`` (its layout, means in the table's scale) as a header and rows of
    values: what a wandb Table holds."""
    runs = find_runs(path)
    cols = columns_of(runs[0].layout, runs, None, None)
    rows = shown_rows(cols, build_table(runs, cols), "none", False)
    header = ["setting", "seeds", *(c.title for c in cols)]
    return header, [
        [
            row["setting"],
            row["n"],
            *(None if x.mean is None else x.mean * c.scale for c, x in zip(cols, row["cells"])),
        ]
        for row in rows
    ]


def report(
    path: Path,
    fmt_name: str = "md",
    out: Path | None = None,
    metrics: list[str] | None = None,
    iterations: list[str] | None = None,
    spread: str = "std",
    per_seed: bool = False,
) -> tuple[str, Path, list[Path]]:
    """The table as text, the file it is written to (``out/table.<ext>``) and the PNGs in ``out``."""
    if fmt_name not in FORMATS:
        raise unknown_choice("report format", fmt_name, list(FORMATS))
    if spread not in SPREADS:
        raise unknown_choice("report spread", spread, list(SPREADS))
    runs = find_runs(path)
    layout = runs[0].layout
    cols = columns_of(layout, runs, metrics, iterations)
    table = build_table(runs, cols)
    _, common = labels(runs)
    caption = layout.get("title") or common
    plotted = metrics or layout.get("plots") or list(dict.fromkeys(c.metric for c in cols))
    available = {k for r in runs for row in r.rows.values() for k in row}
    for metric in plotted:
        if metric not in available:
            raise unknown_choice("report metric", metric, sorted(available - {"iteration"}))
    rows = shown_rows(cols, table, spread, per_seed)
    text = RENDERERS[fmt_name](cols, rows, caption, spread, per_seed)
    out = Path(out) if out is not None else Path(path) / "report"
    out.mkdir(parents=True, exist_ok=True)
    table_file = out / f"table.{FORMATS[fmt_name]}"
    write_text_atomic(table_file, text)
    return text, table_file, plot(table, plotted, out)
