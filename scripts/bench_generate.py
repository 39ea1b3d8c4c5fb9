"""Generation throughput, in three parts (``--parts 1,2,3``, default all), each printed as a table:

  1. vLLM vs HF: samples/s and tokens/s of raw library calls and of our generate backends on the
     same prompts and sampling settings;
  2. decode tokens/s against the memory-bandwidth bound (every decode step reads every weight once);
  3. the resident vLLM engine against an engine per stage over simulated iterations.

    python scripts/bench_generate.py                          # tiny model, CPU, all parts
    python scripts/bench_generate.py --parts 1,2 --skip-vllm  # transformers only (no vLLM needed)
    python scripts/bench_generate.py --model-size 30m         # ~34 M-param Llama (random init, built here)
    pip install -e ".[vllm]" && python scripts/bench_generate.py --preset h100 2>&1 | tee bench_h100.log

Part 1, for each size (prompts x samples):
  (a) raw ``model.generate`` (load + batched generate + decode)
  (b) our hf backend, ``selfimprove.generation.hf.generate``
  (c) raw ``LLM.generate`` on a warm engine (engine start reported once, separately)
  (d) our vllm backend with a fresh engine in a spawned subprocess per call
      (``generator.resident=false``), shown whole and without the engine's import/start/shutdown
  (e) our vllm backend on the resident engine (``generator.resident=true``, the default), warm: what
      every stage of a run gets after the first (the engine's start is reported once, separately)
and prints samples/s, tokens/s and the ratios (b)/(a), (d)/(c), (d)/(b), (e)/(b) of tokens/s, then
vLLM vs HF in samples/s: (e) against (b). The cold vLLM baseline "(c) cold" is a raw engine started
in a spawned subprocess for one call: (c)'s child's whole wall time (spawn, import, start, shutdown,
exit) less the generate time of the other sizes. ``--resident-only`` skips (c) and (d), which start
an engine each. Timings on a shared machine are noisy: compare ratios from one run, not figures
across runs.

Part 2 generates ``--decode-batches`` sequences at once (one sample per prompt) with each backend and
compares decode tokens/s with the memory-bandwidth bound: a decode step reads every weight, so one
sequence makes at most bandwidth / (parameters x dtype bytes) tokens/s and a batch of B at most B
times that. Measured per sequence = batch tokens/s / B (prefill of the ~10-token prompts included).
The peak bandwidth comes from a table of GPU names (``PEAK_BANDWIDTH_GBS``) or ``--bandwidth-gbs``;
on a CPU the bound is unknown unless ``--bandwidth-gbs`` is given.

Part 3 runs ``--iterations`` of generate -> train -> eval through our vllm backend, once with an
engine per stage (``generator.resident=false``) and once with the resident engine (``true``). The
"train" writes a new model folder: the same config and tokenizer, every weight scaled (new weights at
the cost of a real train's write, no training). It prints each mode's wall time, their ratio and the
engine starts, weight reloads and jobs kept: for the resident engine, its worker's own counters; for
an engine per stage, one start per call (each child starts and shuts down its engine). The resident
engine loads each new model's weights into the running engine (1 start, a reload per train; on vLLM's
CPU build with the tied LM head repacked, ``generation/vllm_worker.py``).

``--preset h100`` (one H100, about 8 minutes; NOT YET RUN on a GPU, so the time is an estimate): all
three parts on the random-init 0.5B config in bfloat16 (494 M params, 0.99 GB of weights), part 1 at
64x8 (512 samples, one hf batch), part 2 at 1 and 256 sequences, part 3 with 3 iterations of generate
64x4 and eval 64x1, 128 new tokens each, part 1 resident-only. Estimate, in seconds:
  setup (imports, the 0.5B model built on the CPU and saved)                              ~15
  hf: (a), (b) and part 2's two hf rows, 4 calls of 128 steps x ~30 ms (transformers'
      decode step for 24 layers, launch-bound) + a 3 s load                              ~25
  parts 1-2 vLLM: one resident engine (~37 s: spawn and import ~8, start ~25 with CUDA
      graphs, shutdown ~4) + the first torch.compile of the model (~20) + generation      ~65
  part 3, engine per stage: 6 fresh engines x ~37 + 3 compiles of the new model folders
      x ~20 (the hash that keys vLLM 0.32's compile cache includes the model path)
      + 3 trains x ~3 (read, scale, write 1 GB) + 6 generations x ~1                      ~300
  part 3, resident: one engine ~37 + 3 x (sleep, wake, reload ~4) + trains + generation  ~65
  total                                                                                   ~470 (7.8 min)
Basis of the engine figures: vLLM's startup logs for 1-8 B models on an H100 in vLLM's issue
tracker (engine init 12-34 s, torch.compile 8-19 s, CUDA graph capture 10-17 s), plus the process
spawns and imports around them (on this 2-core VM: import vllm 10-13 s, and the engine's own process
most of the 24 s engine start of an enforce_eager CPU engine whose init took 3 s). 8 engine starts
and 4 compiles are ~80 % of the estimate, so that is where a first run may differ. Each part prints
its own wall time and the run its total; if it overruns, run ``--parts 1,2`` and ``--parts 3`` apart.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import multiprocessing
import os
import random
import shutil
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# Sizes other than tiny: Llama configs with the character tokenizer, random init (no download).
# 0.5b has Qwen2.5-0.5B's shapes (hidden 896, 24 layers, 14 heads / 2 KV heads, MLP 4864, QKV bias,
# 151936-token embedding); it is a Llama rather than qwen2 because transformers 5 forces Qwen2's own
# tokenizer on a qwen2 model type. Generation cost is the same.
SIZES = {
    "30m": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                intermediate_size=2048),
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, attention_bias=True, vocab_size=151936),
}  # fmt: skip


#: peak memory bandwidth in GB/s (vendor spec sheets) by GPU name: the first row whose words all
#: appear in ``torch.cuda.get_device_name()`` (e.g. "NVIDIA H100 80GB HBM3", the SXM card) wins
PEAK_BANDWIDTH_GBS = [
    ("GH200", 4000),
    ("H200", 4800),
    ("H100 NVL", 3900),
    ("H100 PCIe", 2000),
    ("H100", 3350),  # SXM
    ("A100 80GB PCIe", 1935),
    ("A100 80GB", 2039),  # SXM, "NVIDIA A100-SXM4-80GB"
    ("A100", 1555),  # 40 GB
    ("L40S", 864),
    ("L40", 864),
    ("A10G", 600),
    ("L4", 300),
    ("RTX 4090", 1008),
]
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

#: --preset: argument defaults sized to a time budget (the module docstring has the estimate)
PRESETS = {
    "h100": dict(
        device="cuda",
        model_size="0.5b",
        sizes="64x8",
        max_tokens=128,
        decode_batches="1,256",
        stage_sizes="64x4,64x1",
        iterations=3,
        resident_only=True,
    ),
}


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from selfimprove.app import CONF_DIR
    from selfimprove.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return hydra_compose(config_name="config", overrides=overrides)


def build_model(size: str, model_cfg: dict, out: Path, dtype: str) -> int:
    """A model folder (``out/model``) of the given size, saved in ``dtype`` (the tiny model: float32);
    returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from selfimprove.models import build_tiny, char_tokenizer, torch_dtype

    if size == "tiny":
        return build_tiny(model_cfg, out, seed=0)["parameters"]
    tokenizer = padded_tokenizer(char_tokenizer(), SIZES[size].get("vocab_size", 0))
    config = LlamaConfig(
        **{"vocab_size": len(tokenizer), **SIZES[size]},
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch_dtype(dtype))
    model.save_pretrained(out / "model", safe_serialization=True)
    tokenizer.save_pretrained(out / "model")
    return sum(p.numel() for p in model.parameters())


def padded_tokenizer(tokenizer, vocab_size: int):
    """The character tokenizer with filler tokens up to ``vocab_size``, so that every id a random
    model samples from its embedding decodes (never produced when encoding)."""
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    for i in range(len(vocab), vocab_size):
        vocab[f"<x{i}>"] = i
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        **{k: getattr(tokenizer, k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")},
        padding_side="left",
        model_max_length=4096,
    )


def make_prompts(count: int) -> list[str]:
    rng = random.Random(0)
    return [f"{rng.randint(100, 999)}+{rng.randint(100, 999)}: " for _ in range(count)]


# -- (a) raw model.generate ------------------------------------------------------------------------
def raw_hf(folder: Path, prompts: list[str], sampling: dict, hardware: dict, batch_size: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selfimprove.models import resolve_device, torch_dtype

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder / "model", padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(folder / "model", dtype=torch_dtype(hardware["dtype"]))
    model.to(resolve_device(hardware["device"])).eval()
    loaded = time.perf_counter()
    n, tokens, samples = sampling["n"], 0, 0
    stops = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    torch.manual_seed(0)
    with torch.inference_mode():
        per_batch = max(1, batch_size // n)  # sequences per call, as the hf backend batches
        for start in range(0, len(prompts), per_batch):
            batch = tokenizer(
                prompts[start : start + per_batch],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            )
            batch = batch.to(model.device)
            out = model.generate(
                **batch,
                eos_token_id=stops,  # the stop rule of both backends: EOS or a generated pad token
                do_sample=True,
                temperature=sampling["temperature"],
                top_p=sampling["top_p"],
                num_return_sequences=n,
                max_new_tokens=sampling["max_tokens"],
                pad_token_id=tokenizer.pad_token_id,
            )[:, batch["input_ids"].shape[1] :]
            texts = tokenizer.batch_decode(out, skip_special_tokens=True)
            samples += len(texts)
            # tokens before the first stop token of each row (after it, generate pads)
            stopped = (out == stops[0]) | (out == stops[1])
            tokens += int((stopped.cumsum(dim=1) == 0).sum())
    return {
        "seconds": time.perf_counter() - started,
        "load": loaded - started,
        "samples": samples,
        "tokens": tokens,
    }


# -- (b) our hf backend ------------------------------------------------------------------------------
def our_hf(folder: Path, prompts: list[str], sampling: dict, generator: dict, hardware: dict) -> dict:
    from selfimprove.generation import hf

    records = [{"id": i, "prompt": p} for i, p in enumerate(prompts)]
    started = time.perf_counter()
    out = hf.generate(folder, records, sampling, generator, hardware, seed=0)
    return {
        "seconds": time.perf_counter() - started,
        "samples": len(out),
        "tokens": sum(r["meta"]["tokens"] for r in out),
    }


# -- (c) raw LLM.generate, one warm engine for every size, in a spawned child ------------------------
def raw_vllm_child(engine: dict, jobs: list[tuple[list[str], dict]]) -> dict:
    started = time.perf_counter()
    from vllm import LLM, SamplingParams

    imported = time.perf_counter()
    llm = LLM(**engine)
    ready = time.perf_counter()
    results = []
    pad = llm.get_tokenizer().pad_token_id
    for prompts, s in jobs:
        # the settings our stage passes: one seed per request, a generated pad token ends a sample
        params = [
            SamplingParams(
                n=s["n"],
                temperature=s["temperature"],
                top_p=s["top_p"],
                max_tokens=s["max_tokens"],
                seed=i,
                stop_token_ids=[pad],
            )
            for i in range(len(prompts))
        ]
        t = time.perf_counter()
        outs = llm.generate(
            prompts, params, use_tqdm=False, tokenization_kwargs={"add_special_tokens": False}
        )
        results.append(
            {
                "seconds": time.perf_counter() - t,
                "samples": sum(len(o.outputs) for o in outs),
                # counted as our stage counts: a final EOS or pad is not part of the completion
                "tokens": sum(
                    len(c.token_ids) - (c.finish_reason == "stop") for o in outs for c in o.outputs
                ),
            }
        )
    t = time.perf_counter()
    llm.llm_engine.engine_core.shutdown()
    return {
        "import": imported - started,
        "engine_start": ready - imported,
        "shutdown": time.perf_counter() - t,
        "results": results,
    }


def spawn(fn, *args):
    """Run fn in a spawned child; returns (result, wall seconds from spawn to the child's exit)."""
    started = time.perf_counter()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        result = pool.submit(fn, *args).result()
    return result, time.perf_counter() - started


# -- (d) and (e): our vllm backend -------------------------------------------------------------------
def our_vllm(
    folder: Path, prompts: list[str], sampling: dict, hardware: dict, resident: bool, seed: int = 0
) -> dict:
    """The body of ``selfimprove.generation.vllm.generate`` (one engine), keeping what its result
    says: a fresh engine per call (``resident=False``: its import/start/generate/shutdown seconds)
    or the run's resident engine (``True``: whether the worker kept, reloaded or started it)."""
    from selfimprove.generation import output_records
    from selfimprove.generation import resident as engines
    from selfimprove.generation.vllm import engine_job, run_in_subprocess

    records = [{"id": i, "prompt": p} for i, p in enumerate(prompts)]
    started = time.perf_counter()
    job = engine_job(folder, prompts, sampling, hardware, seed)
    if resident:
        (result,) = engines.ENGINES.run([job], advance=lambda n: None)
    else:
        result = run_in_subprocess(job)
    out = output_records(records, result["completions"])
    return {
        "seconds": time.perf_counter() - started,
        "parts": result.get("seconds"),  # a fresh engine's import, engine_start, generate, shutdown
        "action": result["action"] if resident else "start",  # a fresh engine is started per call
        "samples": len(out),
        "tokens": sum(r["meta"]["tokens"] for r in out),
    }


def rate(r: dict) -> tuple[float, float]:
    """(samples/s, tokens/s)."""
    return r["samples"] / r["seconds"], r["tokens"] / r["seconds"]


def sampling_of(samples: int, max_tokens: int, temperature: float = 1.0) -> dict:
    return {"n": samples, "temperature": temperature, "top_p": 1.0, "max_tokens": max_tokens, "stop": []}


def free_hf_memory() -> None:
    """Drop the hf backend's kept model and the accelerator's cached blocks: a vLLM engine next
    takes ``gpu_memory_utilization`` of the memory for itself."""
    import torch

    from selfimprove.generation import hf

    hf.forget()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- part 1 --------------------------------------------------------------------------------------------
def part1_vllm_baselines(work: Path, rows: list[dict], jobs: list, hardware: dict) -> str:
    """(c) and (d) for every size; returns the line saying where (c)'s fixed time went."""
    from selfimprove.generation.vllm import engine_job

    engine = engine_job(work, [], jobs[0][1], hardware, seed=0)["engine"]
    raw_c, child_wall = spawn(raw_vllm_child, engine, jobs)
    fixed = child_wall - sum(r["seconds"] for r in raw_c["results"])  # what a cold call adds
    for row, (prompts, sampling), c in zip(rows, jobs, raw_c["results"]):
        row["c"], row["c_cold"] = c, {**c, "seconds": fixed + c["seconds"]}
        row["d"] = our_vllm(work, prompts, sampling, hardware, resident=False)
        row["d_warm"] = {**row["d"], "seconds": row["d"]["parts"]["generate"]}
        print(f"  done (c), (d) {row['size']}", flush=True)
    return (
        f"(c) raw engine in a spawned child: {child_wall:.1f}s in all, of which import vllm "
        f"{raw_c['import']:.1f}s, engine start {raw_c['engine_start']:.1f}s, shutdown "
        f"{raw_c['shutdown']:.1f}s, spawn + exit {fixed - raw_c['import'] - raw_c['engine_start'] - raw_c['shutdown']:.1f}s"
    )


def print_part1(rows: list[dict], resident_start: float | None, notes: list[str]) -> None:
    vllm_mode = (
        f"our vllm backend on the resident engine (generator.resident=true), warm; its start took {resident_start:.1f}s"
        if resident_start is not None
        else "none (--skip-vllm)"
    )
    print(f"\n== Part 1: vLLM vs HF throughput; vLLM: {vllm_mode} ==")
    for note in notes:
        print(note)
    names = {
        "a": "(a) raw HF",
        "b": "(b) our hf",
        "c": "(c) raw vLLM warm",
        "c_cold": "(c) raw vLLM cold",
        "d": "(d) our vllm per call",
        "d_warm": "(d) w/o engine",
        "e": "(e) our vllm resident",
    }
    shown = [k for k in names if k in rows[0]]
    print("throughput, each cell: samples/s, tokens/s, seconds")
    print(f"{'size':>8} | " + " | ".join(f"{names[k]:>22}" for k in shown))
    for r in rows:
        cells = (f"{rate(r[k])[0]:7.1f} {rate(r[k])[1]:7.0f} {r[k]['seconds']:5.1f}s" for k in shown)
        print(f"{r['size']:>8} | " + " | ".join(cells))

    ratios = [("(b)/(a) hf", "b", "a"), ("(d)/(c) cold", "d", "c_cold"), ("(d)/(c) warm", "d_warm", "c")]
    ratios += [("(d)/(b) whole call", "d", "b"), ("(e)/(b) vLLM vs HF", "e", "b"), ("(e)/(c) warm", "e", "c")]
    ratios = [q for q in ratios if q[1] in rows[0] and q[2] in rows[0]]
    print("ratios of tokens/s (>= 0.95 = the stage costs at most 5 % over the raw call):")
    print(f"{'size':>8} | " + " | ".join(f"{name:>18}" for name, _, _ in ratios))
    for r in rows:
        print(
            f"{r['size']:>8} | " + " | ".join(f"{rate(r[x])[1] / rate(r[y])[1]:18.2f}" for _, x, y in ratios)
        )

    if "d" in rows[0]:
        print(
            "where (d)'s time goes (seconds): import vllm, engine start, generate, shutdown, rest (spawn, records)"
        )
        for r in rows:
            p = r["d"]["parts"]
            rest = r["d"]["seconds"] - sum(p.values())
            print(
                f"{r['size']:>8} | {p['import']:5.1f} {p['engine_start']:5.1f} {p['generate']:6.1f} "
                f"{p['shutdown']:5.1f} {rest:5.1f} | total {r['d']['seconds']:.1f}"
            )
    if "e" in rows[0]:
        for r in rows:
            (e, _), (b, _) = rate(r["e"]), rate(r["b"])
            print(
                f"vLLM vs HF at {r['size']}: {e:.1f} vs {b:.1f} samples/s = {e / b:.2f}x "
                f"(tokens/s {rate(r['e'])[1] / rate(r['b'])[1]:.2f}x)"
            )


# -- part 2 --------------------------------------------------------------------------------------------
def peak_bandwidth(device: str, override: float | None) -> tuple[float | None, str]:
    """(GB/s or None, where it came from)."""
    if override:
        return override, "--bandwidth-gbs"
    if device != "cuda":
        return None, f"unknown on {device}: pass --bandwidth-gbs"
    import torch

    name = torch.cuda.get_device_name()
    gbs = bandwidth_of(name)
    if gbs is None:
        return None, f"unknown for {name!r} (not in PEAK_BANDWIDTH_GBS): pass --bandwidth-gbs"
    return gbs, f"{name}, from the table of peak bandwidths"


def bandwidth_of(gpu_name: str) -> float | None:
    """The first row of PEAK_BANDWIDTH_GBS whose words all appear in the GPU's name."""
    for words, gbs in PEAK_BANDWIDTH_GBS:
        if all(w.lower() in gpu_name.lower() for w in words.split()):
            return gbs
    return None


def print_part2(rows: list[dict], params: int, dtype: str, bandwidth: tuple[float | None, str]) -> None:
    gbs, source = bandwidth
    weight_bytes = params * DTYPE_BYTES[dtype]
    per_seq = gbs * 1e9 / weight_bytes if gbs else None
    print("\n== Part 2: decode tokens/s against the memory-bandwidth bound ==")
    print(
        f"weights read per decode step: {params / 1e6:.2f} M params x {DTYPE_BYTES[dtype]} bytes ({dtype}) = "
        f"{weight_bytes / 1e9:.4f} GB; peak bandwidth: {f'{gbs:g} GB/s ({source})' if gbs else source}"
    )
    print(
        "bound: "
        + (f"{per_seq:,.0f} tokens/s per sequence, x sequences for the batch" if per_seq else "unknown")
    )
    print(
        f"{'backend':>8} | {'sequences':>9} | {'tokens':>7} | {'seconds':>7} | {'batch tok/s':>11} | "
        f"{'bound':>11} | {'per seq tok/s':>13} | {'bound':>9} | measured/bound"
    )
    for r in rows:
        batch = r["tokens"] / r["seconds"]
        bound = f"{per_seq * r['sequences']:11,.0f}" if per_seq else f"{'unknown':>11}"
        line = (
            f"{r['backend']:>8} | {r['sequences']:>9} | {r['tokens']:>7} | {r['seconds']:7.2f} | {batch:11,.1f} | "
            f"{bound} | {batch / r['sequences']:13,.1f} | {f'{per_seq:9,.0f}' if per_seq else 'unknown':>9} | "
        )
        print(line + (f"{batch / (per_seq * r['sequences']):.4f}" if per_seq else "unknown"))


# -- part 3 --------------------------------------------------------------------------------------------
def simulated_train(model: Path, out: Path, scale: float) -> Path:
    """A train stage's output without the training: a new model folder with the same config and
    tokenizer files and every weight multiplied by ``scale``."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(model, out, ignore=shutil.ignore_patterns("*.safetensors"))
    for weights in (model / "model").glob("*.safetensors"):
        tensors = {k: t * scale for k, t in load_file(weights).items()}
        save_file(tensors, out / "model" / weights.name, metadata={"format": "pt"})
    return out


def simulated_run(base: Path, out: Path, args, hardware: dict, resident: bool) -> dict:
    """``args.iterations`` x (generate, train, eval) through our vllm backend; returns the wall time
    (the engines' shutdown included), the train steps' share and the engine counts."""
    from selfimprove.generation import release_for_training
    from selfimprove.generation import resident as engines

    (gen_prompts, gen_n), (eval_prompts, eval_n) = args.stage_sizes
    generate = (make_prompts(gen_prompts), sampling_of(gen_n, args.max_tokens))
    evaluate = (make_prompts(eval_prompts), sampling_of(eval_n, args.max_tokens, temperature=0.0))
    actions, train_seconds, model = Counter(), 0.0, base
    started = time.perf_counter()
    for i in range(1, args.iterations + 1):
        actions[our_vllm(model, *generate, hardware, resident, seed=i)["action"]] += 1
        t = time.perf_counter()
        release_for_training()  # as a run's train stage does: the resident engine sleeps where it can
        model = simulated_train(model, out / f"iter_{i:02d}", scale=1.0 + 0.01 * i)
        train_seconds += time.perf_counter() - t
        actions[our_vllm(model, *evaluate, hardware, resident, seed=i)["action"]] += 1
    # the resident worker's own counters (and its "vLLM engines: ..." line); closing is timed, as
    # each fresh engine's shutdown is
    counts = engines.ENGINES.close() if resident else {k: actions[k] for k in ("start", "reload", "keep")}
    return {"seconds": time.perf_counter() - started, "train": train_seconds, **counts}


def print_part3(runs: dict, args) -> None:
    (gp, gn), (ep, en) = args.stage_sizes
    print(
        f"\n== Part 3: resident engine vs an engine per stage, {args.iterations} iterations of generate "
        f"{gp}x{gn} -> train (new folder, weights scaled) -> eval {ep}x{en}, max_tokens {args.max_tokens} =="
    )
    print(
        f"{'mode':>34} | {'wall s':>7} | {'train s':>7} | {'engine starts':>13} | {'weight reloads':>14} | jobs kept"
    )
    labels = {False: "engine per stage (resident=false)", True: "resident engine (resident=true)"}
    for resident, r in runs.items():
        print(
            f"{labels[resident]:>34} | {r['seconds']:7.1f} | {r['train']:7.1f} | {r['start']:>13} | "
            f"{r['reload']:>14} | {r['keep']}"
        )
    ratio = runs[True]["seconds"] / runs[False]["seconds"]
    print(f"resident / per stage wall time: {ratio:.2f} ({1 / ratio:.2f}x faster)")


# -- the run -------------------------------------------------------------------------------------------
def parse_list(text: str, allowed=None) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1 or (allowed and not set(values) <= set(allowed)):
        choose = f"choose from {', '.join(map(str, allowed))}" if allowed else "positive integers"
        raise argparse.ArgumentTypeError(f"{text!r}: {choose}, comma-separated")
    return values


def parse_sizes(text: str) -> list[tuple[int, int]]:
    try:
        sizes = [tuple(int(x) for x in s.split("x")) for s in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or any(len(s) != 2 or min(s) < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"{text!r}: prompts x samples, comma-separated (e.g. 64x1,256x4)")
    return sizes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", type=lambda t: parse_list(t, (1, 2, 3)), default="1,2,3", help="e.g. 1,3")
    ap.add_argument(
        "--preset", choices=sorted(PRESETS), help="sizes for a time budget; flags given override it"
    )
    ap.add_argument("--model-size", choices=["tiny", *SIZES], default="tiny")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--sizes", type=parse_sizes, default="64x1,256x4,512x8", help="part 1: prompts x samples")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--skip-vllm", action="store_true", help="parts 1 and 2 with transformers only")
    ap.add_argument("--resident-only", action="store_true", help="part 1 without (c) and (d)")
    ap.add_argument("--decode-batches", type=parse_list, default="1,64", help="part 2: sequences at once")
    ap.add_argument("--bandwidth-gbs", type=float, help="part 2: peak memory bandwidth, overriding the table")
    ap.add_argument("--iterations", type=int, default=3, help="part 3: simulated iterations")
    ap.add_argument("--stage-sizes", type=parse_sizes, default="32x4,32x1", help="part 3: generate,eval")
    preset = ap.parse_known_args(argv)[0].preset
    if preset:
        ap.set_defaults(**PRESETS[preset])
    args = ap.parse_args(argv)
    if len(args.stage_sizes) != 2 or args.iterations < 1:
        ap.error("part 3 needs --iterations >= 1 and --stage-sizes GENERATE,EVAL (e.g. 32x4,32x1)")
    if 3 in args.parts and args.skip_vllm:
        ap.error("part 3 compares vLLM engines: drop --skip-vllm, or run --parts 1,2")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            ap.error("--device cuda (and --preset h100) needs a CUDA GPU; torch sees none here")
    if not args.skip_vllm and importlib.util.find_spec("vllm") is None:
        from selfimprove.generation import vllm_install_hint

        ap.error(
            f"vLLM is not installed ({vllm_install_hint(args.device == 'cuda')}); or --skip-vllm --parts 1,2"
        )
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    began = time.perf_counter()
    cfg = compose(["hardware=gpu" if args.device == "cuda" else "hardware=cpu", "generator=hf"])
    from omegaconf import OmegaConf

    def plain(node):
        return OmegaConf.to_container(node, resolve=True, enum_to_str=True)

    hardware, generator = plain(cfg.hardware), plain(cfg.generator)
    if args.model_size != "tiny":
        hardware["max_model_len"] = hardware["max_model_len"] or 512
    work = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    os.environ.setdefault("VLLM_CACHE_ROOT", str(work / "vllm-cache"))
    params = build_model(args.model_size, plain(cfg.model), work, hardware["dtype"])
    import torch

    print(
        f"model {args.model_size} ({params / 1e6:.2f} M params), device {args.device}"
        f"{f' ({torch.cuda.get_device_name()})' if args.device == 'cuda' else ''}, dtype {hardware['dtype']}, "
        f"temperature 1.0, top_p 1.0, max_tokens {args.max_tokens}, torch threads {torch.get_num_threads()}, "
        f"parts {','.join(map(str, args.parts))}"
    )
    jobs = [(make_prompts(p), sampling_of(n, args.max_tokens)) for p, n in args.sizes]
    rows = [{"size": f"{p}x{n}"} for p, n in args.sizes]
    decode = []
    use_vllm = not args.skip_vllm

    # transformers first: no vLLM engine holds the accelerator's memory meanwhile
    started = time.perf_counter()
    if 1 in args.parts:
        for row, (prompts, sampling) in zip(rows, jobs):
            row["a"] = raw_hf(work, prompts, sampling, hardware, generator["batch_size"])
            row["b"] = our_hf(work, prompts, sampling, generator, hardware)
            print(f"  done (a), (b) {row['size']}", flush=True)
    one_each = sampling_of(1, args.max_tokens)  # part 2: one sample per prompt, `b` sequences at once
    for b in args.decode_batches if 2 in args.parts else []:
        decode.append(
            {"backend": "hf", "sequences": b, **our_hf(work, make_prompts(b), one_each, generator, hardware)}
        )
    free_hf_memory()

    notes, resident_start = [], None
    if use_vllm and 1 in args.parts and not args.resident_only:
        notes.append(part1_vllm_baselines(work, rows, jobs, hardware))
    if use_vllm and (1 in args.parts or 2 in args.parts):
        from selfimprove.generation import resident as engines

        first = our_vllm(work, make_prompts(1), sampling_of(1, 1), hardware, resident=True)
        resident_start = first["seconds"]  # the engine's start, with a 1-token job
        if 1 in args.parts:
            for row, (prompts, sampling) in zip(rows, jobs):
                row["e"] = our_vllm(work, prompts, sampling, hardware, resident=True)
        for b in args.decode_batches if 2 in args.parts else []:
            result = our_vllm(work, make_prompts(b), one_each, hardware, resident=True)
            decode.append({"backend": "vllm", "sequences": b, **result})
        engines.ENGINES.close()
    if 1 in args.parts:
        print_part1(rows, resident_start, notes)
    if 2 in args.parts:
        print_part2(decode, params, hardware["dtype"], peak_bandwidth(args.device, args.bandwidth_gbs))
    if 1 in args.parts or 2 in args.parts:
        print(
            f"parts {','.join(str(p) for p in args.parts if p < 3)} took {time.perf_counter() - started:.0f}s"
        )

    if 3 in args.parts:
        started = time.perf_counter()
        runs = {
            resident: simulated_run(work, work / f"part3-{resident}", args, hardware, resident)
            for resident in (False, True)
        }
        print_part3(runs, args)
        print(f"part 3 took {time.perf_counter() - started:.0f}s")
    print(f"whole run {time.perf_counter() - began:.0f}s")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
