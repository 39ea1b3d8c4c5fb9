"""The ``run`` job: a pure ``run(cfg)`` (tests call it in-process) behind a thin ``@hydra.main``."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from selfimprove import generation, local_sweep, optuna_sweep, preflight, validation
from selfimprove.config import PLANNING_FOR_GPUS, register_configs
from selfimprove.engine.errors import INTERRUPTED, StageFailed, explain
from selfimprove.engine.pipeline import Run, StopRequested, matches_stop, refusal, write_text_atomic
from selfimprove.engine.registry import ConfigError
from selfimprove.engine.store import Store
from selfimprove.engine.tracking import Tracker
from selfimprove.generation import resolve_backend
from selfimprove.methods import METHODS
from selfimprove.training import launch

CONF_DIR = Path(__file__).resolve().parent / "conf"
MAX_NAME = 120


def run_name(override_dirname: str) -> str:
    """A run directory name from the command's overrides: readable, filesystem-safe, bounded."""
    name = (override_dirname or "default").replace("/", "_")
    if len(name) > MAX_NAME:
        name = name[:80] + "-" + hashlib.sha256(name.encode()).hexdigest()[:10]
    return name


def run_path(run_dir: str | None, out_root: str, override_dirname: str) -> str:
    """Hydra's job folder: the explicit ``run_dir``, else ``out_root/<run_name>``."""
    return str(run_dir) if run_dir else f"{out_root}/{run_name(override_dirname)}"


OmegaConf.register_new_resolver("run_name", run_name, replace=True)
OmegaConf.register_new_resolver("run_path", run_path, replace=True)


#: config keys added after runs were made, with the value that means what those runs did: while a
#: key holds it, it is left out of every fingerprint, so those runs keep their stages
#: (engine.pipeline.fingerprint_of, ``KEY=VALUE``)
ADDED_KEYS = {
    "model.position_encoding": "rope",
    "model.characters": None,
    "model.init_seed": None,
    "train.lr_scheduler_kwargs": None,
    "train.carry_optimizer": False,
}


def fingerprint_neutral() -> frozenset[str]:
    """What fingerprints leave out: the keys that do not change results, and each added key at
    the value runs made before it had."""
    return frozenset(keys_outside_run_identity() | {f"{k}={v}" for k, v in ADDED_KEYS.items()})


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


def store_of(cfg: DictConfig, root: Path) -> Store | None:
    """The shared-stage store of a run (store=false: none)."""
    return Store(cfg.store_dir or root.parent / ".store") if cfg.store else None


def context_of(cfg: DictConfig) -> dict:
    """What every stage may require by parameter name without the method passing it (Run.context):
    the generation backend and the hardware. (``eval`` is an option of the evaluate stage, with a
    default: options are passed, never filled; methods/common.py:held_out_eval passes it.)"""
    return {"generator": cfg.generator, "hardware": cfg.hardware}


def plan(cfg: DictConfig, root: Path, replay: bool = False) -> Run:
    """Walk the method without computing anything: the list of stages and their states (done, in
    the store, pending, ...), with each stage's inputs for the preflight checks. ``replay``: also
    the metrics lines of the iterations whose stages are done (:func:`metrics_from_stages`)."""
    planner = Run(
        root,
        neutral=fingerprint_neutral(),
        plan_only=True,
        replay=replay,
        on_change=str(cfg.on_change.value if hasattr(cfg.on_change, "value") else cfg.on_change),
        store=store_of(cfg, root),
        context=context_of(cfg),
        seed=cfg.seed,
    )
    METHODS.get(cfg.method.name)(cfg, planner)
    return planner


def metrics_from_stages(root: Path) -> list[dict]:
    """A run's metrics.jsonl lines rebuilt from its done stages' outputs, as its config.yaml says."""
    register_configs()
    return plan(OmegaConf.load(root / "config.yaml"), root, replay=True).metrics()


def prepare(cfg: DictConfig, root: Path, say=lambda _: None, here: bool = True) -> tuple[Run, list[str]]:
    """Resolve the backend, plan the stages and run every preflight check: what `run` does before
    it writes anything, and all that `plan` does. Returns the plan and the notes to say once.
    ``here`` False (`selfimprove plan` of a run meant for another machine): a package this machine
    lacks (vLLM) is a note, not a refusal."""
    notes = preflight.check_config(cfg)
    elsewhere = not here and preflight.gpu_elsewhere(cfg.hardware)
    try:
        validation.check_places(cfg, root)
    except ConfigError as err:  # planned here for another machine: its folders may differ
        if not elsewhere:
            raise
        notes.append(f"on this machine: {err}")
    if elsewhere:  # what the run's GPU machine will do, not this one
        if str(cfg.generator.backend.value) == "auto":
            cfg.generator.backend = "vllm"
            notes.append("planned for GPUs this machine lacks: generator=auto is taken as vLLM there")
    else:  # the backend actually used goes into the config, so that stage fingerprints name it
        try:
            cfg.generator.backend = resolve_backend(cfg.generator, cfg.hardware, say=say)
        except ConfigError as err:  # e.g. generator=vllm where vLLM is not installed
            if here:
                raise
            notes.append(f"on this machine: {err}")
    launch.check(cfg.hardware)
    PLANNING_FOR_GPUS["on"] = elsewhere  # the GPU machine's installs (vLLM), not this one's
    try:
        if elsewhere:
            OmegaConf.resolve(cfg)  # the values the GPU machine will see, kept for the plan's display
        planned = plan(cfg, root)
    finally:
        PLANNING_FOR_GPUS["on"] = False
    check_stop_after(cfg, planned)
    missing = [] if elsewhere else preflight.missing_packages(planned)
    if missing and here:
        raise ConfigError(missing[0])
    preflight.check_plan(cfg, planned)
    return planned, notes + [f"on this machine: {m}" for m in missing]


def check_stop_after(cfg: DictConfig, planned: Run) -> None:
    if cfg.stop_after is None:
        return
    names = [s.name for s in planned.plan]
    if not any(matches_stop(cfg.stop_after, n) for n in names):
        raise ConfigError(
            f"stop_after='{cfg.stop_after}' names no stage of this run; stages: {', '.join(names)}"
        )


def refuse_changes(planned: Run) -> None:
    """on_change=refuse: a stage done with other settings refuses the run before its records
    (config.yaml, overrides.yaml) are rewritten to describe settings its results do not have."""
    if planned.on_change != "refuse":
        return
    for s in planned.plan:
        if s.state == "changed":
            raise refusal(s.name, planned.root, s.why)


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
    """Our bars (selfimprove/engine/progress.py) show each stage's progress: silence the libraries' own
    bars that would repeat them (datasets' map, transformers' weight loading) and their notices,
    but let hub downloads show theirs (transformers turns those off along with its own)."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import huggingface_hub
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    huggingface_hub.utils.enable_progress_bars()


def run(cfg: DictConfig) -> list[dict]:
    """Run (or resume) the method named by ``cfg.method.name`` in the run directory; returns the
    metrics rows. Raises ConfigError for bad input before anything is written."""
    import time

    import torch
    from rich.console import Console
    from rich.markup import escape

    console = Console(highlight=False)
    prefix = escape(os.environ.get(local_sweep.LINE_PREFIX_ENV, ""))  # jobs side by side: whose line it is

    def say(message: str) -> None:
        console.print(prefix + message, soft_wrap=bool(prefix))  # wrapped lines would lose the prefix

    quiet_libraries()
    if cfg.hardware.num_threads:
        torch.set_num_threads(cfg.hardware.num_threads)
    root = run_dir_of(cfg)
    planned, notes = prepare(cfg, root, say=say)
    for note in notes:
        say(f"[yellow]note:[/] {escape(note)}")

    done = sum(s.state == "done" for s in planned.plan)
    say(f"[bold]run directory:[/] {root}  ({done}/{len(planned.plan)} stages already done)")
    store = store_of(cfg, root)
    started = time.time()
    with Run(
        root,
        stop_after=cfg.stop_after,
        on_change=planned.on_change,
        neutral=planned.neutral,
        log=say,
        store=store,
        context=planned.context,
        seed=planned.seed,
    ) as r:
        refuse_changes(planned)  # the lock is held: from here on this process owns the run's records
        write_text_atomic(root / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        write_text_atomic(root / "overrides.yaml", OmegaConf.to_yaml(command_overrides()))
        tracker = Tracker(cfg, root, group=sweep_name())
        r.on_record, r.on_stage = tracker.log, tracker.log_stage
        try:
            METHODS.get(cfg.method.name)(cfg, r)
        except StopRequested:
            pass
        finally:  # resident vLLM engines and cached models end with the run, however it ends
            generation.close()
        if r.stopped_after:
            say(f"[yellow]stopped after {r.stopped_after}[/]; rerun without stop_after to continue")
        rows = r.metrics()
        counts = r.counts
        if not r.stopped_after and rows:
            tracker.log_report(root)
    tracker.close()
    print_table(console, rows)
    say(
        f"{counts['computed']} stages computed, {counts['reused']} reused, {counts['shared']} shared, "
        f"{time.time() - started:.0f}s; run directory: {root}"
    )
    return rows


def hydra_main() -> None:
    """Entry point used by ``selfimprove run`` (cli.py rewrites sys.argv first)."""
    import hydra

    register_configs()

    @hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")
    def _main(cfg: DictConfig) -> float | None:
        with local_sweep.slot(run_dir_of(cfg).name):  # a job of a side-by-side sweep: its cores
            code = run_reporting_errors(cfg)
        if optuna_sweep.is_trial():  # the study reads the trial's objective from what the job returns
            return optuna_sweep.trial_value(cfg, code)
        if code:  # success returns, so that a -m sweep goes on to its next job
            sys.exit(code)

    _main()


def run_reporting_errors(cfg: DictConfig) -> int:
    """``run(cfg)`` with every failure said in one line: exit 2 for bad input (refused before
    anything is written), 1 for a failure while running (the traceback goes to
    ``<run dir>/error.log``; ``HYDRA_FULL_ERROR=1`` prints it too), 130 for Ctrl-C."""
    import os
    import traceback

    try:
        run(cfg)
        return 0
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130
    except Exception as err:  # a failure while running: one line here, the whole story in the log
        line = str(err) if isinstance(err, StageFailed) else explain(err, where=known_run_dir(cfg))
        log = write_error_log(cfg, traceback.format_exc())
        where = f" (traceback: {log})" if log else ""
        print(f"error: {line}{where}", file=sys.stderr)
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            traceback.print_exc()
        return 1


def known_run_dir(cfg: DictConfig) -> Path | None:
    try:
        return run_dir_of(cfg)
    except ConfigError:
        return None


def write_error_log(cfg: DictConfig, text: str) -> Path | None:
    """The traceback of a failed run, in its run directory (None when it has none yet)."""
    import time

    root = known_run_dir(cfg)
    if root is None or not root.is_dir():
        return None
    log = root / "error.log"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        write_text_atomic(log, f"{stamp} selfimprove run {' '.join(command_overrides())}\n\n{text}")
    except OSError:  # the disk is full or the folder read-only: the one line is all there is
        return None
    return log
