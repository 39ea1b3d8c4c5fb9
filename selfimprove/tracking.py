"""Experiment tracking: metrics.jsonl always; wandb when ``logger=wandb`` (offline works without network)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


class Tracker:
    """Forwards each iteration's metrics line to wandb. One wandb run per run directory; its id is
    derived from the directory so that a resumed run continues the same wandb run."""

    def __init__(self, cfg: DictConfig, root: Path, group: str | None = None):
        self.run = None
        if cfg.logger.kind != "wandb":
            return
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        run_id = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
        self.run = wandb.init(
            project=cfg.logger.project,
            entity=cfg.logger.entity,
            mode=str(cfg.logger.mode.value if hasattr(cfg.logger.mode, "value") else cfg.logger.mode),
            id=run_id,
            resume="allow",
            name=root.name,
            group=group,
            dir=str(root),
            config=OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        )

    def log(self, row: dict) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=row["iteration"])

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
