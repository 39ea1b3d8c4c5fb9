"""Every stage fingerprint of the demo and of each method at debug=tiny, planned (nothing computed)
and compared with tests/fingerprints.json. A fingerprint that changes makes every finished run
recompute that stage and all after it: this test makes such a change deliberate and names the
stages. If the change is intended, rewrite the file with ``python -m tests.test_fingerprints``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selfimprove.app import plan
from selfimprove.cli import group_options
from tests.conftest import compose_cfg

SAVED = Path(__file__).with_name("fingerprints.json")


def cases() -> dict[str, list[str]]:
    out = {"demo": []}
    for method in group_options()["method"]:
        dataset = "reversed_addition" if method == "length_gen" else "arithmetic"
        out[f"{method} debug=tiny"] = [f"method={method}", "debug=tiny", f"dataset={dataset}"]
    return out


def fingerprints(overrides: list[str], root: Path) -> dict[str, str]:
    cfg = compose_cfg([*overrides, "store=false", "generator.backend=hf"])  # hf: what CPUs resolve auto to
    return {s.name: s.fingerprint for s in plan(cfg, root).plan}


@pytest.mark.parametrize("case", list(cases()))
def test_stage_fingerprints_are_the_saved_ones(case, tmp_path):
    saved = json.loads(SAVED.read_text())[case]
    now = fingerprints(cases()[case], tmp_path / "run")
    changed = sorted(n for n in saved.keys() | now.keys() if saved.get(n) != now.get(n))
    assert now and not changed, (
        f"{case}: these stages' fingerprints changed (finished runs recompute them): {', '.join(changed)}; "
        "if intended, run `python -m tests.test_fingerprints` and commit tests/fingerprints.json"
    )


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        table = {case: fingerprints(o, Path(tmp) / "run") for case, o in cases().items()}
    SAVED.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"wrote {SAVED}: {sum(map(len, table.values()))} stages in {len(table)} plans")
