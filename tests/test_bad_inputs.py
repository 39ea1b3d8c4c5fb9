"""Bad input, refused or reported in one line: a table of cases, each asserting the exit code, a
one-line message naming the value, and a run directory left as it was (nothing created, bytes equal).

Most cases are refused before a run starts, so they call the CLI in-process (``selfimprove run``,
which plans every job before Hydra makes a directory; starting the run itself fails the case). The
runtime cases are real subprocesses: a run as an unprivileged user, a full disk (/dev/full), Ctrl-C
(SIGINT to the process group, as a terminal sends it), also while accelerate's workers train.
``pytest -p no:xdist tests/test_bad_inputs.py`` prints the table (tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from selfimprove import app
from selfimprove.cli import main
from selfimprove.engine.errors import INTERRUPTED, explain
from tests.conftest import BAD_INPUTS_DIR

NOBODY = 65534
#: a run small enough that its first stages come in seconds
SMALL = ["debug=tiny", "dataset.seed_per_level=20", "dataset.test_per_level=4"]


@dataclass
class Case:
    name: str
    args: list[str]  # `selfimprove run` overrides; {data} is the folder of the files made below
    code: int
    says: str  # a part of the message: the value it names


def files(data: Path) -> None:
    """The files the path cases point at."""
    (data / "empty.jsonl").write_text("")
    (data / "blank.jsonl").write_text("\n  \n")
    rows = [{"question": "1+1?", "answer": "#### 2"}] * 2
    good = "".join(json.dumps(r) + "\n" for r in rows)
    (data / "good.jsonl").write_text(good)
    (data / "bad.jsonl").write_text(good + '{"question": "2+2?", "answer": \n' + good)
    (data / "list.jsonl").write_text(good[: good.index("\n") + 1] + "[1, 2]\n")
    (data / "rows.txt").write_text(good)
    (data / "a_file").write_text("not a folder")
    (data / "empty_dir").mkdir()


GSM = ["dataset=gsm8k", "model=tiny_qwen", "dataset.test.path={data}/good.jsonl"]
REFUSED = [
    # keys that no schema knows (Hydra's + adds them): refused, with a did-you-mean
    Case("added top-level key", ["+foo=1"], 2, "unknown setting 'foo'"),
    Case("added misspelt key", ["+seeed=3"], 2, "did you mean 'seed'"),
    Case("force-added method key", ["++method.nonsense=1"], 2, "unknown setting 'method.nonsense'"),
    Case("added train key", ["+method.train.lrr=1"], 2, "did you mean 'method.train.lr'"),
    Case("added model key", ["+model.hidden=8"], 2, "did you mean 'model.hidden_size'"),
    Case("added dataset key", ["+dataset.test_per_levels=4"], 2, "did you mean 'dataset.test_per_level'"),
    Case("added hardware key", ["+hardware.threads=2"], 2, "did you mean 'hardware.num_threads'"),
    Case("added generator key", ["+generator.batchsize=4"], 2, "did you mean 'generator.batch_size'"),
    Case(
        "added sampling key",
        ["++method.sampling.temperatur=1"],
        2,
        "did you mean 'method.sampling.temperature'",
    ),
    Case("unknown key without +", ["seeed=3"], 2, "seeed"),
    Case("unknown nested key without +", ["method.nonsense=1"], 2, "nonsense"),
    # numbers out of range
    Case("negative iterations", ["method.iterations=-1"], 2, "method.iterations=-1"),
    Case("generation batch 0", ["generator.batch_size=0"], 2, "generator.batch_size=0"),
    Case("threads 0", ["hardware.num_threads=0"], 2, "hardware.num_threads=0"),
    Case("negative threads", ["hardware.num_threads=-2"], 2, "hardware.num_threads=-2"),
    Case("negative temperature", ["method.sampling.temperature=-0.5"], 2, "method.sampling.temperature=-0.5"),
    Case("negative lr", ["method.train.lr=-1e-5"], 2, "method.train.lr=-1e-05"),
    Case("lr 0", ["method.train.lr=0"], 2, "method.train.lr=0"),
    Case("warm-start lr 0", ["method.warmstart.lr=0"], 2, "method.warmstart.lr=0"),
    Case("model's sft lr negative", ["model.optim.lr.sft=-1"], 2, "model.optim.lr.sft=-1"),
    Case("train batch 0", ["method.train.batch_size=0"], 2, "method.train.batch_size=0"),
    Case("warm-start batch 0", ["method.warmstart.batch_size=0"], 2, "method.warmstart.batch_size=0"),
    Case("micro-batch 0", ["method.train.micro_batch_size=0"], 2, "method.train.micro_batch_size=0"),
    Case("model's micro-batch 0", ["model.optim.micro_batch_size=0"], 2, "model.optim.micro_batch_size=0"),
    Case("train steps 0", ["method.train.steps=0"], 2, "method.train.steps=0"),
    Case("negative warm-start steps", ["method.warmstart.steps=-1"], 2, "method.warmstart.steps=-1"),
    Case("test set of 0 per level", ["dataset.test_per_level=0"], 2, "dataset.test_per_level=0"),
    Case("negative seed data", ["dataset.seed_per_level=-1"], 2, "dataset.seed_per_level=-1"),
    Case("negative prompts", ["dataset.train_per_iteration=-5"], 2, "dataset.train_per_iteration=-5"),
    Case("0 samples per prompt", ["method.sampling.n=0"], 2, "method.sampling.n=0"),
    Case("0 new tokens", ["method.sampling.max_tokens=0"], 2, "method.sampling.max_tokens=0"),
    Case("top_p 0", ["method.sampling.top_p=0"], 2, "method.sampling.top_p=0"),
    Case("top_p above 1", ["method.sampling.top_p=1.5"], 2, "method.sampling.top_p=1.5"),
    Case("eval n 0", ["eval.n=0"], 2, "eval.n=0"),
    Case("eval k holds 0", ["eval.k=[1,0]"], 2, "eval.k=[1, 0]"),
    Case("negative eval temperature", ["eval.temperature=-1"], 2, "eval.temperature=-1"),
    Case("0 kept per prompt", ["method.max_per_prompt=0"], 2, "method.max_per_prompt=0"),
    Case("fraction above 1", ["method.warmstart_hint_fraction=1.5"], 2, "method.warmstart_hint_fraction=1.5"),
    Case("0 processes", ["hardware.num_processes=0"], 2, "hardware.num_processes=0"),
    Case(
        "carried optimizer over 2 processes",
        ["method.train.carry_optimizer=true", "hardware.accelerate=ddp", "hardware.num_processes=2"],
        2,
        "iter_01/train: train.carry_optimizer=true keeps one process's full-model AdamW state in supervised "
        "fine-tuning, and it trains in several processes",
    ),
    Case(
        "carried optimizer in DPO",
        ["method=spin", "method.train.carry_optimizer=true"],
        2,
        "train.carry_optimizer=true keeps one process's full-model AdamW state in supervised fine-tuning, "
        "and its trainer (dpo) does not carry optimizer state",
    ),
    Case("checkpoint every -5 steps", ["hardware.checkpoint_steps=-5"], 2, "hardware.checkpoint_steps=-5"),
    Case("0-digit test level", ["dataset.test_levels=[0,2]"], 2, "dataset.test_levels=[0, 2]"),
    Case(
        "vLLM memory share above 1", ["hardware.gpu_memory_utilization=1.5"], 2, "gpu_memory_utilization=1.5"
    ),
    Case("report scale 0", ["report.scale=0"], 2, "report.scale=0"),
    Case("GRPO 0 rollouts", ["method=grpo", "method.rl.num_generations=0"], 2, "method.rl.num_generations=0"),
    Case(
        "GRPO negative temperature",
        ["method=grpo", "method.rl.temperature=-1"],
        2,
        "method.rl.temperature=-1",
    ),
    Case("SPIN negative beta", ["method=spin", "method.train.beta=-0.1"], 2, "method.train.beta=-0.1"),
    Case("SPC negative rounds", ["method=spc", "method.rounds=-1"], 2, "method.rounds=-1"),
    Case("HumanEval 0 workers", ["dataset=humaneval", "dataset.workers=0"], 2, "dataset.workers=0"),
    Case(
        "sandbox timeout 0",
        ["dataset=humaneval", "dataset.sandbox.timeout=0"],
        2,
        "dataset.sandbox.timeout=0",
    ),
    Case("gym test set 0", ["dataset=countdown", "dataset.test_size=0"], 2, "dataset.test_size=0"),
    # the model's and the dataset's sources
    Case("hub model without a path", ["model=hub"], 2, "model.name_or_path"),
    Case("model folder missing", ["model=hub", "model.name_or_path=/nonexistent/model"], 2, "no such folder"),
    Case("model path is a file", ["model=hub", "model.name_or_path={data}/a_file"], 2, "no config.json"),
    Case("model folder empty", ["model=hub", "model.name_or_path={data}/empty_dir"], 2, "no config.json"),
    Case(
        "model name neither",
        ["model=hub", "model.name_or_path=org/a..b"],
        2,
        "neither a local folder nor a hub id",
    ),
    Case("dataset file missing", [*GSM, "dataset.train.path=/nonexistent/train.jsonl"], 2, "no such file"),
    Case("dataset file empty", [*GSM, "dataset.train.path={data}/empty.jsonl"], 2, "empty.jsonl is empty"),
    Case(
        "dataset file blank lines", [*GSM, "dataset.train.path={data}/blank.jsonl"], 2, "blank.jsonl is empty"
    ),
    Case("malformed JSONL row", [*GSM, "dataset.train.path={data}/bad.jsonl"], 2, "bad.jsonl, line 3"),
    Case("JSONL row not an object", [*GSM, "dataset.train.path={data}/list.jsonl"], 2, "list.jsonl, line 2"),
    Case("dataset file of unknown kind", [*GSM, "dataset.train.path={data}/rows.txt"], 2, "suffix '.txt'"),
    # where the run would be written
    Case("run_dir is a file", ["run_dir={data}/a_file"], 2, "a_file is a file"),
    Case("run_dir under a file", ["run_dir={data}/a_file/run"], 2, "a_file is a file"),
    Case("out_root under a file", ["out_root={data}/a_file/outputs"], 2, "a_file is a file"),
    Case("store_dir is a file", ["store_dir={data}/a_file"], 2, "store_dir: "),
    # what composition and planning refused before
    Case("unknown dataset", ["dataset=nope"], 2, "unknown dataset option 'nope'"),
    Case("wrong type", ["method.iterations=two"], 2, "method.iterations"),
    Case("bad enum value", ["hardware.device=tpu"], 2, "tpu"),
    Case("stop_after names no stage", ["stop_after=nonsense"], 2, "stop_after='nonsense'"),
    Case("unknown flag", ["-x"], 2, "unknown flag -x"),
]

ROWS: list[dict] = []


def record(name: str, code: int, message: str) -> None:
    """One row of the printed table (tests/conftest.py prints every row after the run)."""
    BAD_INPUTS_DIR.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "_" for c in name)
    (BAD_INPUTS_DIR / f"{slug}.json").write_text(json.dumps({"case": name, "code": code, "message": message}))


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under root with its bytes (None for folders): what "untouched" compares."""
    return {
        str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes())
        for p in sorted(root.rglob("*"))
        if not p.is_symlink()
    }


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n{stderr}"
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    files(folder)
    return folder


@pytest.mark.parametrize("case", REFUSED, ids=[c.name for c in REFUSED])
def test_refused_before_anything_is_written(case, data, tmp_path, monkeypatch, capsys):
    """`selfimprove run` refuses in one line, exit 2: in the working folder (where outputs/ would
    go) and in the data folder nothing is created or changed."""
    monkeypatch.chdir(tmp_path)

    def started(*_):
        raise AssertionError("the run started: the bad input was not refused")

    monkeypatch.setattr(app, "hydra_main", started)
    before, data_before = tree(tmp_path), tree(data)
    code = main(["run", *[a.format(data=data) for a in case.args]])
    line = one_line(capsys.readouterr().err)
    record(case.name, code, line)
    assert code == case.code, line
    assert line.startswith("error: ") and case.says in line, line
    assert tree(tmp_path) == before and tree(data) == data_before


def test_plan_refuses_in_one_line_too(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["plan", "method.iterations=-1"])
    out = capsys.readouterr().out
    record("plan: negative iterations", code, out.strip())
    assert code == 2 and one_line(out).startswith("refused: method.iterations=-1 is out of range")
    assert not list(tmp_path.iterdir())


def test_zero_iterations_plans_the_warm_start_and_its_evaluation_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["plan", "method.iterations=0"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "method.iterations=0: only the warm start runs and the starting model (M0) is evaluated" in out
    assert "warmstart/eval" in out and "iter_01" not in out


# -- runtime failures: the library's exceptions, said in one line ------------------------------------
def real_os_error(make) -> OSError:
    try:
        make()
    except OSError as err:
        return err
    raise AssertionError("no OSError")


def write_to_dev_full():
    with open("/dev/full", "w") as f:
        f.write("x" * 10)


@pytest.mark.parametrize(
    "name, make, says",
    [
        ("disk full (ENOSPC)", lambda _: write_to_dev_full(), "disk full writing"),
        ("file in the way (ENOTDIR)", lambda d: open(d / "a_file" / "x", "w"), "a file is in the way at"),
        ("file in the way (EEXIST)", lambda d: os.mkdir(d / "a_file"), "a file is in the way at"),
        ("folder in the way (EISDIR)", lambda d: open(d / "empty_dir", "w"), "a file is in the way at"),
    ],
)
def test_os_errors_name_the_path_and_the_fix(name, make, says, data):
    line = explain(real_os_error(lambda: make(data)), where=data)
    record(f"runtime: {name}", 1, f"error: <stage>: {line}")
    assert says in line and "\n" not in line
    assert ("free space and run the same command to resume" in line) == ("ENOSPC" in name)
    assert str(data) in line


def selfimprove_proc(args: list[str], cwd: Path, user: int | None = None) -> subprocess.Popen:
    """`selfimprove run *args` in a subprocess of its own process group, as ``user`` when given
    (setpriv gives up root only at exec, so the interpreter under /root can still be found)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "HOME": str(cwd)}
    as_user = [] if user is None else ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
    return subprocess.Popen(
        [*as_user, sys.executable, "-m", "selfimprove.cli", "run", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def world_writable(path: Path) -> Path:
    """A folder the unprivileged user can write, and reach (pytest's temporary folders are 0700)."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o777)
    for parent in path.parents:  # up to the temporary root: pytest-of-<user> is 0700 too
        if parent == Path(tempfile.gettempdir()) or parent == Path("/"):
            break
        if parent.stat().st_mode & 0o011 != 0o011:
            parent.chmod(parent.stat().st_mode | 0o011)
    return path


AS_NOBODY = os.geteuid() == 0 and shutil.which("setpriv") is not None
needs_root = pytest.mark.skipif(not AS_NOBODY, reason="runs a command as another user (root and setpriv)")
LONG_WARM_START = [*SMALL, "method.warmstart.steps=2000", "store=false"]
DDP = ["hardware.accelerate=ddp", "hardware.num_processes=2", "hardware.num_threads=1"]


def read_only_run_dir(base: Path) -> tuple[list[str], Path, int | None]:
    """A run directory its user cannot write (an unprivileged user; root writes anywhere)."""
    work = world_writable(base / "work")
    (work / "run").mkdir()
    (work / "run" / "config.yaml").write_text("seed: 0\n")
    return [f"run_dir={work / 'run'}"], work, NOBODY


def out_root_in_read_only_folder(base: Path):
    (base / "locked").mkdir(mode=0o755)
    return [f"out_root={base / 'locked'}/outputs"], world_writable(base / "work"), NOBODY


def read_only_file_in_the_run(base: Path):
    """At run time: the run's event log belongs to another user (read-only for this one)."""
    run = world_writable(base / "run")
    (run / "events.jsonl").write_text("")
    return [*SMALL, f"run_dir={run}", "store=false"], run, NOBODY


def full_disk(base: Path):
    """At run time, the disk fills: the run's event log is /dev/full, which answers writes with ENOSPC."""
    (base / "run").mkdir()
    (base / "run" / "events.jsonl").symlink_to("/dev/full")
    return [*SMALL, f"run_dir={base / 'run'}", "store=false"], base, None


def interrupted(base: Path):
    return [*LONG_WARM_START, "run_dir=run"], base, None


def interrupted_under_accelerate(base: Path):
    return [*LONG_WARM_START, *DDP, "run_dir=run"], base, None


RUNTIME = {
    "read-only run_dir": read_only_run_dir,
    "out_root in a read-only folder": out_root_in_read_only_folder,
    "read-only file in the run": read_only_file_in_the_run,
    "disk full": full_disk,
    "Ctrl-C while training": interrupted,
    "Ctrl-C while accelerate's workers train": interrupted_under_accelerate,
}


@dataclass
class Started:
    proc: subprocess.Popen
    base: Path
    cwd: Path

    def result(self, name: str, strict: bool = True) -> tuple[int, str | list[str]]:
        """Exit status and the one line on stderr; not ``strict``: every line (a multi-process
        stage's workers print the DDP constructor's warnings while they train)."""
        _, err = self.proc.communicate(timeout=300)
        lines = [line for line in err.splitlines() if line.strip()]
        record(name, self.proc.returncode, lines[-1] if lines else "")
        return self.proc.returncode, (one_line(err) if strict else lines)


@pytest.fixture(scope="module", autouse=True)
def started(tmp_path_factory) -> dict[str, Started]:
    """Every subprocess case, started at once when the module starts: they run (mostly importing
    torch) while the in-process cases do."""
    runs = {}
    for name, setup in RUNTIME.items():
        base = tmp_path_factory.mktemp("runtime")
        args, cwd, user = setup(base)
        if user is None or AS_NOBODY:
            runs[name] = Started(selfimprove_proc(args, cwd, user), base, cwd)
    yield runs
    for run in runs.values():
        if run.proc.poll() is None:
            os.killpg(run.proc.pid, signal.SIGKILL)
            run.proc.wait()


@needs_root
def test_a_read_only_run_directory_is_refused_before_the_run(started):
    run = started["read-only run_dir"]
    before = tree(run.cwd / "run")
    code, line = run.result("read-only run_dir")
    assert code == 2 and f"run_dir: {run.cwd / 'run'} is not writable" in line
    assert tree(run.cwd / "run") == before


@needs_root
def test_an_out_root_that_cannot_be_created_is_refused(started):
    run = started["out_root in a read-only folder"]
    code, line = run.result("out_root in a read-only folder")
    locked = run.base / "locked"
    assert code == 2 and f"cannot create {locked}/outputs" in line and "not writable" in line
    assert not list(locked.iterdir())


@needs_root
def test_a_file_the_run_cannot_write_is_one_line_with_the_path(started):
    run = started["read-only file in the run"]
    code, line = run.result("read-only file in the run")
    assert code == 1 and f"cannot write {run.cwd}/events.jsonl (permission denied)" in line
    assert "run the same command to resume" in line


def test_a_full_disk_is_one_line_with_the_path_free_space_and_resume(started):
    run = started["disk full"]
    code, line = run.result("disk full")
    assert code == 1 and f"disk full writing {run.base / 'run'}" in line
    assert " free there); free space and run the same command to resume" in line


def interrupt_when_training(run: Started, name: str, strict: bool = True):
    """SIGINT to the run's process group (what Ctrl-C in a terminal sends) once it trains."""
    deadline = time.time() + 240
    while not list(run.cwd.glob("run/warmstart/train.partial/*")) and time.time() < deadline:
        assert run.proc.poll() is None, run.proc.communicate()
        time.sleep(0.1)
    time.sleep(3)  # into the trainer's start
    os.killpg(run.proc.pid, signal.SIGINT)
    return run.result(name, strict)


def test_ctrl_c_is_one_line_and_exit_130(started):
    run = started["Ctrl-C while training"]
    code, line = interrupt_when_training(run, "Ctrl-C while training")
    assert code == 130 and line == INTERRUPTED
    assert not (run.cwd / "run" / "warmstart" / "train").exists(), "no half-trained stage is taken as done"


def test_ctrl_c_reaches_accelerates_launcher_and_workers_quietly(started):
    """Training in two processes under `accelerate launch`: the launcher and its workers get the
    SIGINT too, and none of them prints a traceback or its shutdown."""
    run = started["Ctrl-C while accelerate's workers train"]
    code, lines = interrupt_when_training(run, "Ctrl-C while accelerate's workers train", strict=False)
    assert code == 130 and lines[-1] == INTERRUPTED
    said = [line for line in lines if any(w in line for w in ("Traceback", "Interrupt", "signal", "Error"))]
    assert not said, "\n".join(lines)
    assert not processes_in(run.cwd), "the launcher and its workers are gone"


def processes_in(folder: Path) -> list[str]:
    """Processes working in ``folder`` (the run's children inherit its working folder)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if os.readlink(proc / "cwd") == str(folder):
                found.append(proc.name)
        except OSError:  # gone, or not ours to read
            continue
    return found


def test_the_cases_cover_every_kind_of_setting():
    """At least 60 table-driven cases, with distinct names."""
    assert len({c.name for c in REFUSED}) == len(REFUSED) >= 60
