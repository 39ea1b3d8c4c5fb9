"""Run untrusted (model-generated) Python programs, one subprocess each, contained.

    results = run_many(programs, limits_from(cfg.dataset.sandbox), workers=4)  # [SandboxResult, ...]
    results[0].passed        # the harness saw the program run to its end (and it exited 0)

Every program runs through the trusted launcher (``_launcher.py``) under its harness: a program
passes only if the harness confirms, with a per-run secret token the program never sees, that the
program's last line returned -- an exit with status 0 is not a pass. With
``isolation=namespaces`` (root with unshare(2), the default where available) a program gets: the
whole host read-only, with a fresh size-capped tmpfs over every world-writable directory (found
once per process by ``writable_dirs``); no network (a network namespace with no interface up) and
no sockets at all (a seccomp filter on socket(2)); its own PID namespace (everything it spawned
dies with it); an unprivileged uid of its own; one memory cap over all its processes (a memory
cgroup, where this machine lets us make one; else RLIMIT_AS per process, said once in the log);
and rlimits on CPU time, address space, file size, processes and open files. The launcher kills it
after ``timeout`` wall-clock seconds; the output kept from stdout/stderr is capped.
``isolation=guarded`` (no root or no namespaces) keeps the rlimits, the cgroup and uid drop when
root, the seccomp filter and the session kill -- a guard, not a sandbox; ``auto`` picks namespaces
when they work. docs/sandbox.md has the hostile-case matrix.

Model-generated code must never run outside this module.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from selfimprove.engine.registry import ConfigError

LAUNCHER = Path(__file__).with_name("_launcher.py")
ISOLATIONS = ("auto", "namespaces", "guarded")
# sandbox uids: a fresh one per program (so fork-bomb counts and kills never mix across programs)
UID_BASE, UID_SPAN = 200_000, 1_000_000
_uids = itertools.count()

# file systems with no directories a program could write to (or none we could cover with a tmpfs)
PSEUDO_FS = {"proc", "sysfs", "cgroup", "cgroup2", "devpts", "mqueue", "debugfs", "tracefs"}
PSEUDO_FS |= {"securityfs", "pstore", "bpf", "configfs", "fusectl", "binfmt_misc", "autofs", "nsfs"}
log = logging.getLogger(__name__)


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
    confirmed: bool  # the harness saw the program's last line return (the run's token came back)

    @property
    def passed(self) -> bool:
        return self.returncode == 0 and not self.timed_out and self.confirmed

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def limits_from(cfg: dict | None) -> Limits:
    """Limits from a config node; an unknown key or isolation is a one-line error."""
    from selfimprove.engine.pipeline import plain

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


def _mounts() -> list[tuple[str, str, str]]:
    """(mount point, file system type, options) of this process's mounts."""
    with open("/proc/self/mounts") as f:
        rows = [line.split()[1:4] for line in f]
    return [(mp.encode().decode("unicode_escape"), fs, opts) for mp, fs, opts in rows]


@functools.cache
def writable_dirs() -> tuple[str, ...]:
    """Every world-writable directory of the host (``find MOUNTS -xdev -perm -0002 -type d``, the
    topmost of each subtree), each of which gets a fresh tmpfs in the sandbox. The whole host is
    read-only there anyway, so one made after this scan is simply not writable."""
    roots = sorted({mp for mp, fs, _ in _mounts() if fs not in PSEUDO_FS and os.path.isdir(mp)})
    found = subprocess.run(
        ["find", *roots, "-xdev", "-perm", "-0002", "-type", "d", "-print", "-prune"],
        capture_output=True,
        text=True,
    ).stdout.split("\n")
    dirs = sorted({d for d in found if d and not os.path.islink(d)})
    return tuple(d for d in dirs if not any(d.startswith(p.rstrip("/") + "/") for p in dirs if p != d))


@functools.cache
def memory_cgroup_parent() -> str | None:
    """The folder under which a program's memory cgroup is made: this process's own memory cgroup
    (cgroup v1 ``memory`` or v2 with the memory controller), if we may make a child there. None
    (and one line in the log) where we may not: memory_mb is then a per-process cap."""
    own = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            own[controllers] = path
    for mp, fs, opts in _mounts():
        v1 = fs == "cgroup" and "memory" in opts.split(",")
        v2 = fs == "cgroup2" and "memory" in _read(os.path.join(mp, "cgroup.controllers")).split()
        path = next((p for c, p in own.items() if "memory" in c.split(",")), None) if v1 else own.get("")
        if (v1 or v2) and path is not None:
            parent = os.path.join(mp, path.lstrip("/"))
            try:  # a trial child: made, capped and removed
                probe = f"selfimprove-probe-{os.getpid()}-{threading.get_ident()}"
                _remove_cgroup(_make_cgroup(parent, probe, 64))
                return parent
            except OSError:
                continue
    log.warning(
        "sandbox: no memory cgroup may be made here; memory_mb caps each process, not the program's total"
    )
    return None


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _make_cgroup(parent: str, name: str, memory_mb: int) -> str:
    """A child memory cgroup capped at ``memory_mb`` (RAM, and RAM + swap where counted)."""
    path = os.path.join(parent, name)
    os.mkdir(path)
    limit = str(memory_mb * 1024 * 1024)
    caps = [("memory.limit_in_bytes", limit), ("memory.memsw.limit_in_bytes", limit)]  # cgroup v1
    caps += [("memory.max", limit), ("memory.swap.max", "0")]  # cgroup v2
    try:
        for name, value in caps:
            if os.path.exists(os.path.join(path, name)):
                with open(os.path.join(path, name), "w") as f:
                    f.write(value)
        if not any(os.path.exists(os.path.join(path, n)) for n in ("memory.limit_in_bytes", "memory.max")):
            raise OSError(f"{path} has no memory limit file")
    except OSError:
        _remove_cgroup(path)
        raise
    return path


def _remove_cgroup(path: str | None) -> None:
    """rmdir once its last process is gone (the kernel may take a moment to let go)."""
    for _ in range(100):
        try:
            if path:
                os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.02)
    log.warning("sandbox: could not remove the memory cgroup %s", path)


def _launch(program: str, limits: Limits, isolation: str, python: str) -> SandboxResult:
    uid = UID_BASE + (os.getpid() * 4096 + next(_uids)) % UID_SPAN
    nproc = limits.nproc
    if isolation == "guarded" and os.getuid() != 0:
        # RLIMIT_NPROC counts every process of the (shared) uid: allow the ones already running
        nproc += sum(1 for p in Path("/proc").iterdir() if p.name.isdigit())
    parent = memory_cgroup_parent()
    cgroup = _make_cgroup(parent, f"selfimprove-sandbox-{uid}", limits.memory_mb) if parent else None
    spec = {
        **{k: getattr(limits, k) for k in ("timeout", "cpu_seconds", "memory_mb", "file_size_mb")},
        **{k: getattr(limits, k) for k in ("disk_mb", "open_files")},
        "nproc": nproc,
        "isolation": isolation,
        "uid": uid,
        "python": python,
        "writable": writable_dirs() if isolation == "namespaces" else [],
        "cgroup": cgroup,
    }
    token = secrets.token_hex(16)
    started = time.monotonic()
    try:
        code, out, err, confirmation = _run_launcher(spec, f"{token}\n{program}", limits)
    finally:
        _remove_cgroup(cgroup)
    return SandboxResult(
        returncode=code,
        stdout=out.decode(errors="replace"),
        stderr=err.decode(errors="replace"),
        timed_out=code == 124,
        wall_s=round(time.monotonic() - started, 3),
        isolation=isolation,
        confirmed=secrets.compare_digest(confirmation, token.encode()),
    )


def _run_launcher(spec: dict, stdin: str, limits: Limits) -> tuple[int, bytes, bytes, bytes]:
    """Run the launcher to its end: (exit code, stdout and stderr kept, what it reported back)."""
    report_r, report_w = os.pipe()
    with os.fdopen(report_r, "rb") as report:
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", str(LAUNCHER), json.dumps({**spec, "report_fd": report_w})],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                pass_fds=(report_w,),
            )
        finally:
            os.close(report_w)
        out: list[bytes] = []
        err: list[bytes] = []
        readers = [
            threading.Thread(target=_read_capped, args=(proc.stdout, limits.output_bytes, out), daemon=True),
            threading.Thread(target=_read_capped, args=(proc.stderr, limits.output_bytes, err), daemon=True),
        ]
        for t in readers:
            t.start()
        try:
            proc.stdin.write(stdin.encode())
            proc.stdin.close()
        except BrokenPipeError:
            pass
        try:
            code = proc.wait(timeout=limits.timeout + 10)  # the launcher kills at timeout itself
        except subprocess.TimeoutExpired:  # launcher stuck: kill its whole session
            os.killpg(proc.pid, 9)
            code = proc.wait()
        confirmation = report.read(256)
    for t in readers:
        t.join(timeout=5)
    return code, b"".join(out), b"".join(err), confirmation


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
