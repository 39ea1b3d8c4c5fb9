"""Self-certainty (Kang et al. 2025) of sampled completions: one forward pass of the generating
model over prompt + completion; the score is the mean over completion tokens of KL(uniform || p)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from selfimprove import progress
from selfimprove.metrics import fraction, self_certainty
from selfimprove.models import load_model, model_meta, prompt_texts
from selfimprove.pipeline import Artifact, read_jsonl, stage, write_jsonl


def certainties(
    model: Artifact | Path,
    records: list[dict],
    hardware: dict,
    batch_size: int = 64,
    advance: Callable[[int], None] = lambda n: None,
) -> list:
    """Self-certainty of each record's completion under ``model`` (None for an empty completion);
    ``advance`` hears of each batch's records."""
    import torch

    lm, tokenizer = load_model(model, hardware)
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
                out.append(self_certainty(logits[i, len(p) - 1 : len(p) + len(c) - 1]) if c else None)
            advance(len(batch))
    return out


@stage(version=1)
def certainty(out: Path, model: Artifact, scored: Artifact, hardware: dict) -> dict:
    """Stage: scored.jsonl with each sample's self-certainty under the model that generated it."""
    records = read_jsonl(scored.file("scored.jsonl"))
    with progress.bar("certainty", len(records), "samples") as advance:
        values = certainties(model, records, hardware, advance=advance)
    write_jsonl(out / "scored.jsonl", [{**r, "certainty": v} for r, v in zip(records, values)])
    known = [v for v in values if v is not None]
    return {"certainty_mean": fraction(known)}
