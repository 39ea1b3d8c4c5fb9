"""The sandbox contains hostile programs: each is a failed sample, and the machine stays healthy.

docs/sandbox.md has the same matrix with the limit that catches each case.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading

import pytest

from selfimprove.scoring import sandbox
from selfimprove.scoring.sandbox import Limits
from tests.conftest import compose_cfg

LIMITS = sandbox.limits_from(compose_cfg(["dataset=humaneval"]).dataset.sandbox)
FAST = Limits(**{**LIMITS.__dict__, "timeout": 3, "cpu_seconds": 2, "memory_mb": 512})
ISOLATION = sandbox.isolation_in_use(FAST)
needs_namespaces = pytest.mark.skipif(ISOLATION != "namespaces", reason="needs root and unshare(2)")


def sandbox_uid_processes() -> int:
    """Processes still running under a sandbox uid that this test process handed out (sandbox.py
    derives them from the caller's pid), so that sandboxes of other xdist workers do not count."""
    ours = {sandbox.UID_BASE + (os.getpid() * 4096 + k) % sandbox.UID_SPAN for k in range(4096)}
    out = subprocess.run(["ps", "-e", "-o", "uid="], capture_output=True, text=True).stdout.split()
    return sum(int(u) in ours for u in out)


def test_a_good_program_passes_and_prints():
    result = sandbox.run("print(sum(range(10)))", FAST)
    assert result.passed and result.stdout.strip() == "45"


@pytest.mark.parametrize(
    ("case", "program"),
    [
        ("infinite loop", "while True:\n    pass"),
        ("sleeps forever", "import time\ntime.sleep(1000)"),
        ("huge allocation", "x = bytearray(50 * 1024**3)"),
        ("raises", "raise SystemExit(3)"),
        ("endless output", "while True:\n    print('x' * 1000)"),
        ("writes a 1 GB file", "open('big', 'wb').write(b'0' * 1024**3)"),
    ],
)
def test_hostile_program_is_a_failed_sample(case, program):
    result = sandbox.run(program, FAST)
    assert not result.passed, case
    assert len(result.stdout) <= FAST.output_bytes and len(result.stderr) <= FAST.output_bytes
    assert sandbox.run("print('still fine')", FAST).passed  # the runner keeps going


def test_fork_bomb_is_capped_by_nproc_and_leaves_nothing_behind():
    # counts how many children it manages to start, then becomes a real fork bomb
    program = (
        "import os, sys, time\n"
        "started = 0\n"
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
    result = sandbox.run(program, FAST)
    # killed by the CPU-time limit or the wall clock, whichever comes first on a busy or idle machine
    assert not result.passed and (result.timed_out or result.returncode != 0)
    assert int(result.stdout.split()[0]) < FAST.nproc  # RLIMIT_NPROC held (the sandbox uid is not root)
    assert sandbox_uid_processes() == 0  # every process it spawned is gone
    assert sandbox.run("print(1)", FAST).passed


def test_setsid_child_cannot_outlive_the_program():
    program = "import os, time\nif os.fork() == 0:\n    os.setsid(); time.sleep(60)\nprint('left a child')"
    result = sandbox.run(program, FAST)
    assert result.passed  # the program itself finished...
    assert sandbox_uid_processes() == 0  # ...and its escaped child died with its PID namespace


def test_no_network_even_to_localhost():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    program = (
        f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')"
    )
    try:
        result = sandbox.run(program, FAST)
    finally:
        server.close()
    assert not result.passed and "connected" not in result.stdout
    assert not accepted
    assert ("unreachable" in result.stderr) or ("disabled" in result.stderr), result.stderr


def test_cannot_touch_files_outside_its_directory(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2")
    secret.chmod(0o600)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    for program in (
        f"print(open({str(secret)!r}).read())",
        f"import os\nos.remove({str(victim)!r})",
        f"open({str(tmp_path / 'planted.txt')!r}, 'w').write('x')",
        "open('/etc/selfimprove-planted', 'w').write('x')",
        "import shutil\nshutil.rmtree('/work', ignore_errors=False)",
    ):
        result = sandbox.run(program, FAST)
        assert not result.passed, program
        assert "hunter2" not in result.stdout
    assert victim.read_text() == "keep me"
    assert not (tmp_path / "planted.txt").exists() and not os.path.exists("/etc/selfimprove-planted")


@needs_namespaces
def test_private_tmp_and_pid_namespace():
    result = sandbox.run(
        "import os\nprint(sorted(os.listdir('/tmp')), os.getpid(), os.getuid() != 0, os.getcwd())", FAST
    )
    assert result.passed
    listing, pid, unprivileged, cwd = result.stdout.rsplit(" ", 3)
    assert (
        listing == "['sandbox']" and pid == "1" and unprivileged == "True" and cwd.strip() == "/tmp/sandbox"
    )


def test_guarded_mode_still_kills_and_blocks_sockets():
    guarded = Limits(**{**FAST.__dict__, "isolation": "guarded"})
    assert sandbox.run("print('ok')", guarded).passed
    assert (
        sandbox.run("while True: pass", guarded).timed_out
        or not sandbox.run("while True: pass", guarded).passed
    )
    result = sandbox.run("import socket\nsocket.create_connection(('127.0.0.1', 9))", guarded)
    assert not result.passed and "disabled" in result.stderr


def test_bad_sandbox_config_is_a_one_line_error():
    from selfimprove.registry import ConfigError

    with pytest.raises(ConfigError, match="isolation='docker'"):
        sandbox.limits_from({**LIMITS.__dict__, "isolation": "docker"})
    with pytest.raises(ConfigError, match="unknown sandbox key 'gpus'"):
        sandbox.limits_from({**LIMITS.__dict__, "gpus": 1})
