"""Backend choice and the hf backend's extras (runs in the main venv, where vLLM is absent)."""

from __future__ import annotations

import importlib.util
import os
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


def test_hf_keeps_the_model_between_generation_stages_until_training_or_another_model(tmp_path):
    """generate -> certainty -> eval on one folder load it once; the samples are those of a fresh
    load; another folder, a recomputed stage (new done-marker) or a train stage let it go."""
    from selfimprove.generation import release_for_training
    from selfimprove.scoring.certainty import certainties

    cfg = compose_cfg([])
    hardware, generator = plain(cfg.hardware), plain(cfg.generator)
    build_tiny(plain(cfg.model), tmp_path / "a", seed=0)
    build_tiny(plain(cfg.model), tmp_path / "b", seed=1)
    (tmp_path / "a" / "_DONE.json").write_text("{}")
    records = [{"id": 0, "prompt": "12+34="}, {"id": 1, "prompt": "7+5="}]
    sampling = {"n": 2, "temperature": 1.0, "top_p": 1.0, "max_tokens": 6, "stop": []}

    hf.forget()
    first = hf.generate(tmp_path / "a", records, sampling, generator, hardware, seed=3)
    loaded = hf.inference_model(tmp_path / "a", hardware)[0]
    certainties(tmp_path / "a", first, hardware)
    again = hf.generate(tmp_path / "a", records, sampling, generator, hardware, seed=3)
    assert hf.inference_model(tmp_path / "a", hardware)[0] is loaded, "one load for the three stages"
    assert [r["completion"] for r in again] == [r["completion"] for r in first]

    hf.generate(tmp_path / "b", records, sampling, generator, hardware, seed=3)
    assert hf.inference_model(tmp_path / "b", hardware)[0] is not loaded
    fresh = hf.generate(tmp_path / "a", records, sampling, generator, hardware, seed=3)
    assert [r["completion"] for r in fresh] == [r["completion"] for r in first], "a fresh load samples alike"

    reloaded = hf.inference_model(tmp_path / "a", hardware)[0]
    marker = tmp_path / "a" / "_DONE.json"
    os.utime(marker, ns=(marker.stat().st_atime_ns, marker.stat().st_mtime_ns + 10**9))  # recomputed
    assert hf.inference_model(tmp_path / "a", hardware)[0] is not reloaded
    release_for_training()
    assert hf._kept == {}, "a train stage gets the memory back"


def test_resident_engine_keeps_reloads_or_restarts_and_says_why(tmp_path):
    """The resident vLLM worker's choice for each new model, decided from the model folders alone
    (no vLLM needed): same model or another seed -> keep; a fine-tune of it -> load its weights;
    another architecture, dtype or a hub model -> restart, naming what changed."""
    from selfimprove.generation.resident import Served, change_needed, files_digest, settings_of, written
    from selfimprove.generation.vllm import engine_job

    cfg = compose_cfg([])
    hardware = plain(cfg.hardware)
    build_tiny(plain(cfg.model), tmp_path / "base", seed=0)
    build_tiny(plain(cfg.model), tmp_path / "tuned", seed=1)  # same config and tokenizer, new weights
    build_tiny(
        {**plain(cfg.model), "num_layers": plain(cfg.model)["num_layers"] + 1}, tmp_path / "deeper", seed=0
    )

    def job(folder, seed=0, **hw):
        return engine_job(tmp_path / folder, ["1+1="], {}, {**hardware, **hw}, seed)

    start = job("base")
    model = start["engine"]["model"]
    served = Served(None, settings_of(start["engine"]), model, files_digest(model), written(model))
    assert change_needed(None, start)[0] == "start"
    assert change_needed(served, job("base", seed=5)) == ("keep", "")
    assert change_needed(served, job("tuned")) == ("reload", f"weights of {tmp_path / 'tuned' / 'model'}")
    action, why = change_needed(served, job("deeper"))
    assert action == "start" and "architecture" in why
    assert change_needed(served, job("base", dtype="bfloat16")) == (
        "start",
        "engine settings changed (dtype float32 -> bfloat16)",
    )
    weights = next((tmp_path / "base" / "model").glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # rewritten
    assert change_needed(served, job("base")) == ("reload", f"weights of {model}")
    hub = {**start, "engine": {**start["engine"], "model": "Qwen/Qwen2.5-0.5B"}, "local": False}
    assert change_needed(served, hub) == ("start", f"another model ({served.model} -> Qwen/Qwen2.5-0.5B)")
