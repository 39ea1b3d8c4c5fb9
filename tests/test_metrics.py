"""Shared metrics against hand-computed values, and self-certainty against a direct computation
from a real tiny model's logits."""

from __future__ import annotations

import math

import pytest

from selfimprove.engine.registry import ConfigError
from selfimprove.methods.bstar.balance import (
    balance_of,
    balance_terms,
    exploit_factor,
    normalised,
    reward_range,
    selected,
    with_scores,
)
from selfimprove.metrics import (
    auroc,
    balance_score,
    exploitation,
    exploration,
    maj_at_k,
    majority,
    pass_at_k,
    pass_at_k_s,
    reward_at_k_s,
    self_certainty,
)
from selfimprove.stages.evaluation import accuracy
from selfimprove.tasks.arithmetic import extract_answer


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (5, 2, 1, 2 / 5),
        (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
        (5, 2, 3, 1 - 1 / 10),  # 1 - C(3,3)/C(5,3)
        (5, 2, 4, 1.0),  # fewer than k wrong samples: some correct one is always drawn
        (8, 0, 8, 0.0),
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
    ],
)
def test_pass_at_k_is_the_unbiased_estimator(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_rejects_k_above_n():
    with pytest.raises(ConfigError, match="k=3"):
        pass_at_k(2, 1, 3)


def test_majority_vote_ignores_none_and_breaks_ties_by_first_seen():
    answers = ["5", "7", "7", None, "5", "5"]
    rewards = [1.0 if a == "5" else 0.0 for a in answers]  # the verifier judges the majority answer
    assert [maj_at_k(answers, rewards, k) for k in (1, 2, 3, 4, 6)] == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert majority([None, None]) is None and maj_at_k([None], [0.0], 1) == 0.0


def test_held_out_accuracy_counts_an_unscorable_item_as_wrong():
    """Two right of four, not two of the three the verifier could score."""
    scored = [{"reward": 1.0}, {"reward": None}, {"reward": 0.0}, {"reward": 1.0}]
    assert accuracy(scored) == 0.5
    assert accuracy([{"reward": None}]) == 0.0 and accuracy([]) == 0.0


def test_balance_score_by_hand():
    # per query min(n_c/4, 1) * n_c/n_sel: 0.5*0.5, 0 (nothing selected), 0.25*1, 1*1 -> mean 0.375
    assert balance_score([(2, 4), (0, 0), (1, 1), (5, 5)], n_star=4) == pytest.approx(0.375)


def rec(pid, completion, reward, certainty):
    return {"id": pid, "completion": completion, "reward": reward, "certainty": certainty}


def clean(completion):  # cut after the answer, as the arithmetic task does
    return completion[: completion.index("ans") + 5]


def test_bstar_selection_lets_a_confident_wrong_answer_pass_a_low_threshold():
    records = [
        rec("a", "x;ans 3", 1.0, 1.0),  # score 1 + 1.0 = 2.0
        rec("a", "y;ans 3", 1.0, 0.5),  # 1 + 0.0 = 1.0
        rec("a", "z;ans 4", 0.0, 0.9),  # wrong but confident: 0 + 0.8 = 0.8
        rec("a", "w;ans 5", 0.0, 0.0),  # 0 - 1.0 = -1.0
        rec("b", "p;ans 7", 1.0, 0.6),  # 1.2
        rec("b", "q;ans 8", 0.0, 0.2),  # -0.6
    ]
    span = reward_range(records)
    assert span == (0.0, 1.0)
    scored = with_scores(records, span)
    assert [r["score"] for r in scored] == pytest.approx([2.0, 1.0, 0.8, -1.0, 1.2, -0.6])
    # tau = 0.5: the confident wrong answer z passes (the old rule, correct AND reward >= tau, never let it)
    assert {r["completion"] for r in selected(scored, 0.5)} == {"x;ans 3", "y;ans 3", "z;ans 4", "p;ans 7"}
    assert exploit_factor(balance_terms(scored, 0.5, clean)) == pytest.approx((2 / 3 + 1) / 2, abs=1e-4)
    # balance (n* = 2), per query min(n'/2, 1) * n'/n:
    by_tau = {tau: balance_of(scored, tau, 2, clean) for tau in (-1.0, 0.5, 0.9, 1.0, 1.5)}
    assert by_tau[-1.0] == pytest.approx((2 / 3 + 0.25) / 2)  # z and q pass: n'/n = 2/3 and 1/2
    assert by_tau[0.5] == pytest.approx((2 / 3 + 0.5) / 2)  # z still passes
    assert by_tau[0.9] == pytest.approx((1.0 + 0.5) / 2)  # z is out, both correct of a kept
    assert by_tau[1.0] == pytest.approx((0.5 + 0.5) / 2)  # y (score 1.0) is out too: n' falls
    assert by_tau[1.5] == pytest.approx(0.25)
    assert max(by_tau, key=by_tau.get) == 0.9, (
        "the balance score picks neither the lowest nor the highest tau"
    )


def test_bstar_reward_is_normalised_onto_minus_one_one():
    assert normalised(3.0, (1.0, 5.0)) == pytest.approx(0.0)
    assert normalised(9.0, (1.0, 5.0)) == 1.0 and normalised(0.0, (1.0, 5.0)) == -1.0  # clipped
    assert normalised(None, (1.0, 5.0)) == -1.0 and normalised(2.0, (2.0, 2.0)) == 0.0


def test_pass_and_reward_at_k_s_by_hand():
    records = with_scores(
        [
            rec("a", "x;ans 3", 1.0, 1.0),
            rec("a", "x;ans 3 junk", 1.0, 0.7),  # the same rationale once cleaned
            rec("a", "y;ans 3", 1.0, 0.5),
            rec("b", "p;ans 7", 1.0, 0.6),
            rec("b", "q;ans 8", 0.0, 0.2),
            rec("c", "m;ans 1", 1.0, 0.1),  # scores 0.2, 0.4 for the correct ones,
            rec("c", "n;ans 1", 1.0, 0.2),
            rec("c", "o;ans 2", 0.0, 0.95),  # 0.9 for the confident wrong one: ranked first
        ],
        (0.0, 1.0),
    )
    # unique correct per prompt: a 2, b 1, c 2
    assert pass_at_k_s(records, 1, clean) == 1.0
    assert pass_at_k_s(records, 2, clean) == pytest.approx(2 / 3, abs=1e-4)
    assert pass_at_k_s(records, 3, clean) == 0.0
    # top by score: a x (correct), b p (correct), c o (wrong); top 2: a x, x-junk; b p, q; c o, n
    assert reward_at_k_s(records, 1, "score") == pytest.approx(2 / 3, abs=1e-4)
    assert reward_at_k_s(records, 2, "score") == pytest.approx(1 / 3, abs=1e-4)
    # c has 2 unique correct samples, but the reward ranks its wrong one first: Reward@K-S < Pass@K-S


def test_auroc_with_ties_and_missing_class():
    assert auroc([0.9, 0.8, 0.3, 0.8], [True, True, False, False]) == pytest.approx(3.5 / 4)
    assert auroc([0.1, 0.2], [True, True]) is None


def pairwise_auroc(scores, labels):
    """The definition, O(n^2): over every (correct, wrong) pair, 1 if the correct one scores
    higher, 1/2 on a tie."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    return sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(20))
def test_auroc_equals_the_pairwise_definition_with_ties(seed):
    import random

    rng = random.Random(seed)
    n = rng.randint(2, 300)
    # few distinct scores, so most samples tie with others (as self-certainty rounded or a 0/1 reward)
    scores = [rng.choice([0.1, 0.25, 0.5, 0.9, rng.random()]) for _ in range(n)]
    labels = [rng.random() < 0.4 for _ in range(n)]
    labels[0], labels[1] = True, False  # both classes present
    assert auroc(scores, labels) == pytest.approx(pairwise_auroc(scores, labels), abs=1e-12)


def test_exploration_and_exploitation_by_hand():
    def rec(pid, completion, reward, certainty):
        return {"id": pid, "completion": completion, "reward": reward, "certainty": certainty}

    records = [
        rec("a", "1;ans 12", 1.0, 0.9),
        rec("a", "2;ans 12", 1.0, 0.1),
        rec("a", "3;ans 13", 0.0, 0.5),
        rec("a", "junk", 0.0, 0.4),
        rec("b", "4;ans 7", 0.0, 0.8),
        rec("b", "5;ans 8", 1.0, 0.3),
        rec("b", "6;ans 7", 0.0, 0.2),
        rec("b", "7;ans 9", 0.0, 0.1),
    ]
    explore = exploration(records, extract_answer, lambda c: c)
    assert explore["explore/distinct_correct"] == 1.5  # a: 2, b: 1
    assert explore["explore/distinct_answers"] == 2.5  # a: {12, 13}, b: {7, 8, 9}
    assert explore["explore/pass@1"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert explore["explore/pass@n"] == 1.0
    exploit = exploitation(records, kept_rewards=[1.0, 1.0, 0.0, 1.0])
    assert exploit["exploit/kept_precision"] == 0.75
    # correct: .9 .1 .3; wrong: .5 .4 .8 .2 .1 -> wins 5 + 0.5 + 2 = 7.5 of 15
    assert exploit["exploit/auroc_certainty"] == 0.5
    assert exploit["exploit/bon_certainty"] == 0.5  # a picks .9 (right), b picks .8 (wrong)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from selfimprove.models import build_tiny
    from tests.conftest import compose_cfg

    out = tmp_path_factory.mktemp("tiny")
    build_tiny(dict(compose_cfg(["debug=tiny"]).model), out, seed=3)
    return out


def test_self_certainty_matches_a_direct_computation_from_logits(tiny_model):
    import torch

    from selfimprove.models import load_model
    from selfimprove.scoring.certainty import certainties

    hardware = {"device": "cpu", "dtype": "float32"}
    records = [
        {"prompt": "12+34:", "completion": "2+4+0=06|6;ans 46"},
        {"prompt": "5+5:", "completion": "5+5+0=10|0;ans 10"},
        {"prompt": "7+1:", "completion": ""},
    ]
    got = certainties(tiny_model, records, hardware, batch_size=8)  # batched, right-padded
    lm, tok = load_model(tiny_model, hardware)
    for record, value in zip(records[:2], got):
        ids = tok(record["prompt"] + record["completion"], add_special_tokens=False)["input_ids"]
        n_prompt = len(tok(record["prompt"], add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            logits = lm(input_ids=torch.tensor([ids])).logits[0]
        vocab = logits.shape[-1]
        kl = []  # KL(U || p) = sum_v (1/V) log((1/V) / p_v), per predicted completion token
        for t in range(n_prompt - 1, len(ids) - 1):
            p = torch.softmax(logits[t].double(), dim=-1)
            kl.append(float(sum((1 / vocab) * math.log((1 / vocab) / float(p[v])) for v in range(vocab))))
        assert value == pytest.approx(sum(kl) / len(kl), rel=1e-4)
    assert got[2] is None
    assert self_certainty(torch.zeros(3, 10)) == pytest.approx(0.0, abs=1e-6)  # uniform: no certainty
