"""Does the tiny no-positional-encoding model learn reversed addition, and one digit further?

A plain AdamW + cosine loop outside TRL on the model and data of ``experiment=length_gen``, to tell
the recipe (BOS, positional encoding, curriculum, operand lengths) from the pipeline. Prints the
loss every 250 steps, then greedy accuracy on 200 held-out problems per length up to two digits
beyond the training lengths, with a few wrong answers. The problems are the pipeline's own (the
task's gold seeds and held-out test sets). One thread; 1500 steps of 1-3 digits took ~9 min on a
loaded machine, ~4 min on a quiet one. The figures in docs/reproductions.md (Length generalisation, "raw loop"):

    python scripts/probe_length_gen.py --bos 1 --max-digits 3 --steps 1500     # 3 digits 100 %
    python scripts/probe_length_gen.py --bos 0 --max-digits 3 --steps 1500     # 3 digits 11.5 %
    python scripts/probe_length_gen.py --bos 1 --max-digits 5 --first-steps 1500 --steps 3500
    python scripts/probe_length_gen.py --bos 1 --max-digits 4 --steps 1500     # 4 digits 97 %, 5: 0 %
    python scripts/probe_length_gen.py --bos 1 --max-digits 4 --first-steps 1000 --steps 2000  # 3.5 %
"""

from __future__ import annotations

import argparse
import math
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from selfimprove.models import build_tiny, char_tokenizer
from selfimprove.tasks.reversed_addition import ReversedAddition

PAD, BOS, EOS = 0, 1, 2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bos", type=int, default=1, help="start every sequence with <s> (1) or not (0)")
    p.add_argument("--theta", type=float, default=float("inf"), help="rope_theta; 0 = true NoPE")
    p.add_argument("--rope-factor", type=float, default=1.0, help="divide the rotary frequencies by this")
    p.add_argument("--max-digits", type=int, default=3, help="train on 1..this many digits")
    p.add_argument("--steps", type=int, default=1500, help="all steps, curriculum included")
    p.add_argument("--first-steps", type=int, default=0, help="curriculum: steps on short problems")
    p.add_argument("--first-digits", type=int, default=3, help="curriculum: their digits at most")
    p.add_argument("--mixed-lengths", type=int, default=0, help="draw the second operand's length")
    p.add_argument("--per-level", type=int, default=2000, help="training problems per length")
    p.add_argument("--full-loss", type=int, default=0, help="loss on the prompt too (1), not only the answer")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(a.seed)
    rng = random.Random(a.seed)
    tok = char_tokenizer()
    # the tiny model of the pipeline (model=tiny), built by the same code; BOS is added below
    shape = dict(hidden_size=a.hidden, num_layers=a.layers, num_heads=4, intermediate_size=4 * a.hidden)
    folder = Path(tempfile.mkdtemp())
    build_tiny({**shape, "max_position_embeddings": 256, "rope_theta": a.theta, "bos": False}, folder, a.seed)
    model = AutoModelForCausalLM.from_pretrained(folder / "model")
    shutil.rmtree(folder)
    # rope_theta=inf leaves one rotary frequency, 1 rad/token: --rope-factor slows it, theta 0 zeroes it
    scale = 0.0 if a.theta == 0 else 1 / a.rope_factor
    if scale != 1:
        for module in model.modules():
            if hasattr(module, "inv_freq"):
                module.inv_freq.mul_(scale) if scale else module.inv_freq.zero_()  # theta 0 gave inf
                module.original_inv_freq = module.inv_freq

    # the pipeline's own problems: gold seeds per length (held-out problems excluded) and test sets
    task = ReversedAddition(
        {
            "name": "reversed_addition",
            "seed": a.seed,
            "test_seed": 1234,
            "seed_levels": list(range(1, a.max_digits + 1)),
            "seed_per_level": a.per_level,
            "seed_lengths": "mixed" if a.mixed_lengths else "equal",
            "pad_answers": False,
            "train_per_iteration": 0,
            "test_levels": list(range(1, a.max_digits + 3)),
            "test_per_level": 200,
        }
    )
    by_level = [(r["meta"]["level"], (r["prompt"], r["completion"])) for r in task.seed_data()]

    def prompt_ids(prompt: str) -> list[int]:
        return ([BOS] if a.bos else []) + tok(prompt, add_special_tokens=False)["input_ids"]

    def example(prompt: str, answer: str) -> tuple[list[int], list[int]]:
        ids, target = prompt_ids(prompt), tok(answer, add_special_tokens=False)["input_ids"] + [EOS]
        if a.full_loss:  # language modelling of the whole text: predicting '=' needs the operand lengths
            return ids + target, ids + target
        return ids + target, [-100] * len(ids) + target  # loss on the answer only, as TRL's SFT

    def schedule(total: int):
        optimizer = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
        warm = int(0.02 * total)

        def factor(s: int) -> float:
            return (
                s / max(1, warm) if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm)))
            )

        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    pool = [problem for _, problem in by_level]
    short = [problem for level, problem in by_level if level <= a.first_digits]
    optimizer, scheduler = schedule(a.first_steps or a.steps)
    started = time.time()
    for step in range(a.steps):
        if a.first_steps and step == a.first_steps:  # a new stage: fresh optimizer, as TRL's
            optimizer, scheduler = schedule(a.steps - a.first_steps)
        rows = [example(*rng.choice(short if step < a.first_steps else pool)) for _ in range(a.batch)]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.tensor([x + [PAD] * (width - len(x)) for x, _ in rows])
        labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in rows])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in rows])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        if step % 250 == 0 or step == a.steps - 1:
            print(f"step {step} loss {loss.item():.3f} {time.time() - started:.0f}s", flush=True)

    model.eval()

    def accuracy(digits: int) -> float:
        records = task.test_sets()[str(digits)]
        correct, shown = 0, 0
        for start in range(0, len(records), 100):
            problems = [(r["prompt"], r["answer"]) for r in records[start : start + 100]]
            encoded = [prompt_ids(q) for q, _ in problems]
            width = max(map(len, encoded))
            ids = torch.tensor([[PAD] * (width - len(e)) + e for e in encoded])
            with torch.no_grad():
                out = model.generate(
                    input_ids=ids,
                    attention_mask=(ids != PAD).long(),
                    max_new_tokens=digits + 3,
                    do_sample=False,
                    pad_token_id=PAD,
                    eos_token_id=EOS,
                )
            for (question, answer), tokens in zip(problems, out[:, width:]):
                got = tok.decode(tokens, skip_special_tokens=True).strip()
                correct += got == answer
                if got != answer and shown < 3:
                    shown += 1
                    print(f"{digits} digits: {question} want {answer} got {got}")
        return correct / len(records)

    print(vars(a))
    print({d: accuracy(d) for d in range(1, a.max_digits + 3)}, f"{time.time() - started:.0f}s", flush=True)


if __name__ == "__main__":
    main()
