"""The tiny local model: character tokenizer round trip, deterministic build, vLLM-loadable shapes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from selfimprove.engine.registry import ConfigError
from selfimprove.models import build_tiny, char_tokenizer
from tests.conftest import compose_cfg


def tiny_model_cfg(**changes):
    cfg = dict(compose_cfg([]).model)
    cfg.update(changes)
    return cfg


def test_character_tokenizer_round_trips_through_save_and_load(tmp_path):
    tok = char_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "573+885: 3+5+0=08; ans 1458\nHello, World!"
    ids = loaded(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text), "one token per character"
    assert loaded.decode(ids) == text, "spaces and newlines survive"
    assert loaded.padding_side == "left" and loaded.eos_token == "</s>"


def test_bos_tokenizer_starts_every_text_with_bos_after_save_and_load(tmp_path):
    build_tiny(tiny_model_cfg(bos=True), tmp_path, seed=0)
    tok = AutoTokenizer.from_pretrained(tmp_path / "model", padding_side="left")
    assert (
        tok("12+3=")["input_ids"] == [tok.bos_token_id] + tok("12+3=", add_special_tokens=False)["input_ids"]
    )
    batch = tok(["1", "12+3="], padding=True)["input_ids"]
    assert batch[0][-2:] == [tok.bos_token_id, tok.convert_tokens_to_ids("1")], "BOS after the left padding"
    assert tok.decode(batch[1], skip_special_tokens=True) == "12+3="
    assert (
        char_tokenizer()("12")["input_ids"] == char_tokenizer()("12", add_special_tokens=False)["input_ids"]
    )


def test_tiny_model_is_deterministic_and_loads_with_from_pretrained(tmp_path):
    counts = build_tiny(tiny_model_cfg(), tmp_path / "a", seed=3)
    build_tiny(tiny_model_cfg(), tmp_path / "b", seed=3)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "model")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "model")
    assert a.config.model_type == "llama" and a.config.head_dim == 32
    assert counts["parameters"] == sum(p.numel() for p in a.parameters()) < 1_000_000
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert (tmp_path / "a" / "model" / "model.safetensors").exists()


def test_head_dim_that_vllm_rejects_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="head_dim 16"):
        build_tiny(tiny_model_cfg(hidden_size=64, num_heads=4), tmp_path, seed=0)


def test_characters_limit_the_vocabulary_and_the_model_built_on_it(tmp_path):
    """model.characters: the tokenizer knows the specials and those characters only (a task's whole
    alphabet: 16 tokens for reversed addition instead of 100), so the embedding has no unused rows."""
    build_tiny(tiny_model_cfg(characters="0123456789+=", bos=True), tmp_path, seed=0)
    tok = AutoTokenizer.from_pretrained(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert len(tok) == model.config.vocab_size == len(char_tokenizer()) - 84
    ids = tok("52+3=")["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.decode(ids[1:]) == "52+3=" and len(ids) == 6
    assert tok("x")["input_ids"][1:] == [tok.unk_token_id]


@pytest.mark.parametrize("characters", ["", "0123456789+=0", "é+"])
def test_bad_characters_are_one_line_before_anything_is_written(characters, tmp_path):
    from tests.conftest import selfimprove

    proc = selfimprove(
        "run", f"model.characters='{characters}'", f"run_dir={tmp_path / 'run'}", cwd=tmp_path, check=False
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: model.characters={characters!r} must be distinct printable characters (e.g. '0123456789+='), "
        "with model.tokenizer=char; or null for all printable ones"
    ], proc.stderr
    assert not (tmp_path / "run").exists()


def test_init_seed_draws_the_weights_apart_from_the_run_seed(tmp_path):
    """model.init_seed=1 in a seed-0 run gives seed 1's initial weights (the data, sampling and
    training keep seed 0); null keeps the run seed's, and the stage's fingerprint of before."""
    from selfimprove.app import fingerprint_neutral
    from selfimprove.engine.pipeline import fingerprint_of
    from selfimprove.models import init_model

    def weights(folder):
        return AutoModelForCausalLM.from_pretrained(folder / "model").state_dict()

    for name, cfg, seed in (("s1", tiny_model_cfg(), 1), ("i1", tiny_model_cfg(init_seed=1), 0)):
        init_model(tmp_path / name, cfg, seed=seed)
    init_model(tmp_path / "s0", tiny_model_cfg(init_seed=None), seed=0)
    s0, s1, i1 = (weights(tmp_path / n) for n in ("s0", "s1", "i1"))
    assert all(torch.equal(i1[k], s1[k]) for k in s1)
    assert not torch.equal(i1["model.embed_tokens.weight"], s0["model.embed_tokens.weight"])
    before = {k: v for k, v in tiny_model_cfg().items() if k != "init_seed"}  # a run made before the key
    fingerprints = {
        fingerprint_of(init_model, {"model": m, "seed": 0}, fingerprint_neutral())
        for m in (before, tiny_model_cfg(init_seed=None))
    }
    assert len(fingerprints) == 1
    assert (
        fingerprint_of(init_model, {"model": tiny_model_cfg(init_seed=1), "seed": 0}, fingerprint_neutral())
        not in fingerprints
    )
