"""Done-markers that can be trusted: what a whole ``_DONE.json`` holds, the output files it vouches
for, and the fsyncs that make a marker reach the disk after the files it names.

A marker lists the size of every file of its stage folder (``outputs``). Loading a stage checks that
each listed file is still there, readable and of that size: one ``stat`` per file, so ``status`` and
a resume stay cheap even for model weights. A file cut or grown in place is caught; one overwritten
with other bytes of the same length is not (hashing every weight file on every load would cost more
than recomputing most stages).

Markers written before ``outputs`` existed are accepted when the JSON and JSONL files of their folder
parse, so finished runs are not recomputed for the change.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

DONE = "_DONE.json"
#: what a marker must hold to count, with the type each must have
REQUIRED = {"fingerprint": str, "counts": dict, "finished": (int, float)}


def read_marker(path: Path) -> tuple[dict | None, str]:
    """The marker's record, or None and what is wrong with it."""
    where = f"{path.parent.name}/{path.name}"
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        return None, f"its {where} cannot be read ({err.__class__.__name__})"
    if not text.strip():
        return None, f"its {where} is empty"
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return None, f"its {where} does not parse"
    if not isinstance(record, dict):
        return None, f"its {where} is not an object"
    missing = [key for key, kind in REQUIRED.items() if not isinstance(record.get(key), kind)]
    if missing:
        return None, f"its {where} lacks {', '.join(missing)}"
    return record, ""


def outputs_of(folder: Path) -> dict[str, int]:
    """The size of every file below ``folder`` (the marker excluded), by relative path."""
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != DONE
    }


def damage(folder: Path, record: dict) -> str:
    """What is wrong with the output files a marker vouches for ('' when nothing)."""
    outputs = record.get("outputs")
    if not isinstance(outputs, dict):
        return legacy_damage(folder)
    for relative, size in outputs.items():
        path = folder / relative
        try:
            actual = path.stat().st_size
        except OSError:
            return f"its output {relative} is missing"
        if not os.access(path, os.R_OK):
            return f"its output {relative} cannot be read"
        if actual != size:
            return f"its output {relative} is {actual} bytes, {size} when it was done"
    return ""


def legacy_damage(folder: Path) -> str:
    """For a marker without ``outputs``: every JSON and JSONL file of the folder must parse."""
    for path in sorted(folder.rglob("*.json*")):
        if path.name == DONE or path.suffix not in (".json", ".jsonl"):
            continue
        try:
            text = path.read_text()
            lines = text.splitlines() if path.suffix == ".jsonl" else [text]
            for line in lines:
                if line.strip():
                    json.loads(line)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return f"its output {path.relative_to(folder)} is damaged"
    return ""


def sync_folder(folder: Path) -> None:
    """fsync a folder, so that a rename or a new entry in it survives a machine crash."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(folder: Path) -> None:
    """fsync every file and folder below ``folder`` (a stage's outputs, before its marker)."""
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        elif path.is_dir():
            sync_folder(path)
    sync_folder(folder)
