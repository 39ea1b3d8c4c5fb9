"""A ``-m`` sweep on a CPU machine runs its jobs side by side by default (Hydra's joblib launcher),
each on its share of the cores, instead of one after another with every core each: small models use
extra threads poorly (on 2 cores the demo's job takes 190 s beside another and 116-125 s alone, so
a pair of jobs finishes 1.25x sooner side by side).

As many jobs run at once as there are cores, jobs, and peak-memory estimates that fit in 80 % of
the RAM. A command that names a launcher (``hydra/launcher=basic``: one after another; ``slurm``),
a GPU run (its jobs would share the GPUs) and an Optuna study (its own ``n_jobs``) are left alone.
``hardware.num_threads`` on the command line sets the threads per job; then cores // threads jobs
run at once.

Each job takes a slot (a locked file in the sweep directory) for as long as it runs. The slot says
which cores are its own: a vLLM CPU engine binds its threads to them (``VLLM_CPU_OMP_THREADS_BIND``),
rather than every job's engine to core 0. Its output lines start with the job's name."""

from __future__ import annotations

import fcntl
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from selfimprove.engine.progress import LINE_PREFIX_ENV

#: set by the CLI for the sweep's jobs: "<jobs at once>:<threads per job>:<bind|keep>:<sweep directory>"
#: (keep: the user set VLLM_CPU_OMP_THREADS_BIND, which then stays)
SLOTS_ENV = "SELFIMPROVE_SWEEP_SLOTS"
#: where a vLLM CPU engine binds its threads, and how many cores it keeps for its own process
VLLM_BIND = ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU")
#: share of the RAM the jobs' peak-memory estimates may take together
MEMORY_SHARE = 0.8


def user_chose(overrides: list[str], *keys: str) -> bool:
    """Whether the command sets one of these keys (prefixes: ``hydra.launcher.`` is any of them)."""
    return any(o.lstrip("+~").startswith(keys) for o in overrides)


def side_by_side(
    overrides: list[str], jobs: list[tuple[object, object]], own_way: bool
) -> tuple[int, int] | None:
    """(jobs at once, threads per job) for a sweep of ``jobs`` ((config, plan) each, as ``run``
    checked them), or None: one after another, as Hydra's default launcher does. ``own_way``: the
    sweep has its own arrangement (an Optuna study's ``n_jobs``, a launcher its experiment names)."""
    from selfimprove import preflight
    from selfimprove.engine.pipeline import plain

    if own_way or len(jobs) < 2 or user_chose(overrides, "hydra/launcher", "hydra.launcher."):
        return None
    if any(preflight.device_of(plain(cfg.hardware)) != "cpu" for cfg, _ in jobs):
        return None
    try:
        import hydra_plugins.hydra_joblib_launcher  # noqa: F401
    except ImportError:  # installed with selfimprove; a trimmed install runs the jobs one by one
        return None
    cores = len(os.sched_getaffinity(0))
    threads = None  # per job: cores // jobs at once, unless the command gives a count
    if user_chose(overrides, "hardware.num_threads="):
        counts = {cfg.hardware.num_threads for cfg, _ in jobs}
        if len(counts) > 1 or None in counts:
            return None  # swept or null thread counts: the user's own arrangement
        (threads,) = counts
    at_once = min(len(jobs), max(1, cores // threads) if threads else cores)
    peaks = [job_peak(cfg, planned) for cfg, planned in jobs]
    if None in peaks:  # a model whose size is unknown here: no guess at how many fit
        return None
    ram = preflight.memory_of({"device": "cpu", "memory_gb": None})
    at_once = min(at_once, max(1, int(MEMORY_SHARE * ram // max(peaks))))
    if at_once < 2:
        return None
    return at_once, threads or max(1, cores // at_once)


def job_peak(cfg, planned) -> int | None:
    """The largest peak-memory estimate of the job's stages (None when the model's size is unknown)."""
    from selfimprove import preflight

    estimates = preflight.estimates(cfg, planned)
    return max(e.total for e in estimates) if estimates else None


def overrides_for(at_once: int, threads: int, sweep: str) -> list[str]:
    """The launcher overrides, and the environment the jobs inherit (their slots)."""
    bind = "keep" if os.environ.get(VLLM_BIND[0]) else "bind"
    os.environ[SLOTS_ENV] = f"{at_once}:{threads}:{bind}:{Path(sweep).resolve()}"
    os.environ["SELFIMPROVE_PROGRESS"] = (
        os.environ.get("SELFIMPROVE_PROGRESS") or "plain"
    )  # bars of several processes would overdraw
    return ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={at_once}", f"hardware.num_threads={threads}"]


@contextmanager
def slot(job_name: str) -> Iterator[int | None]:
    """Hold one of the sweep's slots while the job runs (None outside a side-by-side sweep): its
    cores go to a vLLM CPU engine's threads, its name to the start of each output line."""
    spec = os.environ.get(SLOTS_ENV)
    if not spec:
        yield None
        return
    die_with_sweep()
    count, threads, bind, sweep = spec.split(":", 3)
    folder = Path(sweep) / ".slots"
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(int(count)):
        handle = open(folder / str(k), "a")  # noqa: SIM115 (held for the job's life)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        saved = {key: os.environ.get(key) for key in (LINE_PREFIX_ENV, *VLLM_BIND)}
        os.environ[LINE_PREFIX_ENV] = f"{job_name} │ "
        if bind == "bind":
            os.environ.update(cores_env(k, int(threads)))
        try:
            yield k
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            handle.close()
        return
    yield None  # more jobs than slots (another sweep in the same folder): no cores of its own


def die_with_sweep() -> None:
    """A job's worker process ends when the sweep's process does (killed, even with SIGKILL), as a
    job of a sweep run one after another would: the same command then resumes it, instead of
    finding its run locked by an orphan that goes on."""
    global _watching
    if _watching:
        return
    _watching, parent = True, os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="die-with-sweep", daemon=True).start()


_watching = False


def cores_env(k: int, threads: int) -> dict[str, str]:
    """Slot ``k``'s cores for a vLLM CPU engine, none reserved for vLLM's own process."""
    cores = sorted(os.sched_getaffinity(0))
    mine = [cores[(k * threads + i) % len(cores)] for i in range(threads)]
    return {VLLM_BIND[0]: ",".join(map(str, mine)), VLLM_BIND[1]: "0"}
