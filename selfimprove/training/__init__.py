"""Training stages: thin adapters over TRL trainers (imported lazily: TRL costs ~5 s to import)."""

from __future__ import annotations

from selfimprove.training.sft import sft

__all__ = ["sft"]
