"""Metrics shared by every method: pure functions over numbers and records (no I/O, no models).

- ``pass_at_k``: the unbiased estimator of Chen et al. (2021) from n >= k samples.
- ``majority`` / ``maj_at_k``: majority vote over extracted answers (Wang et al. 2023).
- ``self_certainty``: mean over completion tokens of KL(uniform || p) (Kang et al. 2025).
- ``balance_score``: B-STaR's exploration x exploitation score (Zeng et al. 2024).
- ``auroc``: how well a scalar score separates correct from wrong samples.
- ``exploration`` / ``exploitation``: what B-STaR monitors per iteration, from scored records.
- ``pass_at_k_s`` / ``reward_at_k_s``: B-STaR's Pass@K-S and Reward@K-S (Zeng et al. 2024, §2.2).
- ``self_correction``: SCoRe's two-turn metrics (Kumar et al. 2024): Acc@t1, Acc@t2, Δ(t1,t2),
  Δ^{i→c}, Δ^{c→i}.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence

from selfimprove.engine.registry import ConfigError


def fraction(xs: Sequence[float | bool], empty: float | None = None) -> float | None:
    """The mean of ``xs`` (booleans count as 0/1), rounded to 4 places; ``empty`` when there is none."""
    return round(sum(xs) / len(xs), 4) if xs else empty


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k samples drawn without replacement from n is correct), c of n correct:
    1 - C(n-c, k) / C(n, k)."""
    if not 0 < k <= n or not 0 <= c <= n:
        raise ConfigError(f"pass@k needs 0 < k <= n and 0 <= c <= n (got n={n}, c={c}, k={k})")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority(answers: Sequence[str | None]) -> str | None:
    """The most frequent non-None answer; ties go to the answer seen first. None if there is none."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)


def maj_at_k(answers: Sequence[str | None], rewards: Sequence[float | None], k: int) -> float:
    """1.0 when the majority answer of the first ``k`` samples is right: the verifier's reward of a
    sample that gave it (answers equal as extracted, e.g. math-verify's canonical form, so
    ``0.5`` and ``\frac{1}{2}`` vote together and are judged by the verifier, not by spelling)."""
    if not 0 < k <= len(answers):
        raise ConfigError(f"maj@k needs 0 < k <= number of samples (got k={k}, samples={len(answers)})")
    top = majority(answers[:k])
    if top is None:
        return 0.0
    return float(next(r for a, r in zip(answers, rewards) if a == top) == 1.0)


def self_certainty(logits, mask=None) -> float:
    """Kang et al. (2025): the mean over positions of KL(U || p) = -log V - mean_v log p_v, where
    ``logits`` is [T, V] (the distributions that predicted the completion's T tokens). ``mask``
    (bool [T]) selects positions; higher means more certain."""
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    per_token = -math.log(logits.shape[-1]) - logp.mean(dim=-1)
    if mask is not None:
        per_token = per_token[mask]
    return float(per_token.mean()) if per_token.numel() else float("nan")


def balance_score(groups: Sequence[tuple[int, int]], n_star: int) -> float:
    """B-STaR's balance score, averaged over queries. Each group is (n_c, n_sel): unique correct
    responses among the selected ones, and selected responses. A query with nothing selected
    scores 0."""
    if n_star < 1:
        raise ConfigError(f"balance score needs n_star >= 1 (got {n_star})")
    if not groups:
        return 0.0
    per_query = [min(nc / n_star, 1.0) * nc / nsel if nsel else 0.0 for nc, nsel in groups]
    return sum(per_query) / len(per_query)


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve, i.e. P(score of a correct sample > score of a wrong one), ties
    counting one half; None when one class is missing. Computed in O(n log n) by the Mann-Whitney
    rank sum: sort once, give tied scores their average rank, then
    AUC = (sum of the correct samples' ranks - n_pos (n_pos + 1) / 2) / (n_pos n_neg)."""
    n_pos = sum(map(bool, labels))
    n_neg = len(labels) - n_pos
    if not n_pos or not n_neg:
        return None
    ranked = sorted(zip(scores, labels), key=lambda pair: pair[0])
    rank_sum, start = 0.0, 0
    while start < len(ranked):
        end = start
        while end < len(ranked) and ranked[end][0] == ranked[start][0]:
            end += 1
        average_rank = (start + 1 + end) / 2  # ranks start+1 .. end shared by the tied run
        rank_sum += average_rank * sum(bool(y) for _, y in ranked[start:end])
        start = end
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def by_prompt(records: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[r["id"]].append(r)
    return groups


def exploration(records: list[dict], extract, clean) -> dict:
    """Diversity of the sampled train set (B-STaR's exploration): distinct correct rationales and
    distinct answers per prompt (when ``extract`` is given), and pass@n - pass@1 (how much sampling
    more finds)."""
    groups = [g for g in by_prompt(records).values() if all(r["reward"] is not None for r in g)]
    if not groups:
        return {}
    distinct_correct = [len({clean(r["completion"]) for r in g if r["reward"] >= 1.0}) for g in groups]
    p1 = [pass_at_k(len(g), sum(r["reward"] >= 1.0 for r in g), 1) for g in groups]
    pn = [float(any(r["reward"] >= 1.0 for r in g)) for g in groups]
    answers = {}
    if extract is not None:
        distinct = [len({extract(r["completion"]) for r in g} - {None}) for g in groups]
        answers["explore/distinct_answers"] = fraction(distinct)
    return {
        "explore/distinct_correct": fraction(distinct_correct),
        **answers,
        "explore/pass@1": fraction(p1),
        "explore/pass@n": fraction(pn),
        "explore/pass@n-pass@1": round(fraction(pn) - fraction(p1), 4),
    }


def exploitation(records: list[dict], kept_rewards: list[float] | None = None) -> dict:
    """How well the selection separates correct from wrong samples (B-STaR's exploitation).
    ``records`` carry ``reward`` (the oracle verifier) and optionally ``certainty`` (a scalar
    reward); ``kept_rewards`` are the oracle rewards of the samples the method kept. Reports the
    precision of the kept set (for a binary selector), the AUROC of the scalar
    score, and best-of-n accuracy when the most certain sample of each prompt is picked."""
    out: dict = {}
    judged = [r for r in records if r["reward"] is not None]
    if kept_rewards:
        out["exploit/kept_precision"] = fraction([r >= 1.0 for r in kept_rewards])
    scored = [r for r in judged if r.get("certainty") is not None and not math.isnan(r["certainty"])]
    if scored:
        area = auroc([r["certainty"] for r in scored], [r["reward"] >= 1.0 for r in scored])
        out["exploit/auroc_certainty"] = round(area, 4) if area is not None else None
        best = [max(g, key=lambda r: r["certainty"]) for g in by_prompt(scored).values()]
        out["exploit/bon_certainty"] = fraction([r["reward"] >= 1.0 for r in best])
    return out


def pass_at_k_s(records: list[dict], s: int, clean) -> float | None:
    """B-STaR's Pass@K-S (§2.2): the fraction of prompts with at least ``s`` unique correct
    responses (unique once ``clean``ed) among their K samples; Pass@K-1 is Pass@K."""
    groups = by_prompt(records).values()
    return fraction([len({clean(r["completion"]) for r in g if r["reward"] == 1.0}) >= s for g in groups])


def reward_at_k_s(records: list[dict], s: int, key: str) -> float | None:
    """B-STaR's Reward@K-S (§2.2): the fraction of prompts whose top ``s`` samples ranked by the
    reward ``key`` are all correct; Reward@K-1 is best-of-K accuracy. Ties keep sample order."""
    groups = by_prompt(records).values()
    return fraction(
        [all(r["reward"] == 1.0 for r in sorted(g, key=lambda r: -r[key])[:s]) for g in groups if len(g) >= s]
    )


def self_correction(first: Sequence[bool], second: Sequence[bool]) -> dict[str, float]:
    """SCoRe's metrics over problems answered twice (Kumar et al. 2024, Section 6): accuracy at the
    first and second attempt, their difference Δ(t1,t2), and the fractions of *all* problems that
    went incorrect → correct (Δ^{i→c}) and correct → incorrect (Δ^{c→i}); Δ = Δ^{i→c} − Δ^{c→i}."""
    if len(first) != len(second):
        raise ConfigError(
            f"self_correction needs one second attempt per first ({len(first)} vs {len(second)})"
        )
    n = len(first)
    if n == 0:
        return {}
    acc1, acc2 = sum(map(bool, first)) / n, sum(map(bool, second)) / n
    return {
        "acc@t1": round(acc1, 4),
        "acc@t2": round(acc2, 4),
        "delta": round(acc2 - acc1, 4),
        "delta_i2c": round(sum((not a) and bool(b) for a, b in zip(first, second)) / n, 4),
        "delta_c2i": round(sum(bool(a) and not b for a, b in zip(first, second)) / n, 4),
    }
