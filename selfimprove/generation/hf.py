"""The transformers backend: batched ``model.generate`` with left padding.

The loaded model is kept for the next generation-like stage (generate -> certainty -> eval read the
same model folder): :func:`inference_model` loads a folder once, until another folder is asked
for or a train stage starts (:func:`selfimprove.generation.release_for_training`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from selfimprove.engine.pipeline import Artifact
from selfimprove.generation import cut_at_stop, output_records
from selfimprove.models import load_model, model_meta, prompt_texts


def generate(
    model: Artifact,
    records: list[dict],
    sampling: dict,
    generator: dict,
    hardware: dict,
    seed: int,
    advance: Callable[[int], None] = lambda n: None,
) -> list[dict]:
    """Batches of ``generator.batch_size`` sequences; ``advance`` hears of each batch's prompts."""
    import torch

    lm, tokenizer = inference_model(model, hardware)
    advance(0)  # the bar shows from here: after a download's own bar, before the first batch
    # instruct models: the prompt record is the user turn, wrapped by the tokenizer's chat template
    texts, special_tokens = prompt_texts(model_meta(model), tokenizer, [r["prompt"] for r in records])
    n, greedy = sampling["n"], sampling["temperature"] == 0
    per_batch = max(1, generator["batch_size"] // n)  # batch_size counts sequences, not prompts
    # Sorting by prompt length keeps padding small; results are put back in record order.
    order = sorted(range(len(records)), key=lambda i: len(texts[i]))
    results: list[list[tuple[str, int]]] = [[] for _ in records]
    torch.manual_seed(seed)
    kwargs = dict(
        max_new_tokens=sampling["max_tokens"],
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=stop_token_ids(tokenizer),
    )
    if greedy:
        kwargs.update(do_sample=False)
    else:
        kwargs.update(
            do_sample=True,
            temperature=sampling["temperature"],
            top_p=sampling["top_p"],
            num_return_sequences=n,
        )
        if sampling.get("top_k") is not None:
            kwargs.update(top_k=sampling["top_k"])
    if sampling.get("stop"):
        kwargs.update(stop_strings=list(sampling["stop"]), tokenizer=tokenizer)
    top_k = sampling.get("logprobs")
    if top_k is not None:  # raw logits, before temperature/top-p, as vLLM's default logprobs
        kwargs.update(return_dict_in_generate=True, output_logits=True)
    with torch.inference_mode():
        for start in range(0, len(order), per_batch):
            idx = order[start : start + per_batch]
            batch = tokenizer(
                [texts[i] for i in idx],
                return_tensors="pt",
                padding=True,
                add_special_tokens=special_tokens,
            )
            batch = batch.to(lm.device)
            out = lm.generate(**batch, **kwargs)
            seqs = (out.sequences if top_k is not None else out)[:, batch["input_ids"].shape[1] :]
            scores = token_logprobs(out.logits, seqs, top_k, tokenizer) if top_k is not None else None
            for row, seq in enumerate(seqs.tolist()):
                tokens = seq
                for stop_id in (tokenizer.eos_token_id, tokenizer.pad_token_id):
                    if stop_id in tokens:
                        tokens = tokens[: tokens.index(stop_id)]
                text = cut_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), sampling.get("stop"))
                extra = {}
                if scores is not None:
                    extra["logprobs"] = scores[0][row][: len(tokens)]
                    if top_k:
                        extra["top_logprobs"] = scores[1][row][: len(tokens)]
                results[idx[row // (1 if greedy else n)]].append((text, len(tokens), extra))
            advance(len(idx))
    return output_records(records, results)


_kept: dict = {}  # {"key": what was loaded, "model": (model, tokenizer)}: at most one model


def inference_model(model: Artifact | Path, hardware: dict):
    """(model, tokenizer) for inference, loaded once per model folder: the key is the folder, its
    done-marker (a stage recomputed into the same folder is another model) and the hardware."""
    folder = model.path if isinstance(model, Artifact) else Path(model)
    marker = folder / "_DONE.json"
    key = (
        str(folder.resolve()),
        marker.stat().st_mtime_ns if marker.exists() else None,
        json.dumps(hardware, sort_keys=True, default=str),
    )
    if _kept.get("key") != key:
        forget()  # the old model's memory goes before the new one loads
        _kept.update(key=key, model=load_model(model, hardware))
    return _kept["model"]


def forget() -> None:
    """Drop the kept model (before training, at the end of a run)."""
    _kept.clear()


def stop_token_ids(tokenizer) -> list[int]:
    """A completion ends at EOS or at a generated pad token (which only an untrained model emits);
    both end the sequence during generation, as the vLLM backend's ``stop_token_ids`` do."""
    ids = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    return [i for i in dict.fromkeys(ids) if i is not None]


def token_logprobs(logits, seqs, top_k: int, tokenizer):
    """Per row: the sampled tokens' log-probabilities and (top_k > 0) the top_k alternatives per
    step as {token text: log-probability}. One step at a time: a [rows, steps, vocab] tensor of a
    150k-token vocabulary would not fit in memory."""
    import torch

    rows = seqs.shape[0]
    chosen: list[list[float]] = [[] for _ in range(rows)]
    top: list[list[dict]] = [[] for _ in range(rows)]
    text = {}
    for t, step in enumerate(logits):
        logp = torch.log_softmax(step.float(), dim=-1)
        picked = logp.gather(1, seqs[:, t : t + 1]).squeeze(1).tolist()
        if top_k:
            values, ids = logp.topk(top_k, dim=-1)
            values, ids = values.tolist(), ids.tolist()
        for r in range(rows):
            chosen[r].append(picked[r])
            if top_k:
                for i in ids[r]:
                    if i not in text:
                        text[i] = tokenizer.decode([i])
                top[r].append({text[i]: v for i, v in zip(ids[r], values[r])})
    return chosen, top
