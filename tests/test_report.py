"""`selfimprove report` on run directories written here as files: rows per setting, mean ± std (or
s.e.) over seeds, the best of each column in bold, rows per seed on request, the column layout read
from the runs' config (report: node), the CLI overriding it; LaTeX that compiles (pdflatex, when
installed) and parses (pylatexenc), whatever characters the settings hold."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from selfimprove.app import CONF_DIR
from selfimprove.engine.pipeline import read_jsonl, write_jsonl
from selfimprove.engine.registry import ConfigError
from selfimprove.engine.report import at_iteration, report, resolve_iteration
from tests.conftest import compose_cfg
from tests.latex_check import compile_problems, parse_problems

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
    text, table_file, plots = report(sweep, "md", tmp_path / "out")
    lines = text.splitlines()
    assert lines[0] == "**STaR table**"
    assert lines[2] == "| setting | seeds | start | end | gain | half |"
    # the best of each column (all higher-is-better) in bold
    assert lines[4] == (
        "| method.rationalize=false | 2 | **50.0** ± 0.0 | 80.0 ± 14.1 | 30.0 ± 14.1 | 0.40 ± 0.07 |"
    )
    assert lines[5] == "| method.rationalize=true | 1 | 40.0 | **90.0** | **50.0** | **0.45** |"
    assert [p.name for p in plots] == ["acc_3.png"] and plots[0].read_bytes()[:4] == b"\x89PNG"
    assert table_file == tmp_path / "out" / "table.md" and table_file.read_text() == text


def test_a_null_metric_is_a_missing_cell_not_a_crash(sweep, tmp_path):
    """A method writes null where a metric does not apply (e.g. no pair came from the anchor): the
    cell and the plot point are left out, as for a metric the run lacks."""
    write_jsonl(
        sweep / "c" / "metrics.jsonl",
        [{"iteration": 0, "acc/3": 0.4, "acc/4": None}, {"iteration": 1, "acc/3": 0.8, "acc/4": None}],
    )
    text, _, plots = report(sweep, "md", tmp_path / "out")
    assert "| method.rationalize=true | 1 | 40.0 | 80.0 | **40.0** | – |" in text.splitlines()
    assert plots[0].read_bytes()[:4] == b"\x89PNG"


def test_cli_grid_overrides_the_layout(sweep, tmp_path):
    text, _, plots = report(sweep, "csv", tmp_path, metrics=["acc/4"], iterations=["1"])
    assert text.splitlines() == [
        "setting,n,acc/4 @1 mean,acc/4 @1 std",
        "method.rationalize=false,2,32.5,3.53553",
        "method.rationalize=true,1,40,",  # no spread from one seed
    ]
    assert [p.name for p in plots] == ["acc_4.png"]


def test_a_grid_column_of_counts_is_not_scaled_as_a_rate(sweep, tmp_path):
    """--metrics kept: integer counts print as they are, next to rates in the table's percent scale."""
    for run, kept in (("a", 1118), ("b", 1651)):
        rows = [{**r, "kept": kept + r["iteration"]} for r in read_jsonl(sweep / run / "metrics.jsonl")]
        write_jsonl(sweep / run / "metrics.jsonl", rows)
    text, _, _ = report(sweep, "csv", tmp_path, metrics=["kept", "acc/4"], iterations=["1"])
    assert text.splitlines()[1] == "method.rationalize=false,2,1385.5,376.888,32.5,3.53553"


def test_a_title_names_the_iteration_of_the_runs_at_hand(sweep, tmp_path):
    """A layout written for 4 iterations ("iter {iteration}") on runs that stopped at 2 says iter 2,
    not the iteration the layout was written for."""
    for run in ("a", "b", "c"):
        config = sweep / run / "config.yaml"
        cfg = yaml.safe_load(config.read_text())
        cfg["report"]["columns"][1] |= {"title": "iter {iteration}", "latex": "$it_{iteration}$"}
        config.write_text(yaml.safe_dump(cfg))
    assert "| setting | seeds | start | iter 2 | gain | half |" in report(sweep, "md", tmp_path)[0]
    assert "setting & seeds & start & $it_2$ & gain & half" in report(sweep, "latex", tmp_path)[0]


def test_latex(sweep, tmp_path):
    text, _, _ = report(sweep, "latex", tmp_path)
    assert (
        r"method.rationalize=false & 2 & $\mathbf{50.0} \pm 0.0$ & $80.0 \pm 14.1$ & $30.0 \pm 14.1$ & $0.40 \pm 0.07$ \\"
        in text
    )
    assert (
        r"method.rationalize=true & 1 & $40.0$ & $\mathbf{90.0}$ & $\mathbf{50.0}$ & $\mathbf{0.45}$ \\"
        in text
    )


def test_standard_error_per_seed_rows_and_lower_is_better(sweep, tmp_path):
    """--spread se divides the std by sqrt(seeds); --per-seed adds each run's own values under its
    setting; a column declared ``better: lower`` bolds its smallest mean."""
    for run in ("a", "b", "c"):
        cfg = yaml.safe_load((sweep / run / "config.yaml").read_text())
        cfg["report"]["columns"][2]["better"] = "lower"  # "gain" as if it were an error rate
        cfg["report"]["columns"][3]["better"] = "none"
        (sweep / run / "config.yaml").write_text(yaml.safe_dump(cfg))
    text, _, _ = report(sweep, "md", tmp_path, spread="se", per_seed=True)
    assert text.splitlines()[4:] == [
        "| method.rationalize=false | 2 | **50.0** ± 0.0 | 80.0 ± 10.0 | **30.0** ± 10.0 | 0.40 ± 0.05 |",
        "| ↳ seed=0 |  | 50.0 | 70.0 | 20.0 | 0.35 |",
        "| ↳ seed=1 |  | 50.0 | 90.0 | 40.0 | 0.45 |",
        "| method.rationalize=true | 1 | 40.0 | **90.0** | 50.0 | 0.45 |",
        "| ↳ seed=0 |  | 40.0 | 90.0 | 50.0 | 0.45 |",
    ]
    text, _, _ = report(sweep, "csv", tmp_path, spread="none", per_seed=True)
    assert text.splitlines()[:3] == [
        "setting,seed,n,start mean,end mean,gain mean,half mean",
        "method.rationalize=false,,2,50,80,30,0.4",
        "method.rationalize=false,0,,50,70,20,0.35",
    ]


def test_initial_weight_draws_are_seeds_of_one_setting(tmp_path):
    """model.init_seed (a draw of the initial weights) is averaged over like the seed, and each
    per-seed row names both."""
    for init, accs in ((0, [0.2, 0.4]), (1, [0.4, 0.8])):
        fake_run(tmp_path / f"i{init}", "false", 0, accs)
        cfg = yaml.safe_load((tmp_path / f"i{init}" / "config.yaml").read_text())
        (tmp_path / f"i{init}" / "config.yaml").write_text(
            yaml.safe_dump({**cfg, "model": {"init_seed": init}})
        )
        overrides = yaml.safe_load((tmp_path / f"i{init}" / "overrides.yaml").read_text())
        (tmp_path / f"i{init}" / "overrides.yaml").write_text(
            yaml.safe_dump([*overrides, f"model.init_seed={init}"])
        )
    text, _, _ = report(tmp_path, "md", tmp_path / "out", per_seed=True)
    assert text.splitlines()[4:] == [
        "| all runs | 2 | 30.0 ± 14.1 | 60.0 ± 28.3 | 30.0 ± 14.1 | 0.30 ± 0.14 |",
        "| ↳ seed=0, init 0 |  | 20.0 | 40.0 | 20.0 | 0.20 |",
        "| ↳ seed=0, init 1 |  | 40.0 | 80.0 | 40.0 | 0.40 |",
    ]


#: every character LaTeX treats specially, and the non-ASCII ones our titles use
NASTY = r"{r: 8, alpha: 16} & 50% $5 #1 a_b ~c ^d \e <f> |g"


def test_latex_compiles_and_parses_whatever_the_labels_hold(tmp_path):
    """A setting holding a LoRA dict and every LaTeX special character, a caption and a title with
    them too: the table compiles with pdflatex (when installed) and passes the parser check."""
    layout = {**LAYOUT, "title": "Δ acc → 100% & more_{x}"}
    layout["columns"] = [
        *LAYOUT["columns"][:3],
        {"metric": "acc/4", "iteration": "last", "title": "Δ^{c→i} #4"},
    ]
    for i, value in enumerate(["plain", NASTY]):
        root = tmp_path / "runs" / str(i)
        root.mkdir(parents=True)
        (root / "config.yaml").write_text(yaml.safe_dump({"seed": 0, "report": layout}))
        (root / "overrides.yaml").write_text(yaml.safe_dump([f"method.train.lora={value}"]))
        write_jsonl(
            root / "metrics.jsonl", [{"iteration": j, "acc/3": 0.5 + i / 10, "acc/4": 0.1} for j in range(2)]
        )
    text, _, _ = report(tmp_path / "runs", "latex", tmp_path / "out", per_seed=True)
    assert r"\{r: 8, alpha: 16\} \& 50\% \$5 \#1 a\_b \textasciitilde{}c \textasciicircum{}d" in text
    assert parse_problems(text) == []
    assert compile_problems(text, tmp_path / "tex") == []


GOOD_TABLE = (
    "\\begin{tabular}{lr}\n\\toprule\nsetting & value \\\\\n%s & $1.0$ \\\\\n\\bottomrule\n\\end{tabular}\n"
)


def test_the_latex_parser_catches_unescaped_characters():
    """The parse check above can fail: each broken table is reported."""
    assert parse_problems(GOOD_TABLE % "a") == []
    for label in ["a{b", "a}b", "a_b", "a#b", "a^b", "a&b", "a%b", "a$b", "a~b"]:
        assert parse_problems(GOOD_TABLE % label), label


@pytest.mark.skipif(
    shutil.which("pdflatex") is None, reason="pdflatex is not installed (apt install texlive-latex-extra)"
)
def test_pdflatex_catches_unescaped_characters(tmp_path):
    """The compile check above can fail: each broken table is reported by pdflatex."""
    assert compile_problems(GOOD_TABLE % "a", tmp_path / "ok") == []
    for label in ["a{b", "a_b", "a#b", "a^b", "a&b", "a$b"]:
        assert compile_problems(GOOD_TABLE % label, tmp_path / label.replace("/", "")), label


def test_bad_names_list_what_is_allowed(sweep, tmp_path):
    with pytest.raises(ConfigError, match="unknown report format 'docx'; available: csv, latex, md"):
        report(sweep, "docx", tmp_path)
    with pytest.raises(ConfigError, match="unknown report spread 'var'; available: none, se, std"):
        report(sweep, "md", tmp_path, spread="var")
    with pytest.raises(ConfigError, match="unknown report metric 'acc/5'.*available: acc/3, acc/4"):
        report(sweep, "md", tmp_path, metrics=["acc/5"])
    with pytest.raises(ConfigError, match="holds no run directory"):
        report(tmp_path / ".store", "md", tmp_path)


#: the experiments that declare a reproduction contract (report.expected)
CONTRACTS = [
    p.stem
    for p in sorted((CONF_DIR / "experiment").glob("*.yaml"))
    if (yaml.safe_load(p.read_text()).get("report") or {}).get("expected")
]


def test_contracts_are_found():
    assert {"ci_contract", "star_table", "length_gen", "score_table"} <= set(CONTRACTS)


@pytest.mark.parametrize("name", CONTRACTS)
def test_every_contract_names_columns_its_table_will_have(name):
    """Each expected cell is a column of the experiment's table; a per-level metric (acc/3,
    delta_c2i/3) is of a level the dataset tests; an iteration given by number is one the method runs."""
    cfg = compose_cfg([f"experiment={name}"])
    layout = OmegaConf.to_container(cfg.report, resolve=True)
    levels = set(cfg.dataset.test_levels)
    # SCoRe counts its stages otherwise: its columns name iterations first and last only
    iterations = next(
        (cfg.method[k] for k in ("iterations", "rounds", "max_rounds") if k in cfg.method), None
    )
    rows = layout["expected"]["rows"]
    assert rows and all(row["cells"] for row in rows)
    columns = layout["columns"]
    for title in {t for row in rows for t in row["cells"]}:
        if columns is None:  # the default table: every acc/<level> at the first and the last iteration
            default = re.fullmatch(r"acc/(\d+) @(\d+)", title)
            assert default and int(default[1]) in levels and int(default[2]) in (0, iterations), title
        else:
            # "{iteration}" in a title is the column's iteration: the method's last for "last"
            titles = {
                at_iteration(c["title"], resolve_iteration(c["iteration"], 0, iterations)) for c in columns
            }
            assert title in titles, title
    for column in columns or []:
        level = re.fullmatch(r"[\w@]+/(\d+)", column["metric"])
        assert level is None or int(level[1]) in levels, column
        if isinstance(column["iteration"], int):
            assert iterations is not None and column["iteration"] <= iterations, column


def test_cli_prints_the_table_and_where_it_is_written(sweep, tmp_path):
    from tests.conftest import selfimprove

    proc = selfimprove("report", str(sweep), "--format", "latex", "--spread", "se", cwd=tmp_path)
    lines = proc.stdout.splitlines()
    assert lines[-2:] == [
        f"table: {sweep / 'report' / 'table.tex'}",
        f"plot: {sweep / 'report' / 'acc_3.png'}",
    ]
    assert "\n".join(lines[:-2]) + "\n" == (sweep / "report" / "table.tex").read_text()
    assert r"$80.0 \pm 10.0$" in proc.stdout  # s.e. = 14.1 / sqrt(2)
    bad = selfimprove("report", str(sweep), "--spread", "var", cwd=tmp_path, check=False)
    assert (
        bad.returncode == 2 and bad.stderr == "error: unknown report spread 'var'; available: none, se, std\n"
    )
