"""Name -> implementation registries with lazy imports.

Heavy backends (vLLM, TRL trainers) are registered as ``"module:attr"`` strings and imported only
when chosen, so ``--help`` and config errors stay instant. An unknown name is a one-line error
that lists what is available (and the closest match).
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from typing import Any


class ConfigError(ValueError):
    """A user-facing configuration error; the CLI prints its message as one line and exits 2."""


def unknown_choice(kind: str, name: str, allowed: list[str]) -> ConfigError:
    """The standard one-line error for a bad name: the value, a suggestion, the allowed names."""
    close = difflib.get_close_matches(str(name), allowed, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown {kind} '{name}'{hint}; available: {', '.join(sorted(allowed))}")


class Registry:
    """A mapping from a name to a ``"module:attr"`` path, resolved on first use."""

    def __init__(self, kind: str, entries: dict[str, str]):
        self.kind = kind
        self._entries = dict(entries)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._entries:
            raise unknown_choice(self.kind, name, self.names())
        module, _, attr = self._entries[name].partition(":")
        return getattr(importlib.import_module(module), attr)
