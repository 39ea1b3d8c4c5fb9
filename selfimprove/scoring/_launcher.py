"""The trusted half of the sandbox: one process per program, started by sandbox.py as
``python -I -S _launcher.py SPEC_JSON`` with the program on stdin. Standard library only and
single-threaded, because it forks and drops privileges by hand.

With isolation ``namespaces`` (root only) it:
  1. unshares mount, network, PID, IPC and UTS namespaces (the network namespace has no
     interface up, so nothing -- not even 127.0.0.1 -- is reachable);
  2. makes every mount private and puts fresh size-capped tmpfs over /tmp, /var/tmp and /dev/shm
     (the program cannot see or write the host's temporary folders; its working directory
     /tmp/sandbox vanishes with the namespace);
  3. forks the program as PID 1 of the new PID namespace, so that when it exits or is killed the
     kernel kills everything it spawned (setsid cannot escape that);
  4. in the child: mounts a /proc of the new namespace, sets the rlimits, drops to an
     unprivileged uid/gid with no supplementary groups and no_new_privs, and execs Python.
With isolation ``guarded`` (no root / no namespaces) it only sets rlimits, drops privileges if it
can, runs the program in its own session and kills that session on timeout.

The launcher enforces the wall-clock timeout itself (SIGKILL to the program's PID 1 or session)
and exits with the program's status; 124 means timed out, 128+N killed by signal N.
"""

import ctypes
import json
import os
import resource
import signal
import sys
import time

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 16384, 1 << 18
PR_SET_NO_NEW_PRIVS = 38
WORKDIR = "/tmp/sandbox"

libc = ctypes.CDLL(None, use_errno=True)


def check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    check(libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


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


def drop_privileges(uid: int) -> None:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)


def exec_program(spec: dict, workdir: str) -> None:
    os.chdir(workdir)
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
    os.execve(spec["python"], [spec["python"], "-I", "-B", "program.py"], env)


def write_program(workdir: str, program: bytes, uid: int | None) -> None:
    os.makedirs(workdir, mode=0o700, exist_ok=True)
    path = os.path.join(workdir, "program.py")
    with open(path, "wb") as f:
        f.write(program)
    if uid is not None:
        os.chown(workdir, uid, uid)
        os.chown(path, uid, uid)


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


def run_namespaces(spec: dict, program: bytes) -> int:
    check(
        libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS),
        "unshare",
    )
    mount("none", "/", None, MS_REC | MS_PRIVATE, None)
    size = f"size={spec['disk_mb']}m,mode=1777"
    for target in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(target):
            mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, size)
    uid = spec["uid"]
    write_program(WORKDIR, program, uid)
    pid = os.fork()
    if pid == 0:  # PID 1 of the new namespace
        try:
            mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
            set_limits(spec)
            drop_privileges(uid)
            exec_program(spec, WORKDIR)
        except BaseException as err:  # noqa: BLE001 - report and leave; nothing else may run here
            os.write(2, f"sandbox launcher: {err}\n".encode())
        os._exit(126)
    return wait_with_timeout(pid, spec["timeout"], lambda: os.kill(pid, signal.SIGKILL))


def run_guarded(spec: dict, program: bytes) -> int:
    import tempfile

    uid = spec["uid"] if os.getuid() == 0 else None
    workdir = tempfile.mkdtemp(prefix="selfimprove-sandbox-")
    write_program(workdir, program, uid)
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            set_limits(spec)
            if uid is not None:
                drop_privileges(uid)
            exec_program(spec, workdir)
        except BaseException as err:  # noqa: BLE001
            os.write(2, f"sandbox launcher: {err}\n".encode())
        os._exit(126)

    def kill() -> None:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    code = wait_with_timeout(pid, spec["timeout"], kill)
    kill()
    if uid is not None:
        kill_uid(uid)
    import shutil

    shutil.rmtree(workdir, ignore_errors=True)
    return code


def main() -> int:
    spec = json.loads(sys.argv[1])
    program = sys.stdin.buffer.read()
    os.close(0)
    os.open(os.devnull, os.O_RDONLY)  # the program gets an empty stdin
    if spec["isolation"] == "namespaces":
        return run_namespaces(spec, program)
    return run_guarded(spec, program)


if __name__ == "__main__":
    sys.exit(main())
