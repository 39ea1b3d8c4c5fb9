"""``selfimprove status SWEEP_DIR``: one row per job of a ``-m`` sweep -- its overrides, its state
(done, running, partial at a stage, failed with its one-line error, pending), the stages it
computed and the ones it took from the store, and its wall time -- with the totals below.

The jobs a sweep expects come from the ``multirun.yaml`` Hydra writes into the sweep directory:
a grid sweep's job list is recomputed from its overrides exactly as ``selfimprove run`` derives
each job's run directory (cli.composed_jobs); an Optuna study's jobs are its stored trials, and
the trials it has yet to ask are pending.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from selfimprove import optuna_sweep
from selfimprove.engine.pipeline import EVENTS, read_jsonl
from selfimprove.engine.registry import ConfigError

SWEEP_CONFIG = "multirun.yaml"
COLOURS = {"done": "green", "running": "cyan", "partial": "yellow", "failed": "red", "pending": "white"}


@dataclass
class Job:
    overrides: list[str]
    root: Path | None  # None: an Optuna trial not asked yet (its parameters are not chosen)
    name: str  # the job's number in the sweep, or its Optuna trial(s)
    result: str = ""  # an Optuna trial's objective, "acc/3=0.25"


@dataclass
class JobState:
    state: str  # done | running | partial | failed | pending
    detail: str = ""  # the stage it is at, or its one-line error
    done: int = 0  # stages done ...
    total: int | None = None  # ... of the stages it plans (None: not started)
    computed: int = 0
    shared: int = 0
    seconds: float = 0.0  # the wall time of the stages it computed


def is_sweep(path: Path) -> bool:
    return (path / SWEEP_CONFIG).exists()


# -- the jobs a sweep expects ---------------------------------------------------------------------


def expected_jobs(sweep: Path) -> list[Job]:
    """The sweep's jobs from its multirun.yaml, then any run directory found in it that the job list
    does not name (e.g. left by an earlier version of an experiment's sweep)."""
    cfg = OmegaConf.load(sweep / SWEEP_CONFIG)
    jobs = trial_jobs(sweep, cfg) if optuna_sweep.is_optuna(cfg.hydra.sweeper) else grid_jobs(sweep, cfg)
    known = {job.root for job in jobs}
    for root in sorted(p.parent for p in sweep.glob("*/overrides.yaml")):
        if root not in known:
            jobs.append(Job(read_overrides(root), root, "?"))
    return jobs


def grid_jobs(sweep: Path, cfg: DictConfig) -> list[Job]:
    from selfimprove.cli import composed_jobs

    overrides = list(cfg.hydra.overrides.task)
    return [
        Job(job, root, str(i))
        for i, (job, _, root) in enumerate(composed_jobs(overrides, True, sweep=str(sweep)), start=1)
    ]


def trial_jobs(sweep: Path, cfg: DictConfig) -> list[Job]:
    """One job per run directory of the study's trials (an interrupted trial and its retry share
    theirs), then one per trial the study has yet to ask (a queued retry has its trial's row)."""
    from optuna.trial import TrialState

    from selfimprove.cli import config_context, job_config, plain_overrides

    cfg.hydra.sweep.dir = str(sweep)  # the storage is named from it, maybe relative to another cwd
    study = optuna_sweep.load_study(cfg.hydra.sweeper.storage, cfg.hydra.sweeper.study_name)
    trials = study.get_trials(deepcopy=False) if study else []
    jobs: dict[Path, Job] = {}
    with config_context():
        for t in trials:
            if t.state == TrialState.WAITING:  # an interrupted trial queued again: its row is the trial's
                continue
            overrides = [f"{k}={v}" for k, v in {**t.params, **t.user_attrs}.items()]
            root = job_config(plain_overrides(overrides), str(sweep))[1]
            job = jobs.setdefault(root, Job(overrides, root, f"trial {t.number}"))
            if job.name != f"trial {t.number}":
                job.name += f"→{t.number}"
            if t.state == TrialState.COMPLETE:
                job.result = f"{cfg.hydra.sweeper.objective}={t.value:g}"
    waiting = sum(t.state == TrialState.WAITING for t in trials)
    left = int(cfg.hydra.sweeper.n_trials) - optuna_sweep.counted(trials) - waiting
    return list(jobs.values()) + [Job([], None, "next trial") for _ in range(left)]


def read_overrides(root: Path) -> list[str]:
    path = root / "overrides.yaml"
    return [str(o) for o in OmegaConf.load(path)] if path.exists() else []


# -- the state of one job -------------------------------------------------------------------------


def job_state(root: Path | None) -> JobState:
    """Where a job's run directory stands: running while a process holds its lock, done when every
    stage it plans is, failed when its error.log is newer than its last progress, else partial."""
    from selfimprove.app import plan

    if root is None or not root.exists():
        return JobState("pending")
    events = read_jsonl(root / EVENTS) if (root / EVENTS).exists() else []
    computed = [e for e in events if e["action"] == "computed"]
    counts = JobState(
        "pending",
        computed=len(computed),
        shared=sum(e["action"] == "shared" for e in events),
        seconds=sum(e.get("seconds", 0) for e in computed),
    )
    running = lock_held(root / ".lock")
    if not (root / "config.yaml").exists():
        counts.state = "running" if running else "pending"
        return counts
    try:
        stages = plan(OmegaConf.load(root / "config.yaml"), root).plan
    except ConfigError as err:  # e.g. a method or option that this version no longer has
        counts.state, counts.detail = "failed", f"cannot plan its config.yaml: {err}"
        return counts
    counts.done, counts.total = sum(s.state == "done" for s in stages), len(stages)
    unfinished = next((s.name for s in stages if s.state != "done"), None)
    if running:
        counts.state, counts.detail = "running", unfinished or ""
    elif unfinished is None:
        counts.state = "done"
    elif failed_last(root):
        counts.state, counts.detail = "failed", error_line(root / "error.log")
    else:
        counts.state, counts.detail = "partial", unfinished
    return counts


def lock_held(lock: Path) -> bool:
    """Whether a process holds a run directory's lock, read from /proc/locks: trying the lock
    instead could refuse a run that starts at that instant. (Matched by inode: /proc/locks and
    stat() name the device differently on overlay file systems.)"""
    if not lock.exists():
        return False
    inode = str(lock.stat().st_ino)
    try:
        table = Path("/proc/locks").read_text().splitlines()
    except OSError:  # not Linux: take the lock shared, for an instant
        return lock_taken(lock)
    for line in table:
        fields = line.replace("->", "").split()
        if len(fields) > 5 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == inode:
            return True
    return False


def lock_taken(lock: Path) -> bool:
    import fcntl

    with open(lock) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def failed_last(root: Path) -> bool:
    """Whether the run's last attempt failed: an error.log newer than its config and its events
    (an attempt after the failure rewrites the config and logs each stage it reuses)."""
    log = root / "error.log"
    if not log.exists():
        return False
    progress = [p.stat().st_mtime for p in (root / "config.yaml", root / EVENTS) if p.exists()]
    return log.stat().st_mtime >= max(progress, default=0)


def error_line(log: Path) -> str:
    """The failure's one line from error.log (the traceback app.run_reporting_errors writes): its last
    line, the exception named without its module -- a StageFailed's message is the line the run
    printed, 'stage: what went wrong; the fix'."""
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    if not lines:
        return "failed (empty error.log)"
    kind, sep, message = lines[-1].partition(": ")
    if not sep:
        return lines[-1]
    kind = kind.rsplit(".", 1)[-1]
    return message if kind in ("StageFailed", "RunError") else f"{kind}: {message}"


# -- the table ------------------------------------------------------------------------------------


def show(sweep: Path) -> int:
    """Print the sweep's table and totals."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from selfimprove.engine.report import RunResult, labels

    jobs = expected_jobs(sweep)
    states = [job_state(job.root) for job in jobs]
    chosen = [job for job in jobs if job.root is not None]  # not the Optuna trials yet to be asked
    settings = [dict(o.split("=", 1) for o in job.overrides) for job in chosen]
    rows, common = labels([RunResult(Path(), s, {}, {}) for s in settings]) if chosen else ([], "")
    label = dict(zip(map(id, chosen), rows))
    table = Table(title=str(sweep), caption=f"every job: {common}" if common else None)
    for column in ("job", "overrides", "state", "stages", "computed", "shared", "wall time"):
        table.add_column(column, justify="right" if column in ("stages", "computed", "shared") else "left")
    for job, s in zip(jobs, states):
        table.add_row(
            job.name,
            escape(label.get(id(job), "(parameters chosen when it starts)")),
            f"[{COLOURS[s.state]}]{escape(describe(s, job.result))}[/]",
            "-" if s.total is None else f"{s.done}/{s.total}",
            str(s.computed),
            str(s.shared),
            duration(s.seconds),
        )
    console = Console(highlight=False, width=max(Console().width, 120))
    console.print(table)
    console.print(totals(states))
    return 0


def describe(s: JobState, result: str) -> str:
    if s.state == "done":
        return f"done, {result}" if result else "done"
    if s.state == "partial":
        return f"partial at {s.detail}"
    if s.state == "running":
        return f"running {s.detail}".strip()
    return f"failed: {s.detail}" if s.state == "failed" else s.state


def totals(states: list[JobState]) -> str:
    kinds = [s.state for s in states]
    counted = ", ".join(f"{kinds.count(k)} {k}" for k in COLOURS if kinds.count(k))
    return (
        f"{len(states)} jobs: {counted}; {sum(s.computed for s in states)} stages computed, "
        f"{sum(s.shared for s in states)} shared; wall time {duration(sum(s.seconds for s in states))}"
    )


def duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest:02d}s" if minutes else f"{rest}s"
