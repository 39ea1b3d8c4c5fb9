"""The transformers backend: batched ``model.generate`` with left padding."""

from __future__ import annotations

from selfimprove.generation import cut_at_stop, output_records
from selfimprove.models import chat_prompt, load_model, uses_chat_template
from selfimprove.pipeline import Artifact


def generate(
    model: Artifact, records: list[dict], sampling: dict, generator: dict, hardware: dict, seed: int
) -> list[dict]:
    import torch

    lm, tokenizer = load_model(model, hardware)
    # instruct models: the prompt record is the user turn, wrapped by the tokenizer's chat template
    chat = uses_chat_template(model, tokenizer)
    texts = [chat_prompt(tokenizer, r["prompt"]) if chat else r["prompt"] for r in records]
    n, greedy = sampling["n"], sampling["temperature"] == 0
    per_batch = max(1, generator["batch_size"] // n)  # batch_size counts sequences, not prompts
    # Sorting by prompt length keeps padding small; results are put back in record order.
    order = sorted(range(len(records)), key=lambda i: len(texts[i]))
    results: list[list[tuple[str, int]]] = [[] for _ in records]
    torch.manual_seed(seed)
    kwargs = dict(
        max_new_tokens=sampling["max_tokens"],
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
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
    if sampling.get("stop"):
        kwargs.update(stop_strings=list(sampling["stop"]), tokenizer=tokenizer)
    with torch.inference_mode():
        for start in range(0, len(order), per_batch):
            idx = order[start : start + per_batch]
            batch = tokenizer(
                [texts[i] for i in idx],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            )
            batch = batch.to(lm.device)
            seqs = lm.generate(**batch, **kwargs)[:, batch["input_ids"].shape[1] :]
            for row, seq in enumerate(seqs.tolist()):
                tokens = seq
                for stop_id in (tokenizer.eos_token_id, tokenizer.pad_token_id):
                    if stop_id in tokens:
                        tokens = tokens[: tokens.index(stop_id)]
                text = cut_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), sampling.get("stop"))
                results[idx[row // (1 if greedy else n)]].append((text, len(tokens)))
    return output_records(records, results)
