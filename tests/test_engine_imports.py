"""The engine knows nothing about models: importing it, or any module in it, in a fresh interpreter
loads no ML library and nothing of the method library, the backends or the tasks. That keeps
`selfimprove --help`, `status` and `report` instant and the layers apart (docs/architecture.md)."""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import selfimprove.engine

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "trl", "vllm", "datasets", "peft", "accelerate")
# the layers above the engine: it may be imported by them, never import them
ABOVE = ("methods", "stages", "generation", "training", "scoring", "tasks", "models", "app", "cli")
ENGINE = sorted(m.name for m in pkgutil.iter_modules(selfimprove.engine.__path__, "selfimprove.engine."))

PROBE = """
import json, sys, importlib
importlib.import_module(sys.argv[1])
print(json.dumps(sorted(sys.modules)))
"""


def loaded_by(module: str) -> set[str]:
    """The top-level names and selfimprove modules in sys.modules after importing ``module`` alone."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, module], capture_output=True, text=True, env=env, check=True
    ).stdout
    names = json.loads(out)
    return {n.split(".")[0] for n in names} | {n for n in names if n.startswith("selfimprove.")}


def test_the_probe_sees_a_heavy_import():
    """The check below can fail: importing a module that loads torch shows torch."""
    assert "torch" in loaded_by("torch")


@pytest.mark.parametrize("module", ["selfimprove.engine", *ENGINE])
def test_the_engine_imports_no_ml_library_and_no_layer_above_it(module):
    assert "selfimprove.engine.pipeline" in ENGINE and len(ENGINE) >= 9, ENGINE
    loaded = loaded_by(module)
    assert not loaded & set(HEAVY), f"{module} imports {sorted(loaded & set(HEAVY))}"
    above = sorted(n for n in loaded if n.split(".")[1:2] and n.split(".")[1] in ABOVE)
    assert not above, f"{module} imports the layers above the engine: {above}"


EVERY_MODULE = sorted(
    m.name
    for m in pkgutil.walk_packages([str(ROOT / "selfimprove")], "selfimprove.")
    if not m.name.startswith("selfimprove.conf")
)


@pytest.mark.parametrize("module", EVERY_MODULE)
def test_every_module_imports(module):
    """A module moved or renamed leaves no import behind: each module of the package imports (an
    import inside a function body is not checked here; the runs in the other tests reach those)."""
    import importlib

    assert importlib.import_module(module).__name__ == module
