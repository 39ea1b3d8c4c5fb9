"""The sandbox contains hostile programs: each is a failed sample (or harmless), and the host is untouched.

Each case of CASES is one test; the last test prints the containment matrix (program -> contained?
-> how), the one docs/sandbox.md shows.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from selfimprove.scoring import sandbox
from selfimprove.scoring.sandbox import Limits, SandboxResult
from tests.conftest import compose_cfg

LIMITS = sandbox.limits_from(compose_cfg(["dataset=humaneval"]).dataset.sandbox)
FAST = Limits(**{**LIMITS.__dict__, "timeout": 3, "cpu_seconds": 2, "memory_mb": 512})
GUARDED = Limits(**{**FAST.__dict__, "isolation": "guarded"})
ISOLATION = sandbox.isolation_in_use(FAST)
needs_namespaces = pytest.mark.skipif(ISOLATION != "namespaces", reason="needs root and unshare(2)")
MATRIX: dict[str, tuple[bool, str]] = {}  # case -> (contained, how), filled by test_hostile_program


def sandbox_uid_processes() -> int:
    """Processes still running under a sandbox uid that this test process handed out (sandbox.py
    derives them from the caller's pid), so that sandboxes of other xdist workers do not count."""
    ours = {sandbox.UID_BASE + (os.getpid() * 4096 + k) % sandbox.UID_SPAN for k in range(4096)}
    out = subprocess.run(["ps", "-e", "-o", "uid="], capture_output=True, text=True).stdout.split()
    return sum(int(u) in ours for u in out)


def failed_with(result: SandboxResult, *needles: str) -> bool:
    """A failed sample whose stderr names one of ``needles``."""
    return not result.passed and any(n in result.stderr for n in needles)


class Host:
    """What a hostile program aims at: host files, a world-writable folder made after the sandbox
    scanned for them, a 0666 file, a 0600 secret, and TCP / unix / abstract-unix servers."""

    def __init__(self, root: Path):
        self.root = root
        for folder in [root, *root.parents]:  # let the sandbox uid reach it, as on a shared host
            if folder == Path("/"):
                break
            folder.chmod(folder.stat().st_mode | stat.S_IXOTH | stat.S_IROTH)
        self.open_dir = root / f"world_writable_{os.urandom(4).hex()}"  # never a stale scanned one
        self.open_dir.mkdir()
        self.open_dir.chmod(0o1777)
        self.open_file = root / "open.txt"
        self.open_file.write_text("keep me")
        self.open_file.chmod(0o666)
        self.secret = root / "secret.txt"
        self.secret.write_text("hunter2")
        self.secret.chmod(0o600)
        self.accepted: list[str] = []
        self.servers = {
            "tcp": self._serve(socket.AF_INET, ("127.0.0.1", 0)),
            "unix": self._serve(socket.AF_UNIX, str(root / "host.sock")),
            "abstract": self._serve(socket.AF_UNIX, f"\0selfimprove-test-{os.getpid()}-{id(self)}"),
        }
        (root / "host.sock").chmod(0o777)

    def _serve(self, family: int, address) -> socket.socket:
        server = socket.socket(family)
        server.bind(address)
        server.listen(4)
        threading.Thread(target=self._accept, args=(server, family), daemon=True).start()
        return server

    def _accept(self, server: socket.socket, family: int) -> None:
        try:
            while True:
                server.accept()
                self.accepted.append(str(family))
        except OSError:
            return

    def address(self, kind: str):
        return self.servers[kind].getsockname()

    def close(self) -> None:
        for server in self.servers.values():
            server.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
            server.close()
        self.open_dir.chmod(0o755)  # leave no world-writable folder for later scans


@pytest.fixture
def host():
    """A host folder outside every world-writable one: pytest's tmp_path lies under /tmp, which each
    sandbox covers with its own tmpfs, so a program there would find nothing rather than meet the
    read-only host (and the permission checks) these cases are about."""
    root = Path(tempfile.mkdtemp(prefix=".sandbox-host-", dir=Path(__file__).resolve().parent))
    h = Host(root)
    yield h
    h.close()
    shutil.rmtree(root, ignore_errors=True)


def _fill(path: str, tag: str) -> str:
    """A program that writes 8 MB files into ``path`` until it may not, and prints the MB written."""
    return (
        "import os\nwritten = 0\n"
        "try:\n"
        "    for i in range(1000):\n"
        f"        with open(os.path.join({path!r}, f'{tag}-{{i}}'), 'wb') as f:\n"
        "            f.write(b'0' * 8 * 1024 * 1024)\n"
        "        written += 8\n"
        "except OSError as e:\n"
        "    print(written, type(e).__name__, e.errno, flush=True)\n"
        "    raise\n"
    )


# -- the cases: each runs hostile programs and returns (contained, how) -------------------------------
CASES: dict[str, Callable[[Host], tuple[bool, str]]] = {}


def case(name: str):
    def register(fn):
        CASES[name] = fn
        return fn

    return register


@case("infinite loop")
def _(host):
    r = sandbox.run("while True:\n    pass", FAST)
    return not r.passed, f"RLIMIT_CPU / wall-clock kill (exit {r.returncode}, {r.wall_s:.1f} s)"


@case("sleeps forever")
def _(host):
    r = sandbox.run("import time\ntime.sleep(1000)", FAST)
    return r.timed_out and not r.passed, f"wall-clock timeout: PID 1 killed at {FAST.timeout} s"


@case("fork bomb")
def _(host):
    program = (
        "import os, time\nstarted = 0\n"
        "for _ in range(200):\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(30); os._exit(0)\n"
        "        started += 1\n"
        "    except OSError:\n"
        "        break\n"
        "print(started, flush=True)\n"
        "while True:\n"
        "    try: os.fork()\n"
        "    except OSError: pass\n"
    )
    r = sandbox.run(program, FAST)
    started, left = int(r.stdout.split()[0]), sandbox_uid_processes()
    ok = not r.passed and started < FAST.nproc and left == 0
    return ok, f"RLIMIT_NPROC on its own uid ({started} children), PID namespace killed all ({left} left)"


@case("child escapes with setsid")
def _(host):
    r = sandbox.run("import os, time\nif os.fork() == 0:\n    os.setsid(); time.sleep(60)\nprint('ok')", FAST)
    left = sandbox_uid_processes()
    return r.passed and left == 0, f"PID namespace: the child died with PID 1 ({left} left)"


@case("one huge allocation")
def _(host):
    r = sandbox.run("x = bytearray(50 * 1024**3)", FAST)
    return failed_with(r, "MemoryError"), f"RLIMIT_AS {FAST.memory_mb} MB: MemoryError"


@case("memory across 5 child processes")
def _(host):
    program = (
        "import os, time\nkids = []\n"
        "for i in range(5):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        x = bytearray(200 * 1024 * 1024)\n"
        "        for j in range(0, len(x), 4096): x[j] = 1\n"
        "        time.sleep(1); os._exit(0)\n"
        "    kids.append(pid)\n"
        "held = sum(os.waitstatus_to_exitcode(os.waitpid(k, 0)[1]) == 0 for k in kids)\n"
        "print(held, flush=True)\n"
        "assert held == 5\n"
    )
    r = sandbox.run(program, Limits(**{**FAST.__dict__, "timeout": 20, "cpu_seconds": 10}))
    held = int(r.stdout.split()[0]) if r.stdout.strip() else 0
    how = (
        f"memory cgroup of {FAST.memory_mb} MB over all its processes: {held}/5 children held 200 MB"
        if sandbox.memory_cgroup_parent()
        else f"per process only (no cgroup here): {held}/5 children held 200 MB"
    )
    return held * 200 <= FAST.memory_mb and not r.passed, how


@case("endless output")
def _(host):
    r = sandbox.run("while True:\n    print('x' * 1000)", FAST)
    ok = not r.passed and len(r.stdout) <= FAST.output_bytes
    return ok, f"first {FAST.output_bytes} bytes kept, the rest drained; timeout"


@case("1 GB file in its folder")
def _(host):
    r = sandbox.run(
        "with open('big', 'wb') as f:\n    for _ in range(1024):\n        f.write(b'0' * 1024**2)", FAST
    )
    return failed_with(r, "File too large"), f"RLIMIT_FSIZE {FAST.file_size_mb} MB: EFBIG"


@case("fill the disk via every world-writable path")
def _(host):
    tag = f"selfimprove-fill-{os.getpid()}"
    written = {}
    for path in filter(os.path.isdir, sandbox.writable_dirs()):
        r = sandbox.run(_fill(path, tag), Limits(**{**FAST.__dict__, "timeout": 10}))
        on_host = sorted(Path(path).glob(f"{tag}-*"))
        written[path] = int(r.stdout.split()[0]) if not r.passed and not on_host else None
    ok = all(mb is not None and mb <= FAST.disk_mb for mb in written.values())
    reached = {p: mb for p, mb in written.items() if mb}  # 0 MB: a folder it may not even enter
    each = ", ".join(f"{p} {mb} MB" for p, mb in reached.items())
    each += f"; {len(written) - len(reached)} more out of its reach" if len(reached) < len(written) else ""
    return ok, f"a fresh tmpfs of {FAST.disk_mb} MB on each, then ENOSPC ({each}); 0 bytes on the host"


@case("world-writable host folder made after the scan")
def _(host):
    r = sandbox.run(f"open({str(host.open_dir / 'x')!r}, 'w').write('x')", FAST)
    ok = failed_with(r, "Read-only file system") and not (host.open_dir / "x").exists()
    return ok, "the whole host is mounted read-only: EROFS"


@case("overwrite a 0666 host file")
def _(host):
    r = sandbox.run(f"open({str(host.open_file)!r}, 'w').write('pwned')", FAST)
    ok = failed_with(r, "Read-only file system") and host.open_file.read_text() == "keep me"
    return ok, "read-only host: EROFS, file unchanged"


@case("write /etc, delete /work")
def _(host):
    results = [
        sandbox.run("open('/etc/selfimprove-planted', 'w').write('x')", FAST),
        sandbox.run("import shutil\nshutil.rmtree('/work')", FAST),
        sandbox.run(f"import os\nos.remove({str(host.open_file)!r})", FAST),
    ]
    intact = not os.path.exists("/etc/selfimprove-planted") and host.open_file.exists()
    return all(not r.passed for r in results) and intact, "read-only host (EROFS) and an unprivileged uid"


@case("read a 0600 host secret")
def _(host):
    r = sandbox.run(f"print(open({str(host.secret)!r}).read())", FAST)
    return failed_with(r, "Permission denied") and "hunter2" not in r.stdout, "unprivileged uid: EACCES"


@case("leave files for the next sample")
def _(host):
    paths = [*sandbox.writable_dirs(), "."]  # some may be out of the sandbox uid's reach: skipped
    plant = (
        f"planted = []\nfor p in {paths!r}:\n"
        "    try: open(p + '/left-behind', 'w').write('x'); planted.append(p)\n"
        "    except OSError: pass\nprint(planted)"
    )
    planted = sandbox.run(plant, FAST).stdout.strip()
    look = f"import os\nprint([p for p in {planted} if os.path.exists(p + '/left-behind')])"
    seen = sandbox.run(look, FAST).stdout.strip()
    ok = "'/tmp'" in planted and "'.'" in planted and seen == "[]"
    return (
        ok,
        f"fresh tmpfs per program over every writable path: planted in {planted}, the next one saw {seen}",
    )


@case("TCP to a host server on 127.0.0.1")
def _(host):
    r = sandbox.run(f"import socket\nsocket.create_connection({host.address('tcp')!r}, timeout=2)", FAST)
    return failed_with(
        r, "Permission denied"
    ) and not host.accepted, "seccomp: socket(2) -> EACCES (and no netns interface)"


@case("host unix socket (0777)")
def _(host):
    program = f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({host.address('unix')!r})"
    r = sandbox.run(program, FAST)
    return failed_with(r, "Permission denied") and not host.accepted, "seccomp: socket(AF_UNIX) -> EACCES"


@case("host abstract unix socket")
def _(host):
    program = f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({host.address('abstract')!r})"
    r = sandbox.run(program, FAST)
    return failed_with(r, "Permission denied") and not host.accepted, "seccomp: socket(AF_UNIX) -> EACCES"


@case("raw _socket")
def _(host):
    r = sandbox.run("import _socket\n_socket.socket()", FAST)
    return failed_with(r, "Permission denied"), "seccomp on the system call, not a Python patch"


@case("socket(2) through ctypes")
def _(host):
    program = "import ctypes\nfd = ctypes.CDLL(None).socket(2, 1, 0)\nprint(fd)\nassert fd >= 0"
    r = sandbox.run(program, FAST)
    return not r.passed and r.stdout.strip() == "-1", "seccomp: the system call returns -1"


@case("raw _socket in guarded mode")
def _(host):
    results = [
        sandbox.run("import _socket\n_socket.socket()", GUARDED),
        sandbox.run(f"import socket\nsocket.create_connection({host.address('tcp')!r})", GUARDED),
    ]
    ok = all(failed_with(r, "Permission denied") for r in results) and not host.accepted
    return ok, "the same seccomp filter (guarded has no network namespace)"


@case("user namespace, then remount the host read-write")
def _(host):
    program = (
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "assert libc.unshare(0x10000000 | 0x00020000) == 0\n"  # CLONE_NEWUSER | CLONE_NEWNS
        "print(libc.mount(None, b'/', None, 32 | 4096, None))\n"  # MS_REMOUNT | MS_BIND, not RDONLY
        f"open({str(host.open_dir / 'userns')!r}, 'w')\n"
    )
    r = sandbox.run(program, FAST)
    ok = failed_with(r, "Read-only file system") and not (host.open_dir / "userns").exists()
    return ok, "read-only flag is locked for a new user namespace: remount EPERM, write EROFS"


@case("see and kill host processes")
def _(host):
    program = "import os\ntry: os.kill(-1, 9)\nexcept ProcessLookupError: pass\nprint([p for p in os.listdir('/proc') if p.isdigit()], os.getpid())"
    r = sandbox.run(program, FAST)
    return (
        r.stdout.strip() == "['1'] 1",
        "PID namespace: it sees only itself (PID 1); kill(-1) reaches no one",
    )


@case("exit 0 before the tests run")
def _(host):
    tricks = ["import sys\nsys.exit(0)", "exit(0)", "raise SystemExit(0)", "import os\nos._exit(0)"]
    tricks.append("import atexit, os\natexit.register(os._exit, 0)\nassert False")
    results = [sandbox.run(t + "\nprint('tests passed')", FAST) for t in tricks]
    ok = all(r.returncode == 0 and not r.passed for r in results)
    return ok, "exit 0 is not a pass: the harness's token never came back"


@case("forge the harness's confirmation")
def _(host):
    r = sandbox.run("import os\nos.write(4, b'0' * 32)\nos._exit(0)", FAST)
    return r.returncode == 0 and not r.passed, "fd 4 carried something, not the run's secret token"


@case("look for the token (argv, env, /proc/self, files, fds)")
def _(host, token="f00dfeedf00dfeedf00dfeedf00dfeed"):
    program = (
        "import os, sys\nseen = [' '.join(sys.argv), repr(os.environ)]\n"
        "for p in ['/proc/self/cmdline', '/proc/self/environ', 'harness.py', 'program.py']:\n"
        "    seen.append(open(p, 'rb').read().decode(errors='replace'))\n"
        "for fd in range(64):\n"
        "    try: seen.append(os.read(fd, 4096).decode(errors='replace'))\n"
        "    except OSError: pass\n"
        "print('\\n'.join(seen))\n"
    )
    real = sandbox.secrets.token_hex
    sandbox.secrets.token_hex = lambda n: token
    try:
        r = sandbox.run(program, FAST)
    finally:
        sandbox.secrets.token_hex = real
    return (
        r.passed and "harness.py" in r.stdout and token not in r.stdout,
        "fd 3 is read and closed before its first line",
    )


# what guarded isolation (no root or no namespaces) contains as well
ANY_ISOLATION = {"infinite loop", "sleeps forever", "one huge allocation", "endless output"}
ANY_ISOLATION |= {
    "1 GB file in its folder",
    "raw _socket",
    "socket(2) through ctypes",
    "raw _socket in guarded mode",
}
ANY_ISOLATION |= {"exit 0 before the tests run", "forge the harness's confirmation"}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_program(name, host):
    if ISOLATION != "namespaces" and name not in ANY_ISOLATION:
        pytest.skip(f"{name}: needs namespaces isolation (root and unshare(2))")
    if name == "memory across 5 child processes" and not sandbox.memory_cgroup_parent():
        pytest.skip("no memory cgroup may be made here: memory_mb caps each process only")
    contained, how = CASES[name](host)
    MATRIX[name] = (contained, how)
    assert contained, f"{name}: {how}"
    assert sandbox.run("print('still fine')", FAST).passed  # the runner keeps going


def test_containment_matrix_is_printed(capsys):
    """Runs last in this module: the matrix of every case above (all of them when the module ran)."""
    if len(MATRIX) < len(CASES):
        pytest.skip("run the whole module to print the containment matrix")
    with capsys.disabled():
        print(f"\nContainment matrix ({ISOLATION}, {len(MATRIX)} hostile programs)")
        print("| program | contained? | how |\n|---|---|---|")
        for name, (contained, how) in MATRIX.items():
            print(f"| {name} | {'yes' if contained else 'NO'} | {how} |")
    assert all(contained for contained, _ in MATRIX.values())


def test_a_good_program_passes_and_prints():
    result = sandbox.run("print(sum(range(10)))", FAST)
    assert result.passed and result.confirmed and result.stdout.strip() == "45"


@needs_namespaces
def test_private_tmp_read_only_host_and_pid_namespace():
    result = sandbox.run(
        "import os\nprint(sorted(os.listdir('/tmp')), os.getpid(), os.getuid() != 0, os.getcwd())", FAST
    )
    assert result.passed
    listing, pid, unprivileged, cwd = result.stdout.rsplit(" ", 3)
    assert (
        listing == "['sandbox']" and pid == "1" and unprivileged == "True" and cwd.strip() == "/tmp/sandbox"
    )
    mounts = sandbox.run("print(open('/proc/self/mounts').read())", FAST).stdout.splitlines()
    writable = {line.split()[1] for line in mounts if line and line.split()[3].startswith("rw")}
    scanned = set(filter(os.path.isdir, sandbox.writable_dirs()))
    assert writable - {"/proc", "/dev/shm", "/dev/pts"} == scanned - {"/dev/shm"}


def test_world_writable_dirs_are_found_by_scanning():
    found = list(filter(os.path.isdir, sandbox.writable_dirs()))  # some may be gone since the scan
    assert "/tmp" in found and all(os.stat(d).st_mode & stat.S_IWOTH for d in found)


def test_guarded_mode_still_kills():
    assert sandbox.run("print('ok')", GUARDED).passed
    result = sandbox.run("while True: pass", GUARDED)
    assert not result.passed


def test_bad_sandbox_config_is_a_one_line_error():
    from selfimprove.engine.registry import ConfigError

    with pytest.raises(ConfigError, match="isolation='docker'"):
        sandbox.limits_from({**LIMITS.__dict__, "isolation": "docker"})
    with pytest.raises(ConfigError, match="unknown sandbox key 'gpus'"):
        sandbox.limits_from({**LIMITS.__dict__, "gpus": 1})
