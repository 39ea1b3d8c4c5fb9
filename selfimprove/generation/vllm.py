"""The vLLM backend: vLLM's offline ``LLM`` engine, started fresh for each call in a spawned
subprocess.

Why a subprocess: the engine keeps its weights and KV cache (on a GPU, most of its memory) until its
process ends, and the train stage that follows needs that memory back. Why spawn: vLLM and CUDA do
not survive ``fork``, and the parent never imports vllm (so CPU runs and ``--help`` stay light).
Why a fresh engine: each iteration generates with a newly trained model folder.

Everything here is translation: our sampling dict -> ``SamplingParams``, the hardware config ->
``LLM(...)`` keyword arguments, a PEFT adapter folder -> ``LoRARequest``, vLLM's outputs -> the
records that every backend returns (:func:`selfimprove.generation.output_records`).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from selfimprove.errors import RunError
from selfimprove.generation import output_records
from selfimprove.models import model_location, model_meta, prompt_texts, resolve_device
from selfimprove.pipeline import Artifact


def generate(
    model: Artifact, records: list[dict], sampling: dict, generator: dict, hardware: dict, seed: int
) -> list[dict]:
    job = engine_job(model, [r["prompt"] for r in records], sampling, hardware, seed)
    shards = data_parallel_jobs(job, hardware)
    if len(shards) == 1:
        return output_records(records, run_in_subprocess(job)["completions"])
    with ProcessPoolExecutor(len(shards), mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(run_engine, shards))
    return output_records(records, [c for r in results for c in r["completions"]])


def data_parallel_jobs(job: dict, hardware: dict) -> list[dict]:
    """``hardware.data_parallel_size`` engines at once, each on its own GPUs
    (``tensor_parallel_size`` each) and a contiguous slice of the prompts. Request seeds follow the
    prompt's position in the whole list, so the samples do not depend on the number of engines."""
    engines = max(1, min(hardware.get("data_parallel_size") or 1, len(job["prompts"])))
    if engines == 1:
        return [job]
    tp, size = hardware["tensor_parallel_size"], -(-len(job["prompts"]) // engines)
    on_gpu = resolve_device(hardware["device"]) == "cuda"
    shards = []
    for k in range(engines):
        env = (
            {"CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in range(k * tp, (k + 1) * tp))} if on_gpu else {}
        )
        if not on_gpu and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:  # one core each, not all on core 0
            env.update(
                VLLM_CPU_OMP_THREADS_BIND=str(k % (os.cpu_count() or 1)), VLLM_CPU_NUM_OF_RESERVED_CPU="0"
            )
        prompts = job["prompts"][k * size : (k + 1) * size]
        shards.append({**job, "prompts": prompts, "first": k * size, "env": env})
    return shards


def engine_job(model: Artifact | Path, prompts: list[str], sampling: dict, hardware: dict, seed: int) -> dict:
    """Everything the child needs, as plain data (it is pickled into a spawned process)."""
    where, load_kwargs = model_location(model)
    engine = {
        "model": where,
        "dtype": str(getattr(hardware["dtype"], "value", hardware["dtype"])),
        "seed": seed,
        "tensor_parallel_size": hardware["tensor_parallel_size"],
        "gpu_memory_utilization": hardware["gpu_memory_utilization"],
        "max_model_len": hardware["max_model_len"],
        "kv_cache_memory_bytes": hardware["kv_cache_memory_bytes"],
        "enforce_eager": hardware["enforce_eager"],
        "disable_log_stats": True,
        **load_kwargs,
    }
    lora = None
    adapter = Path(where) / "adapter_config.json"
    if adapter.exists():  # a PEFT adapter folder: serve its base model with the adapter on top
        # The base's tokenizer: vLLM reads a config.json next to a tokenizer, which an adapter
        # folder lacks (it logs errors and retries); vLLM serves adapters on the base's vocabulary.
        config = json.loads(adapter.read_text())
        engine.update(
            model=config["base_model_name_or_path"],
            enable_lora=True,
            max_lora_rank=lora_rank_slot(config["r"]),
        )
        lora = where
    return {
        "engine": {k: v for k, v in engine.items() if v is not None},
        "prompts": prompts,
        "meta": model_meta(model),  # chat template or not: the child decides with its tokenizer
        "sampling": dict(sampling),
        "seed": seed,
        "lora": lora,
        "local": Path(engine["model"]).exists(),
    }


def lora_rank_slot(rank: int) -> int:
    """vLLM sizes its LoRA buffers by ``max_lora_rank`` from a fixed set (1, 8, 16, ..., 512)."""
    return max(8, 1 << (rank - 1).bit_length())


def run_in_subprocess(job: dict) -> dict:
    """Run :func:`run_engine` in a spawned child and return its result; the child's memory (weights,
    KV cache) is released when it exits. An error in the child is re-raised here."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(run_engine, job).result()


def run_engine(job: dict) -> dict:
    """In the child: start the engine, generate, shut it down. Returns per-prompt lists of
    (text, token count, extra meta) and where the time went."""
    os.environ.update(job.get("env", {}))  # a data-parallel engine's GPUs (set before vllm loads)
    if job["local"]:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder needs no hub look-ups
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # our stage lines are the progress display
    started = time.perf_counter()
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    imported = time.perf_counter()
    try:
        llm = LLM(**job["engine"])
    except Exception as err:  # vLLM's own message, in one line (the child's traceback is in its log)
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:300]
        raise RunError(
            f"the vLLM engine did not start for {job['engine']['model']} ({reason}); try generator=hf, a lower "
            "hardware.gpu_memory_utilization or kv_cache_memory_bytes, or hardware.enforce_eager=true"
        ) from None
    ready = time.perf_counter()
    try:
        s = job["sampling"]
        tokenizer = llm.get_tokenizer()
        # The hf backend ends a completion at EOS or at a generated pad token; so does this one.
        pad = tokenizer.pad_token_id
        stop_ids = [pad] if pad is not None and pad != tokenizer.eos_token_id else None
        params = [  # one seed per request: a shared seed makes identical prompts sample alike
            SamplingParams(
                n=s["n"],
                temperature=s["temperature"],
                top_p=s["top_p"],
                max_tokens=s["max_tokens"],
                stop=list(s.get("stop") or []) or None,
                seed=job["seed"] + job.get("first", 0) + i,
                stop_token_ids=stop_ids,
                logprobs=s.get("logprobs"),
            )
            for i in range(len(job["prompts"]))
        ]
        lora = LoRARequest("adapter", 1, job["lora"]) if job["lora"] else None
        texts, special_tokens = prompt_texts(job["meta"], tokenizer, job["prompts"])  # as the hf backend
        outputs = llm.generate(
            texts,
            params,
            lora_request=lora,
            use_tqdm=False,
            tokenization_kwargs={"add_special_tokens": special_tokens},
        )
        completions = [[completion(c, s.get("logprobs")) for c in out.outputs] for out in outputs]
        generated = time.perf_counter()
    finally:
        llm.llm_engine.engine_core.shutdown()  # without it the child waits forever at exit
    return {
        "completions": completions,
        "seconds": {
            "import": imported - started,
            "engine_start": ready - imported,
            "generate": generated - ready,
            "shutdown": time.perf_counter() - generated,
        },
    }


def completion(c: Any, top_k: int | None) -> tuple[str, int, dict]:
    """One vLLM CompletionOutput as (text, tokens, extra meta), counted as the hf backend counts:
    a final EOS or stop token is not part of the completion (vLLM keeps it in ``token_ids``); the
    tokens of a stop string are."""
    tokens = len(c.token_ids)
    if tokens and c.finish_reason == "stop" and not isinstance(c.stop_reason, str):  # EOS or pad
        tokens -= 1
    extra: dict[str, Any] = {}
    if top_k is not None:
        steps = list(zip(c.token_ids, c.logprobs))[:tokens]
        extra["logprobs"] = [step[token].logprob for token, step in steps]
        if top_k:
            extra["top_logprobs"] = [
                {
                    p.decoded_token: p.logprob
                    for p in sorted(step.values(), key=lambda p: p.rank)
                    if p.rank <= top_k
                }
                for _, step in steps
            ]
    return c.text, tokens, extra
