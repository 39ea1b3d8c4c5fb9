"""Backend choice and the hf backend's extras (runs in the main venv, where vLLM is absent)."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from omegaconf import OmegaConf

from selfimprove.app import run
from selfimprove.engine.registry import ConfigError
from selfimprove.generation import hf, resolve_backend
from selfimprove.models import build_tiny, load_model
from tests.conftest import compose_cfg, selfimprove

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True)


def test_auto_says_what_it_picked_and_does_not_import_vllm():
    cfg = compose_cfg([])
    said = []
    picked = resolve_backend(cfg.generator, cfg.hardware, say=said.append)
    expected = "vllm" if (torch.cuda.is_available() and HAS_VLLM and cfg.hardware.device != "cpu") else "hf"
    assert cfg.generator.backend == "auto" and picked == expected
    assert len(said) == 1 and said[0].startswith(f"generator=auto picked '{expected}'")
    assert "vllm" not in sys.modules, "choosing a backend must not import vllm"


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here; this checks the error where it is not")
def test_generator_vllm_without_vllm_is_one_line_before_anything_runs(tmp_path):
    proc = selfimprove("run", "generator=vllm", cwd=tmp_path, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: generator=vllm needs vLLM") and 'pip install -e ".[vllm' in lines[0]
    assert not (tmp_path / "outputs").exists()
    with pytest.raises(ConfigError, match="generator=vllm needs vLLM"):  # in-process callers too
        run(compose_cfg(["generator=vllm", f"run_dir={tmp_path / 'run'}"]))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("bos", [False, True])
def test_hf_logprobs_are_the_models_own(tmp_path, bos):
    """...in the context TRL trains on: the prompt tokenized with the tokenizer's own BOS, if any."""
    cfg = compose_cfg([f"model.bos={str(bos).lower()}"])
    build_tiny(plain(cfg.model), tmp_path, seed=0)
    hardware = plain(cfg.hardware)
    records = [{"id": 0, "prompt": "12+34="}, {"id": 1, "prompt": "7+5="}]
    sampling = {"n": 2, "temperature": 1.0, "top_p": 1.0, "max_tokens": 6, "stop": [], "logprobs": 3}
    out = hf.generate(tmp_path, records, sampling, plain(cfg.generator), hardware, seed=0)
    model, tokenizer = load_model(tmp_path, hardware)
    checked = 0
    for rec in out:
        assert rec["meta"]["tokens"] == len(rec["meta"]["logprobs"]) == len(rec["meta"]["top_logprobs"])
        prompt = tokenizer(rec["prompt"])["input_ids"]
        assert (prompt[0] == tokenizer.bos_token_id) == bos
        completion = tokenizer(rec["completion"], add_special_tokens=False)["input_ids"]
        if len(completion) != rec["meta"]["tokens"]:
            continue  # a sampled special token (<unk>, <s>) is dropped from the text
        checked += 1
        with torch.no_grad():
            logits = model(torch.tensor([prompt + completion])).logits[0].log_softmax(-1)
        own = [logits[len(prompt) - 1 + t, tok].item() for t, tok in enumerate(completion)]
        assert rec["meta"]["logprobs"] == pytest.approx(own, abs=1e-4)
        top = rec["meta"]["top_logprobs"][0]
        assert len(top) == 3 and list(top.values()) == sorted(top.values(), reverse=True)
    assert checked >= 2
    assert (
        "logprobs"
        not in hf.generate(
            tmp_path, records[:1], {**sampling, "logprobs": None}, plain(cfg.generator), hardware, seed=0
        )[0]["meta"]
    )


def test_hf_top_k_cuts_sampling_to_the_k_likeliest_tokens(tmp_path):
    """top_k=1 at temperature 1 samples the greedy completion every time; without it, an untrained
    model's samples differ (so the cut is what makes them equal)."""
    cfg = compose_cfg([])
    build_tiny(plain(cfg.model), tmp_path, seed=0)
    records = [{"id": 0, "prompt": "12+34:"}, {"id": 1, "prompt": "7+5:"}]
    args = (plain(cfg.generator), plain(cfg.hardware))
    base = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 8, "stop": []}
    greedy = hf.generate(tmp_path, records, {**base, "n": 1, "temperature": 0.0}, *args, seed=0)
    cut = hf.generate(tmp_path, records, {**base, "n": 4, "top_k": 1}, *args, seed=0)
    free = hf.generate(tmp_path, records, {**base, "n": 4}, *args, seed=0)
    for g in greedy:
        assert {c["completion"] for c in cut if c["id"] == g["id"]} == {g["completion"]}
    assert len({c["completion"] for c in free}) > 2
