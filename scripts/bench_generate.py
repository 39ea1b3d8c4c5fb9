"""Generation throughput: raw library calls against our generate backends, side by side in one run.

    python scripts/bench_generate.py                          # tiny model, CPU, sizes 64x1,256x4,512x8
    python scripts/bench_generate.py --model-size 30m         # ~34 M-param Llama (random init, built here)
    python scripts/bench_generate.py --device cuda --model-size 0.5b   # Qwen2.5-0.5B-sized, random init

For each size (prompts x samples) it times, on the same prompts and sampling settings:
  (a) raw ``model.generate`` (load + batched generate + decode)
  (b) our hf backend, ``selfimprove.generation.hf.generate``
  (c) raw ``LLM.generate`` on a warm engine (engine start reported once, separately)
  (d) our vllm backend: a fresh engine in a spawned subprocess per call, shown whole and without
      the engine's import/start/shutdown
and prints samples/s, tokens/s and the ratios (b)/(a), (d)/(c), (d)/(b) of tokens/s. The cold vLLM
baseline "(c) cold" is a raw engine started in a spawned subprocess for one call: (c)'s child's
whole wall time (spawn, import, start, shutdown, exit) less the generate time of the other sizes. Timings on a shared machine are noisy: compare
ratios from one run, not figures across runs. Needs vLLM for (c)/(d); ``--skip-vllm`` runs (a)/(b).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import tempfile
import time
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


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from selfimprove.app import CONF_DIR
    from selfimprove.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return hydra_compose(config_name="config", overrides=overrides)


def build_model(size: str, model_cfg: dict, out: Path) -> int:
    """A model folder (``out/model``) of the given size; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from selfimprove.models import build_tiny, char_tokenizer

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
    model = LlamaForCausalLM(config)
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


# -- (d) our vllm backend ----------------------------------------------------------------------------
def our_vllm(folder: Path, prompts: list[str], sampling: dict, hardware: dict) -> dict:
    from selfimprove.generation import output_records
    from selfimprove.generation.vllm import engine_job, run_in_subprocess

    records = [{"id": i, "prompt": p} for i, p in enumerate(prompts)]
    started = time.perf_counter()  # the body of selfimprove.generation.vllm.generate, with its timings
    result = run_in_subprocess(engine_job(folder, prompts, sampling, hardware, seed=0))
    out = output_records(records, result["completions"])
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "warm_seconds": result["seconds"]["generate"],
        "parts": result["seconds"],
        "samples": len(out),
        "tokens": sum(r["meta"]["tokens"] for r in out),
    }


def rate(r: dict, key: str = "seconds") -> tuple[float, float]:
    return r["samples"] / r[key], r["tokens"] / r[key]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-size", choices=["tiny", *SIZES], default="tiny")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--sizes", default="64x1,256x4,512x8", help="prompts x samples, comma-separated")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--skip-vllm", action="store_true", help="only (a) and (b)")
    args = ap.parse_args()

    cfg = compose(["hardware=gpu" if args.device == "cuda" else "hardware=cpu", "generator=hf"])
    from omegaconf import OmegaConf

    def plain(node):
        return OmegaConf.to_container(node, resolve=True, enum_to_str=True)

    hardware, generator = plain(cfg.hardware), plain(cfg.generator)
    if args.model_size != "tiny":
        hardware["max_model_len"] = hardware["max_model_len"] or 512
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    os.environ.setdefault("VLLM_CACHE_ROOT", str(work / "vllm-cache"))
    params = build_model(args.model_size, plain(cfg.model), work)
    import torch

    print(
        f"model {args.model_size} ({params / 1e6:.2f} M params), device {args.device}, dtype {hardware['dtype']}, "
        f"temperature 1.0, top_p 1.0, max_tokens {args.max_tokens}, torch threads {torch.get_num_threads()}"
    )
    jobs = []
    for prompts_n, samples_n in sizes:
        sampling = {
            "n": samples_n,
            "temperature": 1.0,
            "top_p": 1.0,
            "max_tokens": args.max_tokens,
            "stop": [],
        }
        jobs.append((make_prompts(prompts_n), sampling))

    rows = []
    raw_c = None
    if not args.skip_vllm:
        from selfimprove.generation.vllm import engine_job

        engine = engine_job(work, [], jobs[0][1], hardware, seed=0)["engine"]
        raw_c, child_wall = spawn(raw_vllm_child, engine, jobs)
        generating = sum(r["seconds"] for r in raw_c["results"])
        fixed = child_wall - generating  # spawn, import, start, shutdown, exit: what a cold call adds
        print(
            f"(c) raw engine in a spawned child: {child_wall:.1f}s in all, of which import vllm "
            f"{raw_c['import']:.1f}s, engine start {raw_c['engine_start']:.1f}s, shutdown "
            f"{raw_c['shutdown']:.1f}s, spawn + exit {fixed - raw_c['import'] - raw_c['engine_start'] - raw_c['shutdown']:.1f}s"
        )
    for i, (prompts, sampling) in enumerate(jobs):
        row = {"size": f"{len(prompts)}x{sampling['n']}"}
        row["a"] = raw_hf(work, prompts, sampling, hardware, generator["batch_size"])
        row["b"] = our_hf(work, prompts, sampling, generator, hardware)
        if raw_c is not None:
            row["c"] = raw_c["results"][i]
            cold = fixed + row["c"]["seconds"]
            row["c_cold"] = {**row["c"], "seconds": cold}
            row["d"] = our_vllm(work, prompts, sampling, hardware)
        rows.append(row)
        print(f"  done {row['size']}", flush=True)

    print("\nthroughput (samples/s | tokens/s; seconds):")
    header = f"{'size':>8} | {'(a) raw HF':>22} | {'(b) our hf':>22}"
    if raw_c is not None:
        header += f" | {'(c) raw vLLM warm':>22} | {'(c) raw vLLM cold':>22} | {'(d) our vllm':>22} | {'(d) w/o engine':>22}"
    print(header)
    for r in rows:
        cells = [r["a"], r["b"]] + ([r["c"], r["c_cold"], r["d"]] if raw_c is not None else [])
        line = f"{r['size']:>8} | " + " | ".join(
            f"{rate(c)[0]:7.1f} |{rate(c)[1]:7.0f}; {c['seconds']:5.1f}s" for c in cells
        )
        if raw_c is not None:
            d = r["d"]
            line += f" | {rate(d, 'warm_seconds')[0]:7.1f} |{rate(d, 'warm_seconds')[1]:7.0f}; {d['warm_seconds']:5.1f}s"
        print(line)

    print("\nratios of tokens/s (>= 0.95 = the stage costs at most 5 % over the raw call):")
    print(f"{'size':>8} | (b)/(a) hf | (d)/(c) cold | (d)/(c) warm | (d)/(b) vllm vs hf (whole call)")
    for r in rows:
        line = f"{r['size']:>8} | {rate(r['b'])[1] / rate(r['a'])[1]:10.2f}"
        if raw_c is not None:
            line += (
                f" | {rate(r['d'])[1] / rate(r['c_cold'])[1]:12.2f}"
                f" | {rate(r['d'], 'warm_seconds')[1] / rate(r['c'])[1]:12.2f}"
                f" | {rate(r['d'])[1] / rate(r['b'])[1]:6.2f}"
            )
        print(line)
    if raw_c is not None:
        print(
            "\nwhere (d)'s time goes (seconds): import vllm, engine start, generate, shutdown, rest (spawn, records)"
        )
        for r in rows:
            p = r["d"]["parts"]
            rest = r["d"]["seconds"] - sum(p.values())
            print(
                f"{r['size']:>8} | {p['import']:5.1f} {p['engine_start']:5.1f} {p['generate']:6.1f} "
                f"{p['shutdown']:5.1f} {rest:5.1f} | total {r['d']['seconds']:.1f}"
            )


if __name__ == "__main__":
    main()
