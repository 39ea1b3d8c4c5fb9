"""One vLLM engine per run (per data-parallel shard), kept in a spawned worker between stages.

A start costs ~45 s on a CPU (import, engine, shutdown) and, on a GPU, a weight load and CUDA graph
capture: the worker starts the engine for the first stage that generates and keeps it. Each job
names the model it wants; the worker takes it the cheapest way that gives the same samples as a
fresh engine (every request carries its own seed, so what the engine served before does not count):

- the model it already serves, or a LoRA adapter on it: as is (an adapter gets a ``LoRARequest``
  with an id of its own per folder, as vLLM serves adapters per request);
- a full fine-tune of it (same config.json, tokenizer and generation config): its weights are
  loaded into the running engine (vLLM's ``reload_weights`` through ``collective_rpc``, as verl and
  OpenRLHF sync weights; on vLLM's CPU build the tied LM head's prepacked copy is rebuilt too:
  ``vllm_worker.py``) and the prefix cache is emptied (it holds the old model's KV);
- anything else (another base model, dtype, max_model_len, LoRA switched on...): a restart, with
  its reason in one line.

The engine is a cache, not state: stages stay fingerprinted and resumable, and a resumed run
starts a new engine. A train stage first calls :func:`selfimprove.generation.release_for_training`,
which puts the engine to sleep where vLLM can (a GPU) and says once where it cannot (a CPU). The
run closes the engines when it ends however it ends (:func:`close`, and ``atexit`` as a backstop);
a worker whose parent died sees its pipe close and shuts its engine down.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import multiprocessing
import os
import signal
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfimprove.engine.errors import RunError

#: files that must be identical for new weights to be loaded into a running engine: the
#: architecture (config.json, less the keys that name the folder) and what the engine reads once
#: at its start (tokenizer, generation defaults such as extra EOS ids)
SAME_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
NAMING_KEYS = ("_name_or_path", "transformers_version")
CLOSE_WAIT_S = 60


# --------------------------------------------------------------------------------------------
# In the worker


@dataclass
class Served:
    """What the worker's engine serves now."""

    llm: Any
    settings: dict  # the LLM(...) arguments other than the model and the seed
    model: str  # the folder (or hub id) it serves; an adapter's base
    files: str  # digest of SAME_FILES in that folder
    weights: int  # when its weights were written (a folder rewritten in place is another model)
    adapters: dict[tuple, int] = field(default_factory=dict)  # (adapter folder, written) -> LoRA id
    sleeping: bool = False


def settings_of(engine: dict) -> dict:
    """The engine arguments that only a restart changes. Not the seed: every request has its own."""
    return {k: v for k, v in engine.items() if k not in ("model", "seed")}


def files_digest(model: str) -> str:
    folder = Path(model)
    digest = hashlib.sha256()
    for name in SAME_FILES:
        path = folder / name
        text = path.read_text() if path.exists() else ""
        if name == "config.json" and text:
            text = json.dumps(
                {k: v for k, v in json.loads(text).items() if k not in NAMING_KEYS}, sort_keys=True
            )
        digest.update(f"{name}\0{text}\0".encode())
    return digest.hexdigest()


def written(folder: str) -> int:
    """The newest weight file's modification time (0 for a hub id)."""
    return max((p.stat().st_mtime_ns for p in Path(folder).glob("*.safetensors")), default=0)


def change_needed(served: Served | None, job: dict) -> tuple[str, str]:
    """(``keep`` | ``reload`` | ``start``, why) for serving ``job`` on ``served``."""
    engine = job["engine"]
    if served is None:
        return "start", f"first model {engine['model']}"
    want = settings_of(engine)
    if want != served.settings:
        changed = sorted(
            k for k in want.keys() | served.settings.keys() if want.get(k) != served.settings.get(k)
        )
        said = ", ".join(f"{k} {served.settings.get(k)} -> {want.get(k)}" for k in changed)
        return "start", f"engine settings changed ({said})"
    if engine["model"] == served.model and written(served.model) == served.weights:
        return "keep", ""
    if not (job["local"] and Path(served.model).exists()):
        return "start", f"another model ({served.model} -> {engine['model']})"
    if files_digest(engine["model"]) != served.files:
        return (
            "start",
            f"{engine['model']} differs from {served.model} in architecture, tokenizer or generation config",
        )
    return "reload", f"weights of {engine['model']}"


def take(served: Served | None, job: dict) -> tuple[Served, str, str]:
    """Serve ``job``'s model: returns the engine and what was done (``keep``, ``reload``, ``start``)
    with why."""
    from selfimprove.generation import vllm, vllm_worker

    if served is not None and served.sleeping:
        served.llm.wake_up()
        served.sleeping = False
    action, why = change_needed(served, job)
    engine = job["engine"]
    if action == "reload":
        try:
            served.llm.collective_rpc("reload_weights_faithfully", kwargs={"weights_path": engine["model"]})
            served.llm.reset_prefix_cache()  # its blocks hold the old weights' keys and values
            served.model, served.weights, served.adapters = engine["model"], written(engine["model"]), {}
        except Exception as err:  # e.g. missing weights: a fresh engine says it in its own words
            action, why = "start", f"loading {engine['model']} into the running engine failed: {err}"[:300]
    if action == "start":
        if served is not None:
            vllm.shutdown(served.llm)
            served = None
        llm = vllm.start_engine({**engine, **sleep_mode(), "worker_extension_cls": vllm_worker.EXTENSION})
        model = engine["model"]
        served = Served(llm, settings_of(engine), model, files_digest(model), written(model))
    return served, action, why


def lora_id(served: Served, job: dict) -> int:
    """The adapter's LoRA id: one per adapter folder and version (vLLM caches adapters by id)."""
    if not job["lora"]:
        return 0
    key = (job["lora"], written(job["lora"]))
    return served.adapters.setdefault(key, len(served.adapters) + 1)


def sleep_mode() -> dict:
    """``enable_sleep_mode`` where vLLM has it (CUDA/ROCm/XPU), nothing on a CPU."""
    from vllm.platforms import current_platform

    return {"enable_sleep_mode": True} if current_platform.is_sleep_mode_available() else {}


def sleep(served: Served | None) -> str:
    """Free the engine's accelerator memory for a train stage (weights offloaded, KV cache
    dropped: level 1); ``wake_up`` before the next job brings them back."""
    from vllm.platforms import current_platform

    if served is None or served.sleeping:
        return "idle"
    if not current_platform.is_sleep_mode_available():
        return (
            f"vLLM cannot sleep on {current_platform.device_type}: the engine keeps its memory while training"
        )
    served.llm.sleep(level=1)
    served.sleeping = True
    return "asleep"


def exit_on_term(*_) -> None:
    raise SystemExit(143)  # unwinds through serve's ``finally``: the engine is shut down


def serve(conn, progress, env: dict) -> None:
    """The worker's loop: jobs in, results out, until ``None`` or the parent's end of the pipe
    closes. Ctrl-C is the parent's to handle (it closes the worker); SIGTERM shuts the engine
    down before the worker exits."""
    from selfimprove.generation import vllm

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, exit_on_term)
    os.environ.update(env)
    vllm.report_to(progress)
    served = None
    try:
        while True:
            try:
                job = conn.recv()
            except EOFError:  # the parent is gone
                return
            if job is None:
                return
            try:
                if job == "sleep":
                    conn.send(("ok", sleep(served)))
                    continue
                vllm.prepare_child(job)
                served, action, why = take(served, job)
                result = vllm.generate_on(served.llm, job, lora_id(served, job))
                conn.send(("ok", {**result, "action": action, "why": why}))
            except Exception as err:  # the parent re-raises it and closes this worker
                ours = isinstance(err, RunError)  # already one line for the user
                conn.send(
                    ("error", ours, str(err) if ours else " ".join(f"{type(err).__name__}: {err}".split()))
                )
    finally:
        if served is not None:
            vllm.shutdown(served.llm)


# --------------------------------------------------------------------------------------------
# In the parent


class Worker:
    """One spawned worker process holding one engine."""

    def __init__(self, env: dict, progress):
        spawn = multiprocessing.get_context("spawn")
        self.env = env
        self.conn, theirs = spawn.Pipe()
        # not a daemon: vLLM starts its own engine-core process, which a daemon may not
        self.process = spawn.Process(target=serve, args=(theirs, progress, env), name="selfimprove-vllm")
        self.process.start()
        theirs.close()  # the worker's end lives in the worker only: our exit closes its pipe
        self.busy = False

    def send(self, message) -> None:
        self.conn.send(message)
        self.busy = True

    def result(self):
        """The worker's reply if it has come, else None; a worker that died raises."""
        if self.conn.poll():
            self.busy = False
            reply = self.conn.recv()
            if reply[0] == "error":
                _, ours, line = reply
                raise RunError(line) if ours else RuntimeError(f"in the vLLM worker: {line}")
            return reply[1]
        if not self.process.is_alive():
            raise RunError(f"the vLLM worker exited with status {self.process.exitcode} during a job")
        return None

    def close(self) -> None:
        """Ask an idle worker to shut its engine down; a busy one (Ctrl-C mid-generation) gets
        SIGTERM, which does the same from inside the generation. SIGKILL if neither ends it."""
        try:
            if self.busy:
                self.process.terminate()
            else:
                self.conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.process.join(CLOSE_WAIT_S)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


class Engines:
    """The run's resident engines, one worker per data-parallel shard, and what they did."""

    def __init__(self):
        self.workers: dict[int, Worker] = {}
        self.progress = None
        self.calls = 0  # numbers each run's jobs: their progress messages carry it
        self.counts: Counter = Counter()
        self.said: set[str] = set()

    def worker(self, shard: int, env: dict) -> Worker:
        known = self.workers.get(shard)
        if known is not None and known.env != env:  # another placement: another process
            known.close()
            known = None
        if known is None:
            if self.progress is None:
                self.progress = multiprocessing.get_context("spawn").Queue()
            known = self.workers[shard] = Worker(env, self.progress)
        return known

    def run(self, jobs: list[dict], advance: Callable[[int], None]) -> list[dict]:
        """Each job on its shard's engine, all at once; progress as the workers report it."""
        from selfimprove.generation.vllm import progress_key, received

        self.calls += 1
        jobs = [{**job, "call": self.calls} for job in jobs]
        workers = [self.worker(k, job.get("env", {})) for k, job in enumerate(jobs)]
        try:
            for w, job in zip(workers, jobs):
                w.send(job)
            results: dict[int, dict] = {}
            done = {progress_key(job): 0 for job in jobs}
            while len(results) < len(jobs):
                for key, finished in received(self.progress, timeout=0.2):
                    if key in done:  # not a late message of an earlier call
                        advance(finished - done[key])
                        done[key] = finished
                for k, w in enumerate(workers):
                    if k not in results:
                        reply = w.result()
                        if reply is not None:
                            results[k] = reply
            received(self.progress, timeout=0)
        except BaseException:
            self.close(quiet=True)  # a failed or interrupted job leaves no engine in an unknown state
            raise
        advance(sum(len(job["prompts"]) for job in jobs) - sum(done.values()))
        for k in sorted(results):
            self.note(k, results[k])
        return [results[k] for k in sorted(results)]

    def note(self, shard: int, result: dict) -> None:
        self.counts[result["action"]] += 1
        if result["action"] == "start":
            print(f"vLLM engine {shard}: started ({result['why']})", flush=True)

    def sleep(self) -> None:
        """Before a train stage: every engine frees its accelerator memory where vLLM can."""
        for w in self.workers.values():
            w.send("sleep")
        for w in list(self.workers.values()):
            reply = None
            while reply is None:
                w.conn.poll(1.0)
                reply = w.result()
            if reply not in ("asleep", "idle") and reply not in self.said:
                self.said.add(reply)
                print(f"note: {reply}", flush=True)

    def close(self, quiet: bool = False) -> dict:
        """Shut every engine down; returns (and, when any ran, says) the run's engine counts."""
        for w in self.workers.values():
            w.close()
        self.workers.clear()
        counts = {k: self.counts[k] for k in ("start", "reload", "keep")}
        if sum(counts.values()) and not quiet:
            print(
                f"vLLM engines: {counts['start']} started, {counts['reload']} weight reloads, "
                f"{counts['keep']} jobs on the model already served",
                flush=True,
            )
        self.counts.clear()
        return counts


ENGINES = Engines()
atexit.register(ENGINES.close, quiet=True)
