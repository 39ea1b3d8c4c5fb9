"""Math answer checking with ``math-verify`` (parse both sides, compare symbolically)."""

from __future__ import annotations


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (braces matched), or None. MATH's gold answers
    live there; math-verify does its own extraction on completions."""
    start = text.rfind("\\boxed")
    if start == -1:
        return None
    i = text.find("{", start)
    if i == -1:
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


def end_of_last_boxed(text: str) -> int | None:
    """Index just after the closing brace of the last ``\\boxed{...}``, or None."""
    inner = last_boxed(text)
    if inner is None:
        return None
    start = text.rfind("\\boxed")
    return text.find("{", start) + 1 + len(inner) + 1


def math_rewards(completions: list[str], answers: list[str]) -> list[float | None]:
    """1.0 when math-verify finds the completion's final answer equal to the gold answer, else
    0.0; None when the gold answer itself cannot be parsed (cannot judge)."""
    from math_verify import parse, verify

    out: list[float | None] = []
    for completion, answer in zip(completions, answers):
        gold = parse_answer(answer)
        if not gold:
            out.append(None)
            continue
        out.append(1.0 if verify(gold, parse(completion)) else 0.0)
    return out


def parse_answer(answer: str) -> list:
    """A reference answer as math-verify reads it: as LaTeX math, else as plain text."""
    from math_verify import parse

    return parse(f"${answer}$") or parse(str(answer))


def canonical(parsed: list) -> str | None:
    """One string per value, so that majority votes count equal answers together: math-verify's
    first parsed form (a sympy value) as sympy prints it, decimals written as fractions. ``0.5``,
    ``\\frac{1}{2}`` and ``\\frac{2}{4}`` all give ``1/2``, ``15.0`` and ``15`` give ``15``,
    ``(1, 2)`` gives ``Interval.open(1, 2)``. Only what parse makes equal is merged (``\\sqrt{12}``
    stays apart from ``2\\sqrt{3}``: simplifying could hang). None when nothing parsed."""
    import sympy

    if not parsed:
        return None
    value = parsed[0]
    if isinstance(value, sympy.Basic):
        value = value.xreplace({f: sympy.nsimplify(f, rational=True) for f in value.atoms(sympy.Float)})
    return str(value).strip()


def final_answer(completion: str) -> str | None:
    """The canonical final answer of a completion (its last ``\\boxed{}``, else what math-verify
    finds), or None when it has none."""
    from math_verify import parse

    return canonical(parse(completion))


def canonical_answer(answer: str) -> str | None:
    """The canonical form of a reference answer, comparable with ``final_answer``."""
    return canonical(parse_answer(answer))
