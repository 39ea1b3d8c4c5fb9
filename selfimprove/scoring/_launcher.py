"""The trusted half of the sandbox: one process per program, started by sandbox.py as
``python -I -S _launcher.py SPEC_JSON`` with a per-run secret token (one line) and then the program
on stdin, and a report pipe (``spec["report_fd"]``) on which it writes what the harness confirmed.
Standard library only and single-threaded, because it forks and drops privileges by hand.

Every program runs under HARNESS: the harness reads the token from fd 3 and closes it before the
program's first line, execs the program (program.py, which holds no token), and only when that exec
returns writes the token to fd 4. A program that exits -- sys.exit, exit(), SystemExit, os._exit,
at exit or at the top level -- never returns there, so it is never confirmed, whatever its status.

With isolation ``namespaces`` (root only) it:
  1. joins the program's memory cgroup (``spec["cgroup"]``, made by sandbox.py), so that one cap
     covers every process the program starts;
  2. unshares mount, network, PID, IPC and UTS namespaces (no interface up: nothing is reachable);
  3. makes every mount private and read-only, then mounts a fresh size-capped tmpfs over each
     world-writable directory (``spec["writable"]``, found by sandbox.py at start): nothing the
     program writes reaches the host, and nothing is left for the next program;
  4. forks the program as PID 1 of the new PID namespace (everything it spawned dies with it);
  5. in the child: mounts a /proc of the new namespace, sets the rlimits, drops to an unprivileged
     uid with no_new_privs, installs a seccomp filter that refuses socket(2) (every family: no
     unix sockets to host servers, no raw ``_socket``), io_uring and pidfd_getfd, and execs Python.
With isolation ``guarded`` (no root / no namespaces) it sets the rlimits, the cgroup when it can,
the seccomp filter, drops privileges if it can, and kills the program's session on timeout.

The launcher enforces the wall-clock timeout itself (SIGKILL to the program's PID 1 or session)
and exits with the program's status; 124 means timed out, 128+N killed by signal N.
"""

import ctypes
import fcntl
import json
import os
import platform
import resource
import signal
import struct
import sys
import time

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND = 32, 1024, 2048, 4096
MS_REC, MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 16384, 1 << 18, 1 << 21, 1 << 24
KEPT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME}
KEPT_FLAGS |= {"nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME}
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 1, 38, 22, 2
WORKDIR = "/tmp/sandbox"
TOKEN_FD, CONFIRM_FD = 3, 4

# Runs first, as the program's interpreter's main script. The token lives only in this function's
# frame; the program is compiled from its own file, which does not hold it.
HARNESS = """\
import os, sys
def _harness():
    token = os.read(3, 256)
    os.close(3)
    with open("program.py", "rb") as f:
        code = compile(f.read(), "program.py", "exec")
    exec(code, {"__name__": "__main__", "__file__": "program.py", "__builtins__": __builtins__})
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(4, token)
_harness()
"""

# seccomp: (audit arch, socket, io_uring_setup, pidfd_getfd) per machine
SECCOMP_ARCH = {"x86_64": (0xC000003E, 41, 425, 438), "aarch64": (0xC00000B7, 198, 425, 438)}

libc = ctypes.CDLL(None, use_errno=True)


def check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    check(libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def mount_points() -> list[tuple[str, int]]:
    """(mount point, flags to keep) of every mount in this namespace, from /proc/self/mountinfo."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            target = fields[4].encode().decode("unicode_escape")  # \040 for a space, etc.
            flags = sum(KEPT_FLAGS.get(opt, 0) for opt in fields[5].split(","))
            out.append((target, flags))
    return out


def make_host_read_only() -> None:
    """Every mount of this (private) namespace read-only; a mount that refuses stops the launch."""
    for target, flags in mount_points():
        mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | flags, None)


def set_limits(spec: dict) -> None:
    mb = 1024 * 1024
    limits = {
        resource.RLIMIT_CPU: spec["cpu_seconds"],
        resource.RLIMIT_AS: spec["memory_mb"] * mb,
        resource.RLIMIT_FSIZE: spec["file_size_mb"] * mb,
        resource.RLIMIT_NOFILE: spec["open_files"],
        resource.RLIMIT_CORE: 0,
    }
    if spec["nproc"] is not None:
        limits[resource.RLIMIT_NPROC] = spec["nproc"]
    for what, value in limits.items():
        resource.setrlimit(what, (value, value))


def join_cgroup(cgroup: str | None) -> None:
    """Move this launcher into the program's memory cgroup (its children inherit it)."""
    if cgroup:
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))


def oom_victim_first() -> None:
    """The cgroup's OOM killer takes the program's processes before the launcher (raising one's
    own oom_score_adj needs no privilege)."""
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write("1000")


def drop_privileges(uid: int) -> None:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


def die_with_launcher(parent: int) -> None:
    """Should the launcher die (killed by the OOM killer all the same), the program dies with it;
    set after the uid change, which clears it."""
    check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")
    if os.getppid() != parent:  # the launcher died before we got here
        os._exit(137)


def seccomp_no_sockets() -> None:
    """A seccomp filter: socket(2) fails with EACCES (every family, whatever calls it: socket,
    _socket, ctypes), io_uring and pidfd_getfd too (other ways to a socket); x32 and foreign-arch
    system calls kill the program."""
    machine = platform.machine()
    if machine not in SECCOMP_ARCH:
        raise OSError(f"no seccomp filter for {machine}; the sandbox supports {', '.join(SECCOMP_ARCH)}")
    arch, *denied = SECCOMP_ARCH[machine]
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    allow, deny, kill = 0x7FFF0000, 0x00050000 | 13, 0x80000000  # ERRNO(EACCES), KILL_PROCESS
    n = len(denied)
    prog = [
        (ld, 0, 0, 4),  # arch
        (jeq, 0, n + 4, arch),  # foreign arch -> kill
        (ld, 0, 0, 0),  # syscall number
        (jge, n + 1, 0, 0x40000000),  # x32 -> deny
        *[(jeq, n - i, 0, nr) for i, nr in enumerate(denied)],
        (ret, 0, 0, allow),
        (ret, 0, 0, deny),
        (ret, 0, 0, kill),
    ]
    filters = b"".join(struct.pack("HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(filters)
    fprog = struct.pack("HL", len(prog), ctypes.addressof(buf))  # struct sock_fprog (padded)
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    check(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.c_char_p(fprog), 0, 0), "seccomp")


def exec_program(spec: dict, workdir: str, token_r: int, confirm_w: int) -> None:
    """In the child: token on fd 3, confirmation on fd 4, nothing else open but 0-2; run HARNESS."""
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 16) for fd in (token_r, confirm_w)]
    os.dup2(high[0], TOKEN_FD)
    os.dup2(high[1], CONFIRM_FD)
    os.closerange(CONFIRM_FD + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    os.chdir(workdir)
    seccomp_no_sockets()
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
    os.execve(spec["python"], [spec["python"], "-I", "-B", "harness.py"], env)


def write_files(workdir: str, program: bytes, uid: int | None) -> None:
    os.makedirs(workdir, mode=0o700, exist_ok=True)
    for name, text in (("harness.py", HARNESS.encode()), ("program.py", program)):
        path = os.path.join(workdir, name)
        with open(path, "wb") as f:
            f.write(text)
        if uid is not None:
            os.chown(path, uid, uid)
    if uid is not None:
        os.chown(workdir, uid, uid)


def token_pipes(token: bytes) -> tuple[int, int, int]:
    """(token read end, confirmation read end, confirmation write end)."""
    token_r, token_w = os.pipe()
    os.write(token_w, token)
    os.close(token_w)
    confirm_r, confirm_w = os.pipe()
    return token_r, confirm_r, confirm_w


def start(spec: dict, workdir: str, token: bytes, child_setup) -> tuple[int, int]:
    """Fork the program; returns (pid, confirmation read end)."""
    token_r, confirm_r, confirm_w = token_pipes(token)
    pid = os.fork()
    if pid == 0:
        try:
            child_setup()
            exec_program(spec, workdir, token_r, confirm_w)
        except BaseException as err:  # noqa: BLE001 - report and leave; nothing else may run here
            os.write(2, f"sandbox launcher: {err}\n".encode())
        os._exit(126)
    os.close(token_r)
    os.close(confirm_w)
    return pid, confirm_r


def read_confirmation(confirm_r: int) -> bytes:
    """What the harness wrote on fd 4 (read once every process of the program is gone)."""
    os.set_blocking(confirm_r, False)
    try:
        return os.read(confirm_r, 256)
    except BlockingIOError:
        return b""
    finally:
        os.close(confirm_r)


def wait_with_timeout(pid: int, timeout: float, kill) -> int:
    """Wait for ``pid``; after ``timeout`` seconds call ``kill()``. Returns an exit code."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            if os.WIFSIGNALED(status):
                return 128 + os.WTERMSIG(status)
            return os.WEXITSTATUS(status)
        if time.monotonic() > deadline:
            kill()
            os.waitpid(pid, 0)
            return 124
        time.sleep(0.01)


def kill_uid(uid: int) -> None:
    """Kill every process of the sandbox uid (fork-bomb leftovers in guarded mode)."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setuid(uid)
            os.kill(-1, signal.SIGKILL)  # as that uid: every process it may signal, i.e. its own
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def run_namespaces(spec: dict, program: bytes, token: bytes) -> tuple[int, bytes]:
    join_cgroup(spec["cgroup"])
    check(
        libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS),
        "unshare",
    )
    mount(None, "/", None, MS_REC | MS_PRIVATE, None)
    make_host_read_only()
    size = f"size={spec['disk_mb']}m,mode=1777"
    for target in filter(os.path.isdir, spec["writable"]):  # one removed since the scan stays read-only
        mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, size)
    uid = spec["uid"]
    write_files(WORKDIR, program, uid)

    def child_setup() -> None:  # PID 1 of the new namespace
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
        oom_victim_first()
        set_limits(spec)
        drop_privileges(uid)
        die_with_launcher(0)  # the launcher is outside this PID namespace

    pid, confirm_r = start(spec, WORKDIR, token, child_setup)
    code = wait_with_timeout(pid, spec["timeout"], lambda: os.kill(pid, signal.SIGKILL))
    return code, read_confirmation(confirm_r)


def run_guarded(spec: dict, program: bytes, token: bytes) -> tuple[int, bytes]:
    import shutil
    import tempfile

    join_cgroup(spec["cgroup"])
    uid = spec["uid"] if os.getuid() == 0 else None
    workdir = tempfile.mkdtemp(prefix="selfimprove-sandbox-")
    write_files(workdir, program, uid)

    def child_setup() -> None:
        os.setsid()
        oom_victim_first()
        set_limits(spec)
        if uid is not None:
            drop_privileges(uid)
        die_with_launcher(launcher)

    launcher = os.getpid()
    pid, confirm_r = start(spec, workdir, token, child_setup)

    def kill() -> None:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    code = wait_with_timeout(pid, spec["timeout"], kill)
    kill()
    if uid is not None:
        kill_uid(uid)
    shutil.rmtree(workdir, ignore_errors=True)
    return code, read_confirmation(confirm_r)


def main() -> int:
    spec = json.loads(sys.argv[1])
    token = sys.stdin.buffer.readline().strip()
    program = sys.stdin.buffer.read()
    os.close(0)
    os.open(os.devnull, os.O_RDONLY)  # the program gets an empty stdin
    run_in = run_namespaces if spec["isolation"] == "namespaces" else run_guarded
    code, confirmation = run_in(spec, program, token)
    os.write(spec["report_fd"], confirmation)
    return code


if __name__ == "__main__":
    sys.exit(main())
