"""``selfimprove run | status``. ``run`` is a Hydra app; Hydra cannot share argv with subcommands,
so ``main`` checks the overrides (one-line errors, before anything is written) and then hands a
rewritten ``sys.argv`` to it."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from selfimprove import optuna_sweep
from selfimprove.engine.registry import ConfigError, unknown_choice

COMMANDS = {
    "run": "run (or resume) an experiment: selfimprove run [-m] [group=option ...] [key=value ...]",
    "plan": "what a run would do, without running it: stages, settings, parameters, memory per stage: selfimprove plan [-m] [overrides]",
    "report": "tables (md, latex, csv) and plots of a run or sweep directory: selfimprove report PATH [--format md|latex|csv] [--spread std|se|none] [--per-seed] [--check]",
    "status": "which stages of a run are done, pending, partial, changed or damaged; of a sweep, each job's state: selfimprove status RUN_DIR|SWEEP_DIR",
}
GROUP_OVERRIDE = re.compile(r"^[+~]?(?P<group>[\w./-]+?)(@[\w.]+)?=(?P<value>.*)$")


def conf_dir() -> Path:
    from selfimprove.app import CONF_DIR

    return CONF_DIR


def group_options() -> dict[str, list[str]]:
    """Config groups and their options, read from the conf/ tree (hydra/ holds Hydra's own groups,
    e.g. hydra/launcher=slurm, which Hydra checks itself)."""
    root = conf_dir()
    return {
        d.name: sorted(p.stem for p in d.glob("*.yaml"))
        for d in sorted(root.iterdir())
        if d.is_dir() and d.name != "hydra"
    }


def print_help() -> None:
    print("selfimprove: an experiment runner for LLM self-improvement research\n")
    print("commands:")
    for name, text in COMMANDS.items():
        print(f"  {name:8s}{text}")
    print("\nconfig groups (choose with group=option; defaults marked *):")
    defaults = default_choices()
    for group, options in group_options().items():
        shown = [f"{o}*" if defaults.get(group) == o else o for o in options]
        print(f"  {group:11s}{', '.join(shown)}")
    print(
        "\nexamples:\n"
        "  selfimprove run                                   # the CPU demo: STaR on addition, tiny model\n"
        "  selfimprove plan method=star model=qwen7b dataset=gsm8k hardware=gpu   # what it would do, and its memory\n"
        "  selfimprove run method.iterations=3 seed=1\n"
        "  selfimprove run stop_after=iter_01/generate       # stop to inspect samples; rerun to continue\n"
        "  selfimprove run -m seed=0,1 experiment=star_control,star_rationalize\n"
        "  selfimprove status outputs/default\n"
        "  selfimprove report multirun/experiment=star_table --format latex\n"
        "  selfimprove run --help                            # Hydra's help: every key with its value"
    )


def default_choices() -> dict[str, str]:
    import yaml

    text = (conf_dir() / "config.yaml").read_text()
    out = {}
    for item in yaml.safe_load(text).get("defaults", []):
        if isinstance(item, dict):
            out.update({k: v for k, v in item.items() if isinstance(v, str)})
    return out


def check_group_choices(overrides: list[str]) -> None:
    """``dataset=nope`` (also inside a sweep ``a,b``) -> one line listing the allowed options."""
    groups = group_options()
    for arg in overrides:
        match = GROUP_OVERRIDE.match(arg)
        if not match or match["group"] not in groups:
            continue
        for value in match["value"].split(","):
            value = value.strip()
            if value and value != "null" and value not in groups[match["group"]]:
                raise unknown_choice(f"{match['group']} option", value, groups[match["group"]])


def one_line(err: Exception) -> str:
    """Hydra/OmegaConf errors are multi-line; keep what names the key and the problem."""
    parts = []
    for e in (err, err.__cause__):
        if e is None:
            continue
        for line in str(e).splitlines():
            line = line.strip()
            if (
                line
                and not line.startswith(("object_type", "Set the environment", "To append"))
                and line not in parts
            ):
                parts.append(line)
    return "; ".join(parts)


def job_overrides(overrides: list[str], multirun: bool) -> list[list[str]]:
    """Every job a command starts, as its own overrides: one without -m; with -m the product of the
    swept values (``seed=0,1``) and of the sweep an experiment declares (``hydra.sweeper.params``),
    the command line winning, as Hydra's basic sweeper does."""
    import itertools

    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not multirun:
        return [list(overrides)]
    parser = OverridesParser.create()
    hydra_cfg = command_hydra_config(overrides)
    if optuna_sweep.is_optuna(hydra_cfg.hydra.sweeper):
        optuna_sweep.check_installed()
    declared = dict(hydra_cfg.hydra.sweeper.params or {})
    swept: dict[str, list[str]] = {}
    for o in parser.parse_overrides([f"{k}={v}" for k, v in declared.items()]):
        values = sweep_values(o) if o.is_sweep_override() else [o.value()]
        swept[o.get_key_element()] = [f"{o.get_key_element()}={v}" for v in values]
    fixed = []
    for o in parser.parse_overrides(overrides):
        key = o.get_key_element()
        if o.is_sweep_override() and not o.key_or_group.startswith("hydra"):
            swept[key] = [f"{key}={v}" for v in sweep_values(o)]
        else:
            swept.pop(key, None)
            fixed.append(o.input_line)
    return [fixed + list(combo) for combo in itertools.product(*swept.values())]


#: the Hydra config of each command composed so far (job_overrides and parallel_jobs both read it)
HYDRA_CONFIGS: dict[tuple[str, ...], object] = {}


def command_hydra_config(overrides: list[str]):
    """The command's config with Hydra's own (sweeper, launcher), its sweeps at their first value:
    composed once per command (a compose takes seconds)."""
    from contextlib import nullcontext

    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra

    key = tuple(plain_overrides(overrides))
    if key not in HYDRA_CONFIGS:
        with nullcontext() if GlobalHydra.instance().is_initialized() else config_context():
            HYDRA_CONFIGS[key] = compose(config_name="config", overrides=list(key), return_hydra_config=True)
    return HYDRA_CONFIGS[key]


def sweep_values(override) -> list[str]:
    """The values of a sweep override that the checks before a run try: each of a choice or range;
    the two ends of an interval (an Optuna sweep samples between them)."""
    if override.is_interval_sweep():
        return [str(override.value().start), str(override.value().end)]
    return list(override.sweep_string_iterator())


def plain_overrides(overrides: list[str]) -> list[str]:
    """The overrides without sweeps (a sweep's first value stands in) and Hydra's own keys."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = []
    for o in OverridesParser.create().parse_overrides(overrides):
        if o.key_or_group.startswith("hydra") and not o.key_or_group.startswith("hydra/"):
            continue
        if o.is_sweep_override():
            out.append(f"{o.get_key_element()}={sweep_values(o)[0]}")
        else:
            out.append(o.input_line)
    return out


def config_context():
    """Hydra's compose API over the project's config tree, schemas and resolvers registered."""
    from hydra import initialize_config_dir

    import selfimprove.app  # noqa: F401  (registers the run_name resolver)
    from selfimprove.config import register_configs

    register_configs()
    return initialize_config_dir(config_dir=str(conf_dir()), version_base=None)


def job_config(overrides: list[str], sweep: str | None):
    """(config, run directory) of one job, as Hydra will make them: the run directory derived from
    the job's overrides, under the sweep directory for a job of a -m sweep."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from selfimprove.app import run_name

    cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    if sweep is None:
        root = Path(cfg.run_dir or cfg.hydra.run.dir)
    else:
        root = Path(sweep) / run_name(cfg.hydra.job.override_dirname)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, root


def composed_jobs(
    overrides: list[str], multirun: bool, sweep: str | None = None
) -> Iterator[tuple[list[str], object, Path]]:
    """(overrides, config, run directory) of every job the command starts, composed as Hydra will
    compose them: what `run` checks before Hydra writes anything, what `plan` shows, and the jobs
    `status` expects in a sweep directory (``sweep``: where it is, when not derived from the command)."""
    sweep = sweep or (sweep_dir(overrides) if multirun else None)
    with config_context():
        for job in job_overrides(overrides, multirun):
            yield (job, *job_config(plain_overrides(job), sweep))


def sweep_dir(overrides: list[str]) -> str:
    """multirun/<name of the whole sweep command>, so that the same sweep command resumes."""
    from selfimprove.app import keys_outside_run_identity, run_name

    excluded = keys_outside_run_identity()
    kept = sorted(o for o in overrides if names_the_sweep(o.split("=", 1)[0].lstrip("+~"), excluded))
    return f"multirun/{run_name(','.join(kept) if kept else '')}".replace("'", "")


def names_the_sweep(key: str, excluded: set[str]) -> bool:
    """Whether an override's key is part of the sweep directory's name: settings that change results,
    and what defines an Optuna study (hydra/sweeper, its objective, sampler, ...) except its trial
    budget, so that a larger hydra.sweeper.n_trials extends the same study. Not Hydra's other keys."""
    if key.startswith(("hydra/sweeper", "hydra.sweeper.")):
        return key != "hydra.sweeper.n_trials"
    return key not in excluded and not key.startswith("hydra")


def run_command(args: list[str]) -> int:
    from selfimprove.app import prepare

    hydra_flags = {
        "-m",
        "--multirun",
        "--cfg",
        "-c",
        "--help",
        "-h",
        "--info",
        "-i",
        "--resolve",
        "--package",
        "-p",
    }
    overrides = [a for a in args if not a.startswith("-") and "=" in a]
    multirun = "-m" in args or "--multirun" in args
    inspecting = any(a in ("--cfg", "-c", "--info", "-i") for a in args)  # print the config: no plan
    jobs = []  # (config, plan) of each job, as checked
    if not any(a in ("--help", "-h", "--hydra-help") for a in args) and not any(
        a.startswith(("--config-dir", "-cd", "--config-path", "-cp")) for a in args
    ):
        try:
            check_group_choices(overrides)
            for _, cfg, root in composed_jobs(overrides, multirun):  # a wrong type or unknown key fails here
                if not inspecting:  # a run that cannot work is refused before Hydra starts a job
                    jobs.append((cfg, prepare(cfg, root)[0]))
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except (HydraException, OmegaConfBaseException) as err:  # composition: wrong type, unknown key
            print(f"error: {one_line(err)}", file=sys.stderr)
            return 2
    extra = []
    if inspecting and any(a in ("--cfg", "-c") for a in args) and "--resolve" not in args:
        extra.append("--resolve")  # the values a run gets, not the interpolations that derive them
    if multirun and not any(o.startswith("hydra.sweep.dir=") for o in overrides):
        extra.append(f"hydra.sweep.dir='{sweep_dir(overrides)}'")  # quoted: the name holds '=' and ','"
    if multirun and jobs:
        extra += parallel_jobs(overrides, jobs)
    unknown = [a for a in args if a.startswith("-") and a not in hydra_flags and not a.startswith("--")]
    if unknown:
        print(
            f"error: unknown flag {unknown[0]}; selfimprove run takes Hydra's flags (-m, --cfg, --help, ...)",
            file=sys.stderr,
        )
        return 2
    from selfimprove.app import hydra_main

    sys.argv = ["selfimprove", *args, *extra]
    hydra_main()
    return 0


def parallel_jobs(overrides: list[str], jobs: list) -> list[str]:
    """The overrides that run a CPU sweep's jobs side by side (local_sweep.py), said in one line."""
    from selfimprove import local_sweep

    hydra_cfg = command_hydra_config(overrides)
    # an Optuna study (its own n_jobs) or a launcher an experiment file names: left as they are
    own_way = optuna_sweep.is_optuna(hydra_cfg.hydra.sweeper) or not str(
        hydra_cfg.hydra.launcher._target_
    ).endswith("BasicLauncher")
    chosen = local_sweep.side_by_side(overrides, jobs, own_way)
    if chosen is None:
        return []
    at_once, threads = chosen
    where = next((o.split("=", 1)[1] for o in overrides if o.startswith("hydra.sweep.dir=")), None)
    print(
        f"sweep: {len(jobs)} jobs, {at_once} at a time with {threads} thread{'s' * (threads > 1)} each "
        "(hydra/launcher=basic runs them one after another)",
        flush=True,
    )
    launcher = local_sweep.overrides_for(at_once, threads, where or sweep_dir(overrides))
    return [o for o in launcher if not local_sweep.user_chose(overrides, o.split("=", 1)[0] + "=")]


def plan_command(args: list[str]) -> int:
    """Plan each job of the command (the same overrides as `run`) and show it; a job that `run`
    would refuse is shown as its one-line refusal. Exit 2 when any is refused."""
    from rich.console import Console
    from rich.markup import escape

    from selfimprove import plan_view
    from selfimprove.app import prepare

    unknown = [a for a in args if a.startswith("-") and a not in ("-m", "--multirun")]
    if unknown:
        print(f"error: unknown flag {unknown[0]}; selfimprove plan takes -m and overrides", file=sys.stderr)
        return 2
    overrides = [a for a in args if not a.startswith("-")]
    multirun = "-m" in args or "--multirun" in args
    console = Console(highlight=False, width=160)
    refused = 0
    try:
        check_group_choices(overrides)
        for job, cfg, root in composed_jobs(overrides, multirun):
            if multirun:
                console.rule(" ".join(job))
            try:
                planned, notes = prepare(cfg, root, here=False)
            except ConfigError as err:
                refused += 1
                console.print(f"[red]refused:[/] {escape(str(err))}")
                continue
            plan_view.show(console, cfg, root, planned, notes)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (HydraException, OmegaConfBaseException) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    return 2 if refused else 0


def status_command(args: list[str]) -> int:
    from omegaconf import OmegaConf
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from selfimprove import sweep_status
    from selfimprove.app import plan
    from selfimprove.config import register_configs
    from selfimprove.engine.pipeline import METRICS, read_metrics
    from selfimprove.plan_view import STATE_COLOURS as colours

    if len(args) != 1:
        print("error: usage: selfimprove status RUN_DIR|SWEEP_DIR", file=sys.stderr)
        return 2
    root = Path(args[0])
    if sweep_status.is_sweep(root):  # a -m sweep: one row per job
        register_configs()
        return sweep_status.show(root)
    if not (root / "config.yaml").exists():
        print(f"error: {root} is not a run directory (no config.yaml)", file=sys.stderr)
        return 2
    register_configs()
    cfg = OmegaConf.load(root / "config.yaml")
    planned = plan(cfg, root)
    table = Table(title=str(root))
    for col in ("stage", "state", "fingerprint"):
        table.add_column(col)
    for s in planned.plan:
        table.add_row(s.name, f"[{colours[s.state]}]{s.state}[/]", s.fingerprint)
    console = Console(highlight=False)
    console.print(table)
    for s in planned.plan:
        if s.state == "damaged":  # what `run` will say when it recomputes it
            console.print(f"[magenta]damaged[/] {s.name}: {escape(s.why)}; `selfimprove run` recomputes it")
    _, problem = read_metrics(root / METRICS)
    if problem and any(s.state == "done" for s in planned.plan):  # a derived file: say it, do not fail
        console.print(f"[magenta]damaged[/] {problem}; `selfimprove run` rebuilds it from the stages")
    states = [s.state for s in planned.plan]
    console.print(", ".join(f"{states.count(k)} {k}" for k in colours if states.count(k)))
    return 0


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        sys.exit(2)


def report_command(args: list[str]) -> int:
    from selfimprove.engine.report import FORMATS, SPREADS, report

    parser = OneLineParser(prog="selfimprove report", description=COMMANDS["report"])
    parser.add_argument("path", type=Path, help="a run directory or a sweep directory")
    parser.add_argument("--format", default="md", help=f"table format: {', '.join(FORMATS)}")
    parser.add_argument(
        "--out", type=Path, help="folder for the table file and the PNGs (default PATH/report)"
    )
    parser.add_argument("--metrics", help="comma-separated metrics, overriding the config's report.columns")
    parser.add_argument("--iterations", help="comma-separated iterations (integers, first, last)")
    parser.add_argument(
        "--spread", default="std", help=f"after each mean: {', '.join(SPREADS)} (s.e. = std / sqrt(seeds))"
    )
    parser.add_argument("--per-seed", action="store_true", help="a row per seed under each setting")
    parser.add_argument(
        "--check",
        action="store_true",
        help="compare the table with the config's report.expected (exit 1 when a cell is off)",
    )
    ns = parser.parse_args(args)
    split = lambda text: [x.strip() for x in text.split(",") if x.strip()] if text else None  # noqa: E731
    try:
        if ns.check:
            from selfimprove.engine.contract import check

            lines, ok = check(ns.path)
            print("\n".join(lines))
            return 0 if ok else 1
        text, table_file, plots = report(
            ns.path, ns.format, ns.out, split(ns.metrics), split(ns.iterations), ns.spread, ns.per_seed
        )
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(text, end="")
    print(f"table: {table_file}")
    for p in plots:
        print(f"plot: {p}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Every command; Ctrl-C anywhere (also while checking, before a run starts) is one line, exit 130."""
    from selfimprove.engine.errors import INTERRUPTED

    try:
        return command(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130


def command(args: list[str]) -> int:
    if not args or args[0] in ("-h", "--help", "help"):
        print_help()
        return 0
    command, rest = args[0], args[1:]
    if command == "run":
        return run_command(rest)
    if command == "status":
        return status_command(rest)
    if command == "plan":
        return plan_command(rest)
    if command == "report":
        return report_command(rest)
    print(f"error: {unknown_choice('command', command, list(COMMANDS))}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
