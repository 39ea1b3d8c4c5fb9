"""The ``run`` job: a pure ``run(cfg)`` (tests call it in-process) behind a thin ``@hydra.main``."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from selfimprove.config import register_configs
from selfimprove.generation import resolve_backend
from selfimprove.methods import METHODS
from selfimprove.pipeline import Run, StopRequested, matches_stop, write_text_atomic
from selfimprove.registry import ConfigError
from selfimprove.store import Store
from selfimprove.tracking import Tracker
from selfimprove.training import launch

CONF_DIR = Path(__file__).resolve().parent / "conf"
MAX_NAME = 120


def run_name(override_dirname: str) -> str:
    """A run directory name from the command's overrides: readable, filesystem-safe, bounded."""
    name = (override_dirname or "default").replace("/", "_")
    if len(name) > MAX_NAME:
        name = name[:80] + "-" + hashlib.sha256(name.encode()).hexdigest()[:10]
    return name


OmegaConf.register_new_resolver("run_name", run_name, replace=True)


def keys_outside_run_identity() -> set[str]:
    """Override keys that do not change results, so not the run directory, a stage's fingerprint or
    a report row either: Hydra's ``override_dirname.exclude_keys`` in conf/config.yaml is the one list."""
    cfg = OmegaConf.load(CONF_DIR / "config.yaml")
    return set(cfg.hydra.job.config.override_dirname.exclude_keys)


def run_dir_of(cfg: DictConfig) -> Path:
    if cfg.run_dir:
        return Path(cfg.run_dir)
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    raise ConfigError("run_dir is not set; pass run_dir=PATH when calling run(cfg) outside the CLI")


def command_overrides() -> list[str]:
    """The overrides of the command that made this run (empty outside the Hydra CLI)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def sweep_name() -> str | None:
    """The sweep directory's name for a job of a ``-m`` sweep (its wandb group), else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return Path(HydraConfig.get().sweep.dir).name
    return None


def plan(cfg: DictConfig, root: Path) -> Run:
    """Walk the method without computing anything: the list of stages and their states."""
    planner = Run(
        root,
        neutral=frozenset(keys_outside_run_identity()),
        plan_only=True,
        on_change=str(cfg.on_change.value if hasattr(cfg.on_change, "value") else cfg.on_change),
    )
    METHODS.get(cfg.method.name)(cfg, planner)
    return planner


def check_stop_after(cfg: DictConfig, planned: Run) -> None:
    if cfg.stop_after is None:
        return
    names = [s.name for s in planned.plan]
    if not any(matches_stop(cfg.stop_after, n) for n in names):
        raise ConfigError(
            f"stop_after='{cfg.stop_after}' names no stage of this run; stages: {', '.join(names)}"
        )


def print_table(console, rows: list[dict]) -> None:
    from rich.table import Table

    if not rows:
        return
    columns = ["iteration"] + [c for c in ("samples", "prompts_solved", "kept") if any(c in r for r in rows)]
    columns += sorted({k for r in rows for k in r if k.startswith("acc/")}, key=lambda k: (len(k), k))
    table = Table(title="held-out greedy accuracy per difficulty (acc/<digits>)")
    for c in columns:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(
            *[("warm start" if c == "iteration" and r[c] == 0 else str(r.get(c, ""))) for c in columns]
        )
    console.print(table)


def quiet_libraries() -> None:
    """Our stage lines are the progress display; silence the libraries' own bars and notices."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def run(cfg: DictConfig) -> list[dict]:
    """Run (or resume) the method named by ``cfg.method.name`` in the run directory; returns the
    metrics rows. Raises ConfigError for bad input before anything is written."""
    import time

    import torch
    from rich.console import Console

    console = Console(highlight=False)
    quiet_libraries()
    if cfg.hardware.num_threads:
        torch.set_num_threads(cfg.hardware.num_threads)
    root = run_dir_of(cfg)
    # the backend actually used goes into the config, so that stage fingerprints name it
    cfg.generator.backend = resolve_backend(cfg.generator, cfg.hardware, say=lambda msg: console.print(msg))
    launch.check(cfg.hardware)
    planned = plan(cfg, root)
    check_stop_after(cfg, planned)

    done = sum(s.state == "done" for s in planned.plan)
    console.print(f"[bold]run directory:[/] {root}  ({done}/{len(planned.plan)} stages already done)")
    root.mkdir(parents=True, exist_ok=True)
    write_text_atomic(root / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    write_text_atomic(root / "overrides.yaml", OmegaConf.to_yaml(command_overrides()))
    tracker = Tracker(cfg, root, group=sweep_name())
    store = Store(cfg.store_dir or root.parent / ".store") if cfg.store else None
    started = time.time()
    with Run(
        root,
        stop_after=cfg.stop_after,
        on_change=planned.on_change,
        neutral=planned.neutral,
        log=console.print,
        on_record=tracker.log,
        store=store,
    ) as r:
        try:
            METHODS.get(cfg.method.name)(cfg, r)
        except StopRequested:
            pass
        if r.stopped_after:
            console.print(f"[yellow]stopped after {r.stopped_after}[/]; rerun without stop_after to continue")
        rows = r.metrics()
        counts = r.counts
    tracker.close()
    print_table(console, rows)
    console.print(
        f"{counts['computed']} stages computed, {counts['reused']} reused, {counts['shared']} shared, "
        f"{time.time() - started:.0f}s; run directory: {root}"
    )
    return rows


def hydra_main() -> None:
    """Entry point used by ``selfimprove run`` (cli.py rewrites sys.argv first)."""
    import hydra

    register_configs()

    @hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")
    def _main(cfg: DictConfig) -> None:
        try:
            run(cfg)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    _main()
