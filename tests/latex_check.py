"""Two checks that a LaTeX table is valid: pdflatex compiles it (when a TeX engine is installed), and
a strict parse (pylatexenc, from PyPI, so CI has it) finds no unbalanced braces, ``$`` or
environments, no special character left unescaped in text (``# _ ^ ~ %``), no unknown text macro,
and as many ``&`` in each tabular row as the column spec asks for."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

#: macros our tables use in text mode (math mode may use any)
TEXT_MACROS = {
    "\\", "&", "%", "$", "#", "_", "{", "}", "toprule", "midrule", "bottomrule", "centering", "caption",
    "textbackslash", "textasciitilde", "textasciicircum", "textless", "textgreater", "textbar",
    "ensuremath", "quad",
}  # fmt: skip

DOCUMENT = "\\documentclass{article}\n\\usepackage[T1]{fontenc}\n\\usepackage{booktabs}\n\\begin{document}\n%s\\end{document}\n"


def compile_problems(source: str, workdir: Path) -> list[str]:
    """pdflatex's error lines for the table in a minimal document ([] when it compiles, or when no
    TeX engine is installed: then the parse check stands alone)."""
    if shutil.which("pdflatex") is None:
        return []
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "table.tex").write_text(DOCUMENT % source)
    proc = subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "table.tex"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode == 0:
        return []
    return [line for line in proc.stdout.splitlines() if line.startswith("!")] or [proc.stdout[-500:]]


def parse_problems(source: str) -> list[str]:
    from pylatexenc.latexwalker import LatexWalker, LatexWalkerParseError

    body = "\n".join(line for line in source.splitlines() if not line.startswith("%"))  # our header
    try:
        nodes, _, _ = LatexWalker(body, tolerant_parsing=False).get_latex_nodes()
    except LatexWalkerParseError as err:
        return [str(err).splitlines()[0]]
    problems: list[str] = []
    walk(nodes, False, problems)
    return problems


def walk(nodes, math: bool, problems: list[str]) -> None:
    from pylatexenc import latexwalker as lw

    for node in nodes or []:
        if isinstance(node, lw.LatexCommentNode):
            problems.append(f"unescaped % (comments out {node.comment!r})")
        elif isinstance(node, lw.LatexCharsNode) and not math and set(node.chars) & set("#_^"):
            problems.append(f"unescaped special character in text {node.chars!r}")
        elif isinstance(node, lw.LatexSpecialsNode) and node.specials_chars == "~" and not math:
            problems.append("unescaped ~ (a non-breaking space)")
        elif isinstance(node, lw.LatexMathNode):
            walk(node.nodelist, True, problems)
        elif isinstance(node, lw.LatexMacroNode):
            if not math and node.macroname not in TEXT_MACROS:
                problems.append(f"unknown text macro \\{node.macroname} (an unescaped backslash?)")
            arguments = node.nodeargd.argnlist if node.nodeargd else []
            walk([a for a in arguments if a is not None], math or node.macroname == "ensuremath", problems)
        elif isinstance(node, lw.LatexEnvironmentNode):
            if node.environmentname == "tabular":
                check_rows(node, problems)
            walk(node.nodelist, math, problems)
        elif isinstance(node, lw.LatexGroupNode):
            walk(node.nodelist, math, problems)


def check_rows(tabular, problems: list[str]) -> None:
    """Each row that has cells has exactly one ``&`` fewer than the column spec has columns."""
    from pylatexenc import latexwalker as lw

    spec = tabular.nodeargd.argnlist[-1].latex_verbatim().strip("{}")
    columns = sum(ch in "lrc" for ch in spec)
    amps = 0
    for node in tabular.nodelist:
        if isinstance(node, lw.LatexSpecialsNode) and node.specials_chars == "&":
            amps += 1
        elif isinstance(node, lw.LatexMacroNode) and node.macroname == "\\":
            if amps and amps != columns - 1:
                problems.append(f"a tabular row has {amps + 1} cells, the spec {spec!r} has {columns}")
            amps = 0
