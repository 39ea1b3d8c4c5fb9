"""LLM-as-a-judge and preference pairs by hand: every judge's template and parser (an unparseable
judgement is skipped, never 0), the judge's agreement with the verifier, Self-Rewarding's
best-vs-worst pairs (ties dropped, Temporal Self-Rewarding's anchored rejection and future-guided chosen) and SPIN's pairs, with exact values."""

from __future__ import annotations

import pytest

from selfimprove.engine.pipeline import Artifact, read_jsonl, write_jsonl
from selfimprove.engine.registry import ConfigError
from selfimprove.methods.self_rewarding.judge import JUDGES, Judge, agreement, get_judge
from selfimprove.stages.preference import best_vs_worst, pair_metrics, spin_pairs
from selfimprove.tasks import spec
from tests.conftest import compose_cfg


@pytest.mark.parametrize("name", sorted(JUDGES))
def test_every_judge_parses_what_it_renders(name):
    judge = get_judge(name)
    text = judge.prompt("12+3:", "2+3+0=05|5;1+0:1+0+0=01|15;ans 15")
    assert "12+3:" in text and "ans 15" in text
    assert [judge.parse("x " + judge.render(s) + " y") for s in range(judge.max_score + 1)] == [
        float(s) for s in range(judge.max_score + 1)
    ]
    assert judge.parse("no score here") is None
    assert judge.parse(judge.render(judge.max_score + 1)) is None, "out of range is unparseable, not clipped"


def test_verdict_judge_by_hand():
    judge = get_judge("verdict")
    assert judge.prompt("1+2:", "ans 3") == "1+2:ans 3\njudge:"
    assert (
        judge.parse(" 1"),
        judge.parse(" 0"),
        judge.parse(" 7"),
        judge.parse("good"),
        judge.parse(""),
    ) == (
        1.0,
        0.0,
        None,
        None,
        None,
    )


def test_bad_judges_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"must contain \{response\} exactly once"):
        Judge(template="{prompt} judge:", verdict="{score}", max_score=1)
    with pytest.raises(
        ConfigError,
        match=r"unknown judge 'verdic' \(did you mean 'verdict'\?\); available: additive_5, verdict",
    ):
        get_judge("verdic")


def test_agreement_with_the_verifier():
    judge = get_judge("additive_5")
    records = [
        {"judge": 5.0, "reward": 1.0},  # agrees
        {"judge": 3.0, "reward": 0.0},  # 3 >= 2.5 says correct: disagrees
        {"judge": 0.0, "reward": 0.0},  # agrees
        {"judge": None, "reward": 1.0},  # unparseable: skipped, not counted as 0
    ]
    assert agreement(judge, records) == {
        "judge/parsed": 0.75,
        "judge/agreement": 0.6667,
        "judge/says_correct": 0.6667,
    }


def response(rid: str, text: str, judge: float | None, reward: float) -> dict:
    return {"id": rid, "prompt": rid + ":", "completion": text, "judge": judge, "reward": reward}


JUDGED = [
    response("a", "a1", 1.0, 1.0),
    response("a", "a2", 0.0, 0.0),
    response("a", "a3", 1.0, 0.0),  # ties with a1 for best: the first wins
    response("b", "b1", 1.0, 1.0),
    response("b", "b2", 1.0, 0.0),  # all equal: a tie, no pair
    response("c", "c1", None, 1.0),
    response("c", "c2", 0.0, 0.0),  # only one parseable response: no pair
    response("d", "d1", 0.0, 1.0),
    response("d", "d2", 1.0, 0.0),  # the judge is wrong: a pair whose chosen is wrong
]


def test_best_vs_worst_drops_ties():
    pairs, ties = best_vs_worst(JUDGED)
    assert [(p["id"], p["chosen"], p["rejected"]) for p in pairs] == [("a", "a1", "a2"), ("d", "d2", "d1")]
    assert ties == 2
    assert pair_metrics(pairs, ties) == {
        "pairs/count": 2,
        "pairs/ties": 2,
        "pairs/accuracy": 0.5,
        "pairs/chosen_correct": 0.5,
        "pairs/rejected_correct": 0.5,
        "pairs/rejected_from_anchor": 0.0,
        "pairs/chosen_from_future": 0.0,
    }


def test_anchored_rejection_takes_the_anchor_worst_only_when_it_scores_lower():
    anchors = [
        response("a", "A1", 1.0, 1.0),
        response("a", "A2", 0.0, 0.0),  # ties with a's own worst (a2): a2 stays
        response("b", "B1", 0.0, 0.0),  # below b's own worst (1.0): rejected, which breaks b's tie
        response("c", "C1", 1.0, 0.0),  # above c's own worst: c2 stays, and c stays a tie
        response("d", "D1", None, 0.0),  # no parseable anchor: d's own worst
    ]
    pairs, ties = best_vs_worst(JUDGED, anchors)
    assert [(p["id"], p["chosen"], p["rejected"], p["meta"]["rejected_from"]) for p in pairs] == [
        ("a", "a1", "a2", "current"),
        ("b", "b1", "B1", "anchor"),
        ("d", "d2", "d1", "current"),
    ]
    assert ties == 1
    assert pairs[1]["meta"] == {
        "chosen_judge": 1.0,
        "rejected_judge": 0.0,
        "chosen_reward": 1.0,
        "rejected_reward": 0.0,
        "chosen_from": "current",
        "rejected_from": "anchor",
    }
    assert pair_metrics(pairs, ties)["pairs/rejected_from_anchor"] == 0.3333


def test_future_guided_chosen_takes_the_future_best_only_when_it_scores_higher():
    judged = [
        response("a", "a1", 3.0, 1.0),
        response("a", "a2", 1.0, 0.0),
        response("b", "b1", 3.0, 1.0),
        response("b", "b2", 2.0, 0.0),
        response("c", "c1", 2.0, 0.0),
        response("c", "c2", 2.0, 0.0),  # a tie on its own
    ]
    future = [
        response("a", "F1", 5.0, 1.0),  # above a's best: chosen
        response("a", "F2", 0.0, 0.0),  # a future response is never rejected
        response("b", "G1", 3.0, 0.0),  # ties with b's best: b1 stays
        response("c", "H1", 4.0, 1.0),  # breaks c's tie
    ]
    anchors = [response("a", "A1", 0.0, 0.0)]  # both phases: a's pair spans past and future
    pairs, ties = best_vs_worst(judged, anchors, future)
    assert [(p["id"], p["chosen"], p["rejected"]) for p in pairs] == [
        ("a", "F1", "A1"),
        ("b", "b1", "b2"),
        ("c", "H1", "c1"),
    ]
    assert [(p["meta"]["chosen_from"], p["meta"]["rejected_from"]) for p in pairs] == [
        ("future", "anchor"),
        ("current", "current"),
        ("future", "current"),
    ]
    assert ties == 0
    assert pair_metrics(pairs, ties)["pairs/chosen_from_future"] == 0.6667


def test_spin_pairs_gold_vs_own(tmp_path):
    dataset = spec(compose_cfg([]).dataset)
    gold = "2+3+0=05|5;1+0:1+0+0=01|15;ans 15"
    samples = tmp_path / "samples"
    samples.mkdir()
    write_jsonl(
        samples / "samples.jsonl",
        [
            {
                "id": "x",
                "prompt": "12+3:",
                "answer": "15",
                "completion": gold + "junk",
                "meta": {"gold": gold},
            },
            {"id": "y", "prompt": "12+3:", "answer": "15", "completion": "ans 15;9", "meta": {"gold": gold}},
            {"id": "z", "prompt": "12+3:", "answer": "15", "completion": "ans 16", "meta": {"gold": gold}},
        ],
    )
    previous = tmp_path / "previous"
    previous.mkdir()
    write_jsonl(
        previous / "new.jsonl", [{"id": "old", "prompt": "1+1:", "chosen": "c", "rejected": "r", "meta": {}}]
    )
    out = tmp_path / "out"
    out.mkdir()
    metrics = spin_pairs(out, Artifact("samples", samples, "s"), dataset, Artifact("prev", previous, "p"))
    pairs = read_jsonl(out / "pairs.jsonl")
    # x equals the gold once cut after its answer: dropped; y and z rejected; the previous pair mixed in
    assert [(p["id"], p["rejected"]) for p in pairs] == [("y", "ans 15"), ("z", "ans 16"), ("old", "r")]
    assert all(p["chosen"] == gold for p in pairs[:2]) and "gold" not in pairs[0]["meta"]
    assert metrics == {
        "pairs/new": 2,
        "pairs/from_previous": 1,
        "pairs/own_equals_gold": 0.3333,
        "pairs/rejected_correct": 0.5,
    }
    assert [p["id"] for p in read_jsonl(out / "new.jsonl")] == ["y", "z"]
