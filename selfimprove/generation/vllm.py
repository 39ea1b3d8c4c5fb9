"""The vLLM backend: vLLM's offline ``LLM`` engine in a spawned subprocess.

``generator.resident: true`` (default): one engine per data-parallel shard serves the whole run and
takes each new model as it comes (:mod:`selfimprove.generation.resident`). ``false``: a fresh
engine per call, in a child that exits after it (what every call cost before: ~45 s on a CPU).

Why a subprocess: the engine keeps its weights and KV cache (on a GPU, most of its memory) until its
process ends, and a train stage needs that memory back. Why spawn: vLLM and CUDA do not survive
``fork``, and the parent never imports vllm (so CPU runs and ``--help`` stay light).

Everything here is translation: our sampling dict -> ``SamplingParams``, the hardware config ->
``LLM(...)`` keyword arguments, a PEFT adapter folder -> ``LoRARequest``, vLLM's outputs -> the
records that every backend returns (:func:`selfimprove.generation.output_records`).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from queue import Empty
from typing import Any

from selfimprove.engine.errors import RunError
from selfimprove.engine.pipeline import Artifact
from selfimprove.generation import output_records
from selfimprove.models import model_location, model_meta, prompt_texts, refuse_nope, resolve_device


def generate(
    model: Artifact,
    records: list[dict],
    sampling: dict,
    generator: dict,
    hardware: dict,
    seed: int,
    advance: Callable[[int], None] = lambda n: None,
) -> list[dict]:
    job = engine_job(model, [r["prompt"] for r in records], sampling, hardware, seed)
    jobs = data_parallel_jobs(job, hardware)
    if generator.get("resident", True):
        from selfimprove.generation import resident

        results = resident.ENGINES.run(jobs, advance)
    else:
        results = run_in_subprocesses(jobs, advance)
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
    refuse_nope(where, "vLLM")
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
    """Run one engine job in a spawned child (bench_generate.py's entry)."""
    return run_in_subprocesses([job])[0]


def run_in_subprocesses(jobs: list[dict], advance: Callable[[int], None] = lambda n: None) -> list[dict]:
    """Run :func:`run_engine` for each job in its own spawned child and return their results; a
    child's memory (weights, KV cache) is released when it exits and its error is re-raised here.
    The children report prompts done through a queue, passed on to ``advance`` as they come."""
    spawn = multiprocessing.get_context("spawn")
    queue = spawn.Queue()  # handed over at the children's start (initargs): the only way to share one
    with ProcessPoolExecutor(len(jobs), mp_context=spawn, initializer=report_to, initargs=(queue,)) as pool:
        futures = [pool.submit(run_engine, job) for job in jobs]
        done = {progress_key(job): 0 for job in jobs}
        while not all(f.done() for f in futures):
            for key, finished in received(queue, timeout=0.2):
                advance(finished - done[key])
                done[key] = finished
        received(queue, timeout=0)  # what is left, so that no child waits to flush it
        results = [f.result() for f in futures]
    advance(sum(len(job["prompts"]) for job in jobs) - sum(done.values()))
    return results


def progress_key(job: dict) -> tuple[int, int]:
    """What a job's progress messages are keyed by: the call that sent it (a resident engine's
    jobs are numbered, so a late message of an earlier call is not counted in the next) and the
    first prompt of its slice (one engine's share of a data-parallel call)."""
    return job.get("call", 0), job.get("first", 0)


def received(queue, timeout: float) -> list:
    """The messages waiting in ``queue`` (waiting up to ``timeout`` seconds for the first)."""
    found = []
    try:
        found.append(queue.get(timeout=timeout) if timeout else queue.get_nowait())
        while True:
            found.append(queue.get_nowait())
    except Empty:
        return found


_progress_queue = None  # in a child: where its generation progress goes


def report_to(queue) -> None:
    global _progress_queue
    _progress_queue = queue


def progress_reporter(key: tuple[int, int], prompts: int):
    """vLLM's ``use_tqdm`` accepts a tqdm class: this one draws nothing and sends (the job's
    :func:`progress_key`, prompts done) to the parent. vLLM counts finished requests (with n > 1,
    samples on some versions), so the share done is converted to prompts."""
    from tqdm import tqdm

    class ToParent(tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "file": open(os.devnull, "w")})
            if self.iterable is None and _progress_queue is not None:
                _progress_queue.put((key, 0))  # generation starts: the parent shows its bar now

        sent = 0

        def update(self, n=1):
            shown = super().update(n)
            # the bar of finished requests has no iterable ("Adding requests" iterates its prompts)
            if self.iterable is None and self.total and _progress_queue is not None:
                finished = min(prompts, round(self.n * prompts / self.total))
                if finished != self.sent:
                    _progress_queue.put((key, finished))
                    self.sent = finished
            return shown

        def close(self):
            super().close()
            self.fp.close()

    return ToParent


def run_engine(job: dict) -> dict:
    """In the child: start the engine, generate, shut it down. Returns per-prompt lists of
    (text, token count, extra meta) and where the time went."""
    started = time.perf_counter()
    prepare_child(job)
    import vllm  # noqa: F401  (timed apart from the engine's start)

    imported = time.perf_counter()
    llm = start_engine(job["engine"])
    ready = time.perf_counter()
    try:
        result = generate_on(llm, job)
        generated = time.perf_counter()
    finally:
        shutdown(llm)
    seconds = {"import": imported - started, "engine_start": ready - imported, "generate": generated - ready}
    return {**result, "seconds": {**seconds, "shutdown": time.perf_counter() - generated}}


def prepare_child(job: dict) -> None:
    """The environment of a child, set before vllm is imported."""
    os.environ.update(job.get("env", {}))  # a data-parallel engine's GPUs (set before vllm loads)
    if job["local"]:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder needs no hub look-ups
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # our stage lines are the progress display


def start_engine(engine: dict):
    """``LLM(**engine)``, its failure said in one line (the child's traceback is in its log)."""
    from vllm import LLM

    try:
        return LLM(**engine)
    except Exception as err:
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:300]
        raise RunError(
            f"the vLLM engine did not start for {engine['model']} ({reason}); try generator=hf, a lower "
            "hardware.gpu_memory_utilization or kv_cache_memory_bytes, or hardware.enforce_eager=true"
        ) from None


def shutdown(llm) -> None:
    llm.llm_engine.engine_core.shutdown()  # without it the child waits forever at exit


def generate_on(llm, job: dict, lora_id: int = 1) -> dict:
    """Generate ``job``'s prompts on a running engine (``lora_id``: the id its adapter, if any, is
    served under). Every request carries its own seed, so the samples do not depend on what the
    engine served before."""
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

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
            **({"top_k": s["top_k"]} if s.get("top_k") is not None else {}),
        )
        for i in range(len(job["prompts"]))
    ]
    lora = LoRARequest(f"adapter-{lora_id}", lora_id, job["lora"]) if job["lora"] else None
    texts, special_tokens = prompt_texts(job["meta"], tokenizer, job["prompts"])  # as the hf backend
    outputs = llm.generate(
        texts,
        params,
        lora_request=lora,
        use_tqdm=progress_reporter(progress_key(job), len(job["prompts"])),
        tokenization_kwargs={"add_special_tokens": special_tokens},
    )
    return {"completions": [[completion(c, s.get("logprobs")) for c in out.outputs] for out in outputs]}


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
