"""Self-certainty (Kang et al. 2025) of sampled completions: one forward pass of the generating
model over prompt + completion; the score is the mean over completion tokens of KL(uniform || p).
The same pass gives a completion's log-likelihood (TT-SI's relative softmax score)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from selfimprove.engine import progress
from selfimprove.engine.pipeline import Artifact, read_jsonl, stage, write_jsonl
from selfimprove.generation.hf import inference_model
from selfimprove.metrics import fraction, self_certainty
from selfimprove.models import model_meta, prompt_texts


def log_likelihood(logits, ids: list[int]) -> float:
    """log P(completion | prompt): the sum over the completion's tokens of their log-probability,
    ``logits`` [T, V] being the distributions that predicted the T tokens ``ids``."""
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    return float(logp.gather(-1, torch.tensor(ids, device=logp.device)[:, None]).sum())


def certainties(
    model: Artifact | Path,
    records: list[dict],
    hardware: dict,
    batch_size: int = 64,
    advance: Callable[[int], None] = lambda n: None,
    of: Callable | None = None,
) -> list:
    """Self-certainty of each record's completion under ``model`` (None for an empty completion),
    or ``of(logits, token_ids)`` of it (e.g. ``log_likelihood``); ``advance`` hears of each batch's
    records."""
    import torch

    of = of or (lambda logits, ids: self_certainty(logits))
    lm, tokenizer = inference_model(model, hardware)  # kept from generate
    advance(0)  # the bar shows from here (after the model loads)
    # the context the completions were generated in (chat template, BOS) as the generators build it
    texts, special_tokens = prompt_texts(model_meta(model), tokenizer, [r["prompt"] for r in records])
    out: list[float | None] = []
    with torch.inference_mode():
        for start in range(0, len(records), batch_size):
            batch = records[start : start + batch_size]
            prompts = [
                tokenizer(t, add_special_tokens=special_tokens)["input_ids"]
                for t in texts[start : start + batch_size]
            ]
            comps = [tokenizer(r["completion"], add_special_tokens=False)["input_ids"] for r in batch]
            width = max(len(p) + len(c) for p, c in zip(prompts, comps))
            ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
            attn = torch.zeros_like(ids)
            for i, (p, c) in enumerate(zip(prompts, comps)):  # right padding: positions start at 0
                ids[i, : len(p) + len(c)] = torch.tensor(p + c)
                attn[i, : len(p) + len(c)] = 1
            logits = lm(input_ids=ids.to(lm.device), attention_mask=attn.to(lm.device)).logits
            for i, (p, c) in enumerate(zip(prompts, comps)):
                # logits at position t predict token t+1: the completion is predicted by p-1 .. p+c-2
                out.append(of(logits[i, len(p) - 1 : len(p) + len(c) - 1], c) if c else None)
            advance(len(batch))
    return out


@stage(name="certainty", version=1)
def certainty(out: Path, model: Artifact, scored: Artifact, hardware: dict) -> dict:
    """Stage: scored.jsonl with each sample's self-certainty under the model that generated it."""
    records = read_jsonl(scored.file("scored.jsonl"))
    with progress.bar("certainty", len(records), "samples") as advance:
        values = certainties(model, records, hardware, advance=advance)
    write_jsonl(out / "scored.jsonl", [{**r, "certainty": v} for r, v in zip(records, values)])
    known = [v for v in values if v is not None]
    return {"certainty_mean": fraction(known)}
