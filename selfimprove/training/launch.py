"""Multi-process training through ``accelerate launch`` (DDP, FSDP or DeepSpeed ZeRO-3).

``hardware.accelerate`` names an accelerate config file: a name from
``selfimprove/training/accelerate/`` (ddp, fsdp, deepspeed_zero3) or a path to your own. A train stage then runs its body in the processes
that ``accelerate launch`` starts (torchrun underneath: one process per GPU, the process group set
up by accelerate) instead of in the pipeline's process, which only waits. Rank 0 writes the
stage's files; the stage's contract (``.partial`` folder, ``_DONE.json``) is unchanged.

Why a subprocess: a process group cannot be created after the fact inside the pipeline process,
and accelerate's launcher is what users already configure for their clusters.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from selfimprove.engine.registry import ConfigError, unknown_choice

ACCELERATE_CONFIGS = Path(__file__).resolve().parent / "accelerate"
LAUNCHED = "SELFIMPROVE_LAUNCHED"  # set in the launched processes, so a stage does not launch again


def accelerate_config(name: str) -> Path:
    """The accelerate config file for ``hardware.accelerate``: a file of training/accelerate/ by name,
    or an existing path."""
    shipped = {p.stem: p for p in ACCELERATE_CONFIGS.glob("*.yaml")}
    if name in shipped:
        return shipped[name]
    path = Path(name).expanduser()
    if path.suffix in (".yaml", ".yml", ".json") and path.is_file():
        return path.resolve()
    raise unknown_choice("hardware.accelerate config", name, [*shipped, "PATH to an accelerate config file"])


def check(hardware: dict) -> None:
    """Fail at start (not at the first train stage) on bad training settings in ``hardware``."""
    every = hardware.get("checkpoint_steps")
    if every is not None and every < 0:
        raise ConfigError(f"hardware.checkpoint_steps={every} must be >= 1 (or 0/null for no checkpoints)")
    name = hardware.get("accelerate")
    if name:
        accelerate_config(name)
        if hardware.get("num_processes") is not None and hardware["num_processes"] < 1:
            raise ConfigError(f"hardware.num_processes={hardware['num_processes']} must be >= 1 (or null)")


def sharding(name: str | None) -> str:
    """How the accelerate config ``name`` (hardware.accelerate) trains: "fsdp" or "zero3" shard
    weights, gradients and optimizer state over its processes; "none" (DDP, or no accelerate) does not."""
    if not name:
        return "none"
    text = accelerate_config(name).read_text()
    return "fsdp" if "distributed_type: FSDP" in text else "zero3" if "zero_stage: 3" in text else "none"


def processes(hardware: dict) -> int:
    """How many processes a train stage runs in: hardware.num_processes, else the accelerate
    config's, else 1 (no accelerate)."""
    if not hardware.get("accelerate"):
        return 1
    if hardware.get("num_processes"):
        return int(hardware["num_processes"])
    import yaml

    return int(yaml.safe_load(accelerate_config(hardware["accelerate"]).read_text()).get("num_processes", 1))


def batch_split(train: dict, hardware: dict) -> tuple[int, int]:
    """(sequences per device and forward pass, gradient accumulation steps) that make up
    ``train.batch_size`` sequences per optimizer step over all processes, with at most
    ``train.micro_batch_size`` per pass; a batch that does not split evenly is a one-line error."""
    batch, micro, procs = train["batch_size"], train["micro_batch_size"], processes(hardware)
    if batch < 1 or micro < 1 or batch % procs:
        raise ConfigError(
            f"batch_size={batch} must be a positive multiple of the {procs} training processes "
            f"(and micro_batch_size={micro} >= 1)"
        )
    per_device = batch // procs
    micro = min(micro, per_device)
    while per_device % micro:  # the largest micro-batch that divides the per-device batch
        micro -= 1
    return micro, per_device // micro


def multi_process(hardware: dict) -> bool:
    """True when a train stage should hand its body to ``accelerate launch``."""
    return bool(hardware.get("accelerate")) and not launched()


def launched() -> bool:
    return os.environ.get(LAUNCHED) == "1"


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def accelerated(body: Callable) -> Callable:
    """Decorator for a train stage's body (``body(out, **inputs)``): with ``hardware.accelerate``
    set, the body runs in the processes ``accelerate launch`` starts, else here. Keeps the body's
    name, so that the launched processes import it by that name."""

    @functools.wraps(body)
    def stage_body(out: Path, **inputs: Any) -> dict:
        if not launched():  # the run's process: its generation models give their memory back
            from selfimprove.generation import release_for_training

            release_for_training()
        if multi_process(inputs["hardware"]):
            return in_processes(stage_body, out, **inputs)
        return body(out, **inputs)

    return stage_body


def in_processes(fn, out: Path, **kwargs: Any) -> dict:
    """Run the stage body ``fn(out, **kwargs)`` under ``accelerate launch`` and return rank 0's
    result. Output (the trainer's progress lines) streams through; a failure raises with the
    launcher's exit status."""
    hardware = kwargs["hardware"]
    job, result = out / "launch_job.pkl", out / "launch_result.json"
    with open(job, "wb") as f:
        pickle.dump({"fn": f"{fn.__module__}:{fn.__qualname__}", "out": out, "kwargs": kwargs}, f)
    command = [sys.executable, "-m", "selfimprove.launched", "accelerate"]
    command += ["--config_file", str(accelerate_config(hardware["accelerate"]))]
    if hardware.get("num_processes"):
        command += ["--num_processes", str(hardware["num_processes"])]
    if one_machine(hardware["accelerate"]):
        command += ["--main_process_port", str(free_port())]
    command += ["-m", "selfimprove.launched", str(job)]
    threads = str(hardware.get("num_threads") or os.environ.get("OMP_NUM_THREADS") or 1)
    env = {**os.environ, LAUNCHED: "1", "OMP_NUM_THREADS": threads}
    code = subprocess.run(command, env=env).returncode
    if code != 0:
        raise RuntimeError(f"accelerate launch ({hardware['accelerate']}) exited with status {code}")
    counts = json.loads(result.read_text())
    job.unlink()
    result.unlink()
    return counts


def one_machine(name: str) -> bool:
    """Whether the accelerate config runs on a single machine (a port of our own choosing is then
    safe: no other machine has to know it)."""
    import yaml

    return int(yaml.safe_load(accelerate_config(name).read_text()).get("num_machines", 1)) == 1


def free_port() -> int:
    """A TCP port nothing listens on now: two runs (or two tests) launching at once on one machine
    would otherwise both take torch's default 29500, and the second fails to start."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    """In each launched process (selfimprove/launched.py): run the pickled stage body; rank 0
    writes its result. The libraries' progress bars are off here too, as in the pipeline process."""
    from selfimprove.app import quiet_libraries

    quiet_libraries()
    with open(sys.argv[1], "rb") as f:
        job = pickle.load(f)
    module, _, name = job["fn"].partition(":")
    counts = getattr(importlib.import_module(module), name)(job["out"], **job["kwargs"])
    if is_main_process():
        (Path(job["out"]) / "launch_result.json").write_text(json.dumps(counts))
