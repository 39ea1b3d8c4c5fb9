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
