"""`selfimprove report` on run directories written here as files: rows per setting, mean ± std over
seeds, the column layout read from the runs' config (report: node), the CLI overriding it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from selfimprove.pipeline import write_jsonl
from selfimprove.registry import ConfigError
from selfimprove.report import report
from tests.conftest import compose_cfg

LAYOUT = {
    "title": "STaR table",
    "columns": [
        {"metric": "acc/3", "iteration": "first", "title": "start"},
        {"metric": "acc/3", "iteration": "last", "title": "end"},
        # null format keys, as a composed config writes them: the table's format
        {
            "metric": "acc/3",
            "iteration": "last",
            "minus": "first",
            "title": "gain",
            "scale": None,
            "decimals": None,
        },
        # its own number format, as a count next to percentages needs
        {"metric": "acc/4", "iteration": "last", "title": "half", "scale": 1, "decimals": 2},
    ],
    "plots": ["acc/3"],
    "scale": 100,
    "decimals": 1,
}


def fake_run(root: Path, rationalize: str, seed: int, accs: list[float]) -> None:
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "report": LAYOUT}))
    overrides = [f"method.rationalize={rationalize}", f"seed={seed}", "experiment=star_table"]
    (root / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    write_jsonl(
        root / "metrics.jsonl", [{"iteration": i, "acc/3": a, "acc/4": a / 2} for i, a in enumerate(accs)]
    )


@pytest.fixture
def sweep(tmp_path) -> Path:
    fake_run(tmp_path / "a", "false", 0, [0.5, 0.6, 0.7])
    fake_run(tmp_path / "b", "false", 1, [0.5, 0.7, 0.9])
    fake_run(tmp_path / "c", "true", 0, [0.4, 0.8, 0.9])
    (tmp_path / ".store" / "x").mkdir(parents=True)  # hidden folders are not runs
    return tmp_path


def test_table_from_the_config_layout(sweep, tmp_path):
    text, plots = report(sweep, "md", tmp_path / "out")
    lines = text.splitlines()
    assert lines[0] == "**STaR table**"
    assert lines[2] == "| setting | seeds | start | end | gain | half |"
    assert (
        lines[4] == "| method.rationalize=false | 2 | 50.0 ± 0.0 | 80.0 ± 14.1 | 30.0 ± 14.1 | 0.40 ± 0.07 |"
    )
    assert lines[5] == "| method.rationalize=true | 1 | 40.0 | 90.0 | 50.0 | 0.45 |"
    assert [p.name for p in plots] == ["acc_3.png"] and plots[0].read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "out" / "table.md").read_text() == text


def test_cli_grid_overrides_the_layout(sweep, tmp_path):
    text, plots = report(sweep, "csv", tmp_path, metrics=["acc/4"], iterations=["1"])
    assert text.splitlines() == [
        "setting,n,acc/4 @1 mean,acc/4 @1 std",
        "method.rationalize=false,2,32.5,3.53553",
        "method.rationalize=true,1,40,0",
    ]
    assert [p.name for p in plots] == ["acc_4.png"]


def test_latex(sweep, tmp_path):
    text, _ = report(sweep, "latex", tmp_path)
    assert (
        r"method.rationalize=false & 2 & $50.0 \pm 0.0$ & $80.0 \pm 14.1$ & $30.0 \pm 14.1$ & $0.40 \pm 0.07$ \\"
        in text
    )


def test_bad_names_list_what_is_allowed(sweep, tmp_path):
    with pytest.raises(ConfigError, match="unknown report format 'docx'; available: csv, latex, md"):
        report(sweep, "docx", tmp_path)
    with pytest.raises(ConfigError, match="unknown report metric 'acc/5'.*available: acc/3, acc/4"):
        report(sweep, "md", tmp_path, metrics=["acc/5"])
    with pytest.raises(ConfigError, match="holds no run directory"):
        report(tmp_path / ".store", "md", tmp_path)


def test_every_experiment_layout_composes():
    for name in ("star_table", "length_gen"):
        layout = compose_cfg([f"experiment={name}"]).report
        # accuracies, and the filter counts length_gen records per round (tests/test_length_gen.py)
        named = [c.metric for c in layout.columns if not c.metric.startswith("acc/")]
        assert layout.columns and set(named) <= {"kept", "label_accuracy"}
