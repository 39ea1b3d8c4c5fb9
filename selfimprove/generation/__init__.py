"""Generation: one interface, backends chosen by ``generator.backend``.

Every backend takes the same inputs (a model artifact, prompt records, a sampling config) and
returns the same output records, so every method works with either::

    {"id", "prompt", "completion", "answer", "meta": {..., "sample": j, "tokens": n}}
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from selfimprove.pipeline import Artifact, read_jsonl, stage, write_jsonl
from selfimprove.registry import ConfigError, Registry

BACKENDS = Registry(
    "generator backend",
    {"hf": "selfimprove.generation.hf:generate", "vllm": "selfimprove.generation.vllm:generate"},
)


def resolve_backend(generator: dict, hardware: dict, say=print) -> str:
    """``auto`` picks vLLM when a GPU and vLLM are both present, else transformers."""
    name = generator["backend"]
    if name != "auto":
        BACKENDS.names()  # unknown names fail in BACKENDS.get with the allowed list
        return name
    import torch

    has_vllm = importlib.util.find_spec("vllm") is not None
    picked = "vllm" if (torch.cuda.is_available() and hardware["device"] != "cpu" and has_vllm) else "hf"
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


def sample(
    model: Artifact, records: list[dict], sampling: dict, generator: dict, hardware: dict, seed: int
) -> list[dict]:
    """Generate ``sampling['n']`` completions per record with the configured backend."""
    check_sampling(sampling)
    backend = BACKENDS.get(resolve_backend(generator, hardware, say=lambda _: None))
    return backend(model, records, sampling, generator, hardware, seed)


def output_records(records: list[dict], completions: list[list[tuple[str, int]]]) -> list[dict]:
    """Flatten per-prompt (text, token count) lists into output records (shared by backends)."""
    out = []
    for rec, outs in zip(records, completions):
        for j, (text, tokens) in enumerate(outs):
            meta = {**rec.get("meta", {}), "sample": j, "tokens": tokens}
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


@stage(version=1)
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
