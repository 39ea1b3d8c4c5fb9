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
        gold = parse(f"${answer}$") or parse(str(answer))
        if not gold:
            out.append(None)
            continue
        out.append(1.0 if verify(gold, parse(completion)) else 0.0)
    return out
