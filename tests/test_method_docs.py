"""The method docs' step tables name our code as ``file.py:function``: each must still exist, so a
rename or a removal that leaves a doc pointing at nothing fails here."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: `methods/star.py:iteration_steps`, `engine/pipeline.py:Run.iterations`, `methods/self_rewarding/judge.py:JUDGES`
REFERENCE = re.compile(r"`((?:selfimprove/)?[\w/]+\.py):([\w.]+)`")


def defines(source: str, name: str) -> bool:
    """A def, class or assignment (module or class level) of the last part of ``name`` (Run.iterations:
    iterations), or a line number (``score.py:104``) that the file has."""
    if name.isdigit():
        return int(name) <= source.count("\n") + 1
    last = re.escape(name.split(".")[-1])
    return (
        re.search(rf"^\s*(?:async\s+)?(?:def|class)\s+{last}\b|^\s*{last}\s*[:=]", source, re.M) is not None
    )


def test_every_code_reference_in_the_method_docs_exists():
    found, broken = 0, []
    for doc in sorted((ROOT / "docs" / "methods").glob("*.md")):
        for path, name in REFERENCE.findall(doc.read_text()):
            found += 1
            file = ROOT / path if path.startswith("selfimprove/") else ROOT / "selfimprove" / path
            if not file.is_file():
                broken.append(f"{doc.name}: {path} (no such file)")
            elif not defines(file.read_text(), name):
                broken.append(f"{doc.name}: {path}:{name} (not defined there)")
    assert found > 20, f"only {found} references found: has the docs' format changed?"
    assert not broken, "\n".join(broken)
