"""Self-Refine end to end on a very small config (both feedback sources, one shared warm start):
round 1 drafts, later rounds refine exactly the episodes the feedback calls wrong, stop reasons and
tokens per round are recorded, the oracle upper bound never lowers accuracy; a bad feedback name is a
one-line error."""

from __future__ import annotations

from pathlib import Path

import pytest

from selfimprove.app import run
from selfimprove.engine.pipeline import read_jsonl
from selfimprove.engine.registry import ConfigError
from tests.conftest import compose_cfg

pytestmark = pytest.mark.slow

SMALL = ["method=self_refine", "debug=tiny", "dataset.test_levels=[2]", "dataset.test_per_level=12"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("self_refine")
    return {
        fb: (run(compose_cfg([*SMALL, f"method.feedback={fb}", f"run_dir={root / fb}"])), root / fb)
        for fb in ("oracle_upper_bound", "self")
    }


def test_rounds_refine_what_the_feedback_calls_wrong(runs):
    for feedback, (rows, root) in runs.items():
        assert [r["iteration"] for r in rows] == [0, 1, 2, 3]
        assert "acc@t2/2" in rows[0], "the warm start is evaluated on two turns"
        assert rows[1]["open"] == 12 and rows[1]["tokens/round"] > 0 and rows[1]["tokens/critique"] == 0
        draft = read_jsonl(root / "iter_01" / "draft" / "episodes.jsonl")
        second = read_jsonl(root / "iter_02" / "refine" / "episodes.jsonl")
        assert all(len(e["turns"]) == 1 and e["stopped"] is None for e in draft)
        for before, after in zip(draft, second):
            refined = len(after["turns"]) == 2
            assert refined == (after["stopped"] in (None, "unchanged")), after
            if refined:
                assert after["turns"][1]["feedback"] == "wrong"
                assert (
                    after["turns"][1]["prompt"]
                    == f"{after['prompt']}{before['turns'][0]['completion']}\nwrong:"
                )
            if feedback == "oracle_upper_bound":  # the verifier refines exactly the wrong drafts
                assert refined == (before["turns"][0]["reward"] != 1.0)
        assert rows[2]["refined"] == sum(len(e["turns"]) == 2 for e in second)
        if feedback == "self":
            assert rows[2]["tokens/critique"] > 0
        else:
            assert rows[2]["tokens/critique"] == 0
            assert rows[1]["acc/2"] <= rows[2]["acc/2"] <= rows[3]["acc/2"]


def test_warm_start_is_shared_between_feedback_sources(runs):
    assert (runs["self"][1] / "warmstart" / "train" / "model").exists()
    events = read_jsonl(runs["self"][1] / "events.jsonl")
    assert {e["stage"] for e in events if e["action"] == "shared"} >= {"warmstart/train", "iter_01/draft"}


def test_unknown_feedback_is_refused(tmp_path):
    with pytest.raises(
        ConfigError, match="method.feedback='judge' is not allowed; use one of self, oracle_upper_bound"
    ):
        run(compose_cfg([*SMALL, "method.feedback=judge", f"run_dir={tmp_path}"]))


def test_the_default_feedback_is_the_models_own():
    """The paper's; the verifier that reads the test answer is an opt-in upper bound."""
    from omegaconf import OmegaConf

    assert compose_cfg(["method=self_refine"]).method.feedback == "self"
    table = OmegaConf.load(Path(__file__).parent.parent / "conf" / "experiment" / "self_refine_table.yaml")
    assert table.hydra.sweeper.params["method.feedback"] == "self,oracle_upper_bound"
