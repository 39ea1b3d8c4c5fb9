"""Reproduction contracts: `selfimprove report DIR --check` against the `report.expected` a run's
config carries (one line per cell off, exit 1; a count of the cells within tolerance, exit 0), the
contracts in conf/ (each experiment has its own or none), and `expected` in no stage fingerprint."""

from __future__ import annotations

import glob
from pathlib import Path

import pytest
import yaml

from selfimprove.app import plan
from selfimprove.engine.pipeline import write_jsonl
from tests.conftest import compose_cfg, selfimprove

CONTRACT = {
    "source": {
        "machine": "a laptop",
        "commit": "abc1234",
        "date": "2026-12-05",
        "command": "selfimprove run -m x",
    },
    "tolerance": 2.0,
    "rows": [
        {
            "setting": "method=star",
            "seeds": 2,
            "cells": {"start": 50.0, "end": {"value": 75.0, "tolerance": 6}},
        },
        {"setting": "method=bstar", "seeds": 1, "cells": {"start": 40.0, "end": 90.0}},
    ],
}
LAYOUT = {
    "columns": [
        {"metric": "acc/3", "iteration": "first", "title": "start"},
        {"metric": "acc/3", "iteration": "last", "title": "end"},
    ],
    "scale": 100,
    "decimals": 1,
}


def sweep(
    root: Path, contract: dict | None, runs=(("star", 0, 0.6), ("star", 1, 0.9), ("bstar", 0, 0.9))
) -> Path:
    for method, seed, end in runs:
        run = root / f"{method}-{seed}"
        run.mkdir(parents=True)
        first = 0.5 if method == "star" else 0.4
        (run / "config.yaml").write_text(
            yaml.safe_dump({"seed": seed, "report": {**LAYOUT, "expected": contract}}, sort_keys=False)
        )
        (run / "overrides.yaml").write_text(yaml.safe_dump([f"method={method}", f"seed={seed}"]))
        write_jsonl(run / "metrics.jsonl", [{"iteration": 0, "acc/3": first}, {"iteration": 1, "acc/3": end}])
    return root


def test_check_passes_within_tolerance(tmp_path):
    """star's end is 75.0 exactly; its own tolerance (6) would also allow 69-81."""
    proc = selfimprove("report", str(sweep(tmp_path, CONTRACT)), "--check", cwd=tmp_path)
    assert proc.stdout.splitlines() == [
        "4 cells within tolerance (contract: `selfimprove run -m x` on a laptop, commit abc1234, 2026-12-05)"
    ]
    assert not (tmp_path / "report").exists()  # a check writes nothing


def test_check_fails_with_one_line_per_cell_off(tmp_path):
    """Drifted values, a row the directory lacks, a column the table lacks and a seed count that
    differs each give one line, and the exit status is 1."""
    contract = {
        **CONTRACT,
        "rows": [*CONTRACT["rows"], {"setting": "method=rest_em", "cells": {"start": 1.0}}],
    }
    contract["rows"][1] = {
        "setting": "method=bstar",
        "seeds": 2,
        "cells": {"start": 45.0, "end": 90.0, "gain": 1},
    }
    proc = selfimprove("report", str(sweep(tmp_path, contract)), "--check", cwd=tmp_path, check=False)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.splitlines() == [
        "row 'method=bstar': 1 seed(s), the contract averaged 2 (a sweep not finished?)",
        "row 'method=bstar', column 'start': 40.0, expected 45 ± 2 (off by -5.0)",
        "row 'method=bstar', column 'gain': no such column (columns: start, end)",
        "row 'method=rest_em': not in this directory's table",
        "4 problem(s) in 6 expected cells; contract: `selfimprove run -m x` on a laptop, commit abc1234, 2026-12-05",
        "this directory: rows method=bstar, method=star; settings: the defaults",
    ]


def test_a_tolerance_is_a_bound_not_a_formality(tmp_path):
    """star's end (75.0) against 80 ± 2: off; against the cell's own 80 ± 6: within."""
    contract = yaml.safe_load(yaml.safe_dump(CONTRACT))
    contract["rows"][0]["cells"]["end"] = 80.0
    proc = selfimprove("report", str(sweep(tmp_path / "a", contract)), "--check", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "column 'end': 75.0, expected 80 ± 2 (off by -5.0)" in proc.stdout
    contract["rows"][0]["cells"]["end"] = {"value": 80.0, "tolerance": 6}
    proc = selfimprove("report", str(sweep(tmp_path / "b", contract)), "--check", cwd=tmp_path, check=False)
    assert proc.returncode == 0 and "4 cells within tolerance" in proc.stdout


def test_no_contract_is_one_line_and_exit_2(tmp_path):
    proc = selfimprove("report", str(sweep(tmp_path, None)), "--check", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().endswith("declares no expected values (report.expected); record them in the "
                                        "experiment file to make a contract (docs/reproductions.md)")  # fmt: skip


def test_every_experiment_has_its_own_contract_or_none():
    """conf/config.yaml's contract is the demo's: an experiment file that inherited it would be
    checked against the demo's table."""
    demo = compose_cfg([]).report.expected
    assert demo.rows[0].setting == "all runs" and "acc/3 @3" in demo.rows[0].cells
    for path in sorted(glob.glob(str(Path(__file__).parent.parent / "conf" / "experiment" / "*.yaml"))):
        name = Path(path).stem
        expected = compose_cfg([f"experiment={name}"]).report.expected
        assert expected != demo, f"experiment={name} inherits the demo's contract; give it its own or null"
        if expected is not None:
            assert expected.rows and all(row.cells for row in expected.rows), name
            assert expected.source.commit and expected.source.date, name


@pytest.mark.parametrize("experiment", ["star_table", None])
def test_expected_enters_no_stage_fingerprint(experiment, tmp_path):
    """The same run with and without its contract plans the same stages with the same fingerprints
    (a setting that does matter, for contrast, changes them)."""
    base = [f"experiment={experiment}"] if experiment else []

    def fingerprints(overrides: list[str]) -> list[str]:
        cfg = compose_cfg(base + overrides)
        cfg.generator.backend = "hf"
        return [s.fingerprint for s in plan(cfg, tmp_path / "run").plan]

    with_contract = fingerprints([])
    assert with_contract == fingerprints(["report.expected=null"])
    assert with_contract != fingerprints(["method.train.steps=7"])
