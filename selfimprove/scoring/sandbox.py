"""Run untrusted (model-generated) Python programs, one subprocess each, contained.

    results = run_many(programs, limits_from(cfg.dataset.sandbox), workers=4)  # [SandboxResult, ...]
    results[0].passed                                            # exit status 0, not timed out

Every program runs through the trusted launcher (``_launcher.py``). With ``isolation=namespaces``
(root with unshare(2), the default where available) a program gets: no network (a new network
namespace with no interface up), private tmpfs over /tmp, /var/tmp and /dev/shm (its working
directory lives there and vanishes with it), its own PID namespace (everything it spawned dies
with it), an unprivileged uid of its own (cannot read 0600 files, write or delete anything it does
not own; RLIMIT_NPROC applies, as it would not to root), and rlimits on CPU time, address space,
file size and open files. The launcher kills it after ``timeout`` wall-clock seconds; the output
kept from stdout/stderr is capped. ``isolation=guarded`` (no root or no namespaces) keeps the
rlimits, the uid drop when root, the session kill and a socket-disabling prelude -- a guard, not
a sandbox; ``auto`` picks namespaces when they work. docs/sandbox.md has the hostile-case matrix.

Model-generated code must never run outside this module.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from selfimprove.registry import ConfigError

LAUNCHER = Path(__file__).with_name("_launcher.py")
ISOLATIONS = ("auto", "namespaces", "guarded")
# sandbox uids: a fresh one per program (so fork-bomb counts and kills never mix across programs)
UID_BASE, UID_SPAN = 200_000, 1_000_000
_uids = itertools.count()

# Prepended in guarded mode, where there is no network namespace: no new sockets from Python.
GUARD_PRELUDE = """\
import socket as _s
def _no_network(*a, **k):
    raise OSError("network access is disabled in the sandbox")
_s.socket = _s.create_connection = _s.socketpair = _no_network
del _s, _no_network
"""


@dataclass(frozen=True)
class Limits:
    """Per-program limits: the ``sandbox`` node of a code task's config (conf/dataset/humaneval.yaml
    holds the defaults and their units)."""

    timeout: float  # wall-clock seconds
    cpu_seconds: int  # RLIMIT_CPU
    memory_mb: int  # RLIMIT_AS (address space)
    nproc: int  # RLIMIT_NPROC: processes/threads of the sandbox uid
    file_size_mb: int  # RLIMIT_FSIZE: largest file it may write
    disk_mb: int  # size of its private /tmp (namespaces only)
    open_files: int  # RLIMIT_NOFILE
    output_bytes: int  # stdout and stderr kept, each
    isolation: str  # auto | namespaces | guarded
    python: str | None  # interpreter; None = this one if the sandbox uid can run it


@dataclass(frozen=True)
class SandboxResult:
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    wall_s: float
    isolation: str

    @property
    def passed(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def limits_from(cfg: dict | None) -> Limits:
    """Limits from a config node; an unknown key or isolation is a one-line error."""
    from selfimprove.pipeline import plain

    cfg = plain(cfg or {})
    allowed = set(Limits.__dataclass_fields__)
    unknown, missing = sorted(set(cfg) - allowed), sorted(allowed - set(cfg))
    if unknown or missing:
        bad = f"unknown sandbox key '{unknown[0]}'" if unknown else f"sandbox key '{missing[0]}' is missing"
        raise ConfigError(f"{bad}; keys: {', '.join(sorted(allowed))}")
    if cfg["isolation"] not in ISOLATIONS:
        raise ConfigError(
            f"sandbox.isolation='{cfg['isolation']}' is not allowed; use {', '.join(ISOLATIONS)}"
        )
    return Limits(**cfg)


def _read_capped(stream, cap: int, sink: list[bytes]) -> None:
    """Keep the first ``cap`` bytes and drain (discard) the rest, so the program never blocks."""
    kept = 0
    while chunk := stream.read(65536):
        if kept < cap:
            sink.append(chunk[: cap - kept])
            kept += len(sink[-1])
    stream.close()


def _launch(program: str, limits: Limits, isolation: str, python: str) -> SandboxResult:
    uid = UID_BASE + (os.getpid() * 4096 + next(_uids)) % UID_SPAN
    nproc = limits.nproc
    if isolation == "guarded" and os.getuid() != 0:
        # RLIMIT_NPROC counts every process of the (shared) uid: allow the ones already running
        nproc += sum(1 for p in Path("/proc").iterdir() if p.name.isdigit())
    spec = {
        **{k: getattr(limits, k) for k in ("timeout", "cpu_seconds", "memory_mb", "file_size_mb")},
        **{k: getattr(limits, k) for k in ("disk_mb", "open_files")},
        "nproc": nproc,
        "isolation": isolation,
        "uid": uid,
        "python": python,
    }
    source = (GUARD_PRELUDE + program) if isolation == "guarded" else program
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", str(LAUNCHER), json.dumps(spec)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    out: list[bytes] = []
    err: list[bytes] = []
    readers = [
        threading.Thread(target=_read_capped, args=(proc.stdout, limits.output_bytes, out), daemon=True),
        threading.Thread(target=_read_capped, args=(proc.stderr, limits.output_bytes, err), daemon=True),
    ]
    for t in readers:
        t.start()
    try:
        proc.stdin.write(source.encode())
        proc.stdin.close()
    except BrokenPipeError:
        pass
    try:
        code = proc.wait(timeout=limits.timeout + 10)  # the launcher kills at timeout itself
    except subprocess.TimeoutExpired:  # launcher stuck: kill its whole session
        os.killpg(proc.pid, 9)
        code = proc.wait()
    for t in readers:
        t.join(timeout=5)
    return SandboxResult(
        returncode=code,
        stdout=b"".join(out).decode(errors="replace"),
        stderr=b"".join(err).decode(errors="replace"),
        timed_out=code == 124,
        wall_s=round(time.monotonic() - started, 3),
        isolation=isolation,
    )


@functools.cache
def _resolve(isolation: str, python: str | None) -> tuple[str, str]:
    """(isolation, interpreter) that work on this machine, found by running a trivial program."""
    if isolation not in ISOLATIONS:
        raise ConfigError(f"sandbox.isolation='{isolation}' is not allowed; use {', '.join(ISOLATIONS)}")
    modes = ["namespaces", "guarded"] if isolation == "auto" else [isolation]
    if python:
        pythons = [python]
    else:  # the sandbox uid may not reach this interpreter (e.g. a venv under /tmp or /root)
        pythons = [
            os.path.realpath(sys.executable),
            shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin"),
        ]
    probe = Limits(20, 10, 1024, 16, 1, 16, 64, 4096, isolation, python)
    tried = []
    for mode in modes:
        if mode == "namespaces" and os.getuid() != 0:
            tried.append("namespaces (needs root)")
            continue
        for py in dict.fromkeys(p for p in pythons if p):
            result = _launch("print('ok')", probe, mode, py)
            if result.passed and result.stdout.strip() == "ok":
                return mode, py
            tried.append(
                f"{mode} with {py}: {(result.stderr.strip().splitlines() or ['exit ' + str(result.returncode)])[-1]}"
            )
    raise ConfigError(f"no working sandbox (sandbox.isolation={isolation}); tried: {'; '.join(tried)}")


def isolation_in_use(limits: Limits) -> str:
    return _resolve(limits.isolation, limits.python)[0]


def run(program: str, limits: Limits) -> SandboxResult:
    """Run one Python program in the sandbox."""
    isolation, python = _resolve(limits.isolation, limits.python)
    return _launch(program, limits, isolation, python)


def run_many(programs: list[str], limits: Limits, workers: int) -> list[SandboxResult]:
    """Run programs in parallel (``workers`` at a time), results in order."""
    _resolve(limits.isolation, limits.python)  # probe once, not once per worker
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda p: run(p, limits), programs))
