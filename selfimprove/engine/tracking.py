"""Experiment tracking: metrics.jsonl always; wandb when ``logger=wandb`` (offline works without network).

Into the run's wandb run go each iteration's metrics line (x-axis ``iteration``), ``report``'s table
of the finished run as a wandb Table (``report``) and, for every train
stage, its per-step curves from the stage's ``log_history.json`` under the stage's name as prefix
(``warmstart/train/loss``, ``iter_01/train/grad_norm``, ``iter_02/train/reward``...), each stage on
its own x-axis ``<stage>/step``, so that curves of different stages never collide.

Why from the finished stage's file and not from a callback inside the trainer: a train stage may run
in ``accelerate launch`` processes (training/launch.py), where a second writer into the parent's
wandb run is not supported; the file is the same whichever way the stage ran, and a stage killed and
resumed from its checkpoint still yields one whole curve. The price: a stage's curves appear when it
finishes, not while it trains (its progress bar shows the loss meanwhile).

``wandb_run.json`` in the run directory keeps the wandb run's id and what was logged: a resumed run
continues the same wandb run (``resume="allow"``), logs each stage and iteration once, and numbers
its rows after the last one logged, so no step is duplicated.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import struct
from collections.abc import Iterator
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from selfimprove.engine.pipeline import Artifact, write_json_atomic

STATE = "wandb_run.json"
HISTORY = "log_history.json"  # written by every train stage (training/sft.save_trained)
SUMMARY_KEYS = ("train_runtime", "train_loss")  # the trainer's closing entry: a summary, not a step


def numbers(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class Tracker:
    """Forwards iteration metrics and train stages' curves to one wandb run per run directory."""

    def __init__(self, cfg: DictConfig, root: Path, group: str | None = None):
        self.run = None
        if cfg.logger.kind != "wandb":
            return
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.state_file = root / STATE
        self.state = self.load_state(root)
        self.run = wandb.init(
            project=cfg.logger.project,
            entity=cfg.logger.entity,
            mode=str(cfg.logger.mode.value if hasattr(cfg.logger.mode, "value") else cfg.logger.mode),
            id=self.state["id"],
            resume="allow",
            name=root.name,
            group=group,
            dir=str(root),
            config=OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        )
        self.state["step"] = max(self.state["step"], self.run.step)  # online: the server's next step
        self.run.define_metric("iteration")
        write_json_atomic(self.state_file, self.state)

    def load_state(self, root: Path) -> dict:
        """What an earlier attempt of this run logged; a new run gets a new id (a run directory made
        before this file existed keeps the id it had: a hash of its path)."""
        if self.state_file.exists():
            return json.loads(self.state_file.read_text())
        older = (root / "wandb").is_dir()
        run_id = (
            hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12] if older else secrets.token_hex(6)
        )
        return {"id": run_id, "step": 0, "iterations": [], "stages": []}

    def log(self, row: dict) -> None:
        """One iteration's metrics line, against ``iteration``; once per iteration."""
        if self.run is None or row["iteration"] in self.state["iterations"]:
            return
        values = numbers(row)
        for key in values:
            if key != "iteration":
                self.run.define_metric(key, step_metric="iteration")
        self.emit(values)
        self.state["iterations"].append(row["iteration"])
        write_json_atomic(self.state_file, self.state)

    def log_stage(self, artifact: Artifact) -> None:
        """A train stage's per-step curves (loss, learning_rate, grad_norm, and what its trainer
        logs: DPO's rewards/margins, GRPO's reward, kl, entropy...), once per stage."""
        history = artifact.file(HISTORY)
        if self.run is None or artifact.name in self.state["stages"] or not history.exists():
            return
        prefix = f"{artifact.name}/"
        self.run.define_metric(f"{prefix}step")
        self.run.define_metric(f"{prefix}*", step_metric=f"{prefix}step")
        for entry in json.loads(history.read_text()):
            values = {prefix + k: v for k, v in numbers(entry).items()}
            if any(k in entry for k in SUMMARY_KEYS):
                self.run.summary.update(values)
            elif "step" in entry:
                self.emit(values)
        self.state["stages"].append(artifact.name)
        write_json_atomic(self.state_file, self.state)

    def log_report(self, root: Path) -> None:
        """``selfimprove report``'s table of this run as a wandb Table (key ``report``), once per set of
        finished iterations (a rerun that computed nothing logs nothing)."""
        if self.run is None or self.state.get("report") == self.state["iterations"]:
            return
        import wandb

        from selfimprove.engine.report import table_data

        header, data = table_data(root)
        self.emit({"report": wandb.Table(columns=header, data=data)})
        self.state["report"] = list(self.state["iterations"])
        write_json_atomic(self.state_file, self.state)

    def emit(self, values: dict) -> None:
        """One wandb row, numbered after every row this run has logged (across resumed attempts)."""
        self.run.log(values, step=self.state["step"])
        self.state["step"] += 1

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


# ------------------------------------------------------------------------------------------------
# Reading an offline run back (wandb has no public reader of its .wandb files).


def offline_records(run_dir: Path) -> Iterator:
    """Every record (``wandb_internal_pb2.Record``) of the offline wandb runs in ``run_dir``, in the
    order the attempts ran. A .wandb file is a LevelDB-style log: 32 KiB blocks of (crc, length,
    type) chunks after a 7-byte header; a killed attempt may leave its file short or empty."""
    from wandb.proto import wandb_internal_pb2 as pb

    for path in sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, buf = path.read_bytes(), 7, b""
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            if kind == 0:
                break
            chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
            buf = chunk if kind in (1, 2) else buf + chunk  # 1 whole, 2 first, 3 middle, 4 last
            if kind in (1, 4):
                record = pb.Record()
                record.ParseFromString(buf)
                yield record


def offline_history(run_dir: Path) -> list[dict]:
    """The rows logged into the offline wandb runs of ``run_dir`` ({key: value}, with ``_step``)."""
    rows = []
    for record in offline_records(run_dir):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {
                    "/".join(item.nested_key) if item.nested_key else item.key: json.loads(item.value_json)
                    for item in record.history.item
                }
            )
    return rows
