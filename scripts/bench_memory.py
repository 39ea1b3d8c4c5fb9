"""Estimated vs measured peak memory of CPU training, side by side in one run.

    python scripts/bench_memory.py                 # every case (~50 s on 2 cores)
    python scripts/bench_memory.py tiny_sft llama30m_sft

Each case trains a randomly initialised Llama for a few steps with TRL's trainer, configured as the
project does (``selfimprove.training.sft.trainer_args``: use_cpu, float32, gradient checkpointing
off, fused AdamW), on examples whose tokenized length is exactly ``seq_len``. It runs in a fresh
subprocess, which reports its peak RSS (``resource.getrusage`` ru_maxrss) minus its RSS just before
the model is created -- after the imports and a warm-up run of a 10k-parameter model, so Python,
torch, TRL and their one-off initialisation are not counted. The table sets that against
``selfimprove.memory.training_peak``: its total, and its live tensors alone (total less the
allocator's ``overhead``), which the measurement matches when glibc returns freed memory at once:

    MALLOC_MMAP_THRESHOLD_=131072 python scripts/bench_memory.py

docs/memory.md records the results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY = dict(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512, vocab_size=100)
LLAMA_30M = dict(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1376, vocab_size=8192)
MICRO = dict(hidden_size=32, num_layers=1, num_heads=1, intermediate_size=32, vocab_size=100)  # warm-up
# name: model shape, trainer, micro-batch (pairs for DPO), tokens per sequence, optimizer steps
CASES = {
    "tiny_sft": dict(model=TINY, trainer="sft", batch=64, seq_len=128, steps=3),  # the CPU demo's warm start
    "llama30m_sft": dict(model=LLAMA_30M, trainer="sft", batch=8, seq_len=256, steps=3),
    "llama30m_dpo": dict(model=LLAMA_30M, trainer="dpo", batch=4, seq_len=256, steps=3),
}


def arch_of(model: dict):
    """The estimator's view of a case's model: the shape of the very config it is trained with."""
    from selfimprove.memory import Arch

    return Arch.from_hf_config(llama_config(model))


def estimate(case: dict) -> dict[str, int]:
    """selfimprove.memory's estimate for a case (float32 on CPU, one process)."""
    from selfimprove.memory import training_peak

    return training_peak(
        arch_of(case["model"]),
        trainer=case["trainer"],
        micro_batch=case["batch"],
        seq_len=case["seq_len"],
        dtype="float32",
        device="cpu",
    )


def rss_bytes() -> int:
    """Resident set size now, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss is in KiB on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def llama_config(model: dict, tokenizer=None):
    """A tied-embedding Llama of the case's shape, every head a key/value head (the tokenizer gives
    its special token ids when one is built)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=model["vocab_size"],
        hidden_size=model["hidden_size"],
        intermediate_size=model["intermediate_size"],
        num_hidden_layers=model["num_layers"],
        num_attention_heads=model["num_heads"],
        num_key_value_heads=model["num_heads"],
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id if tokenizer else None,
        eos_token_id=tokenizer.eos_token_id if tokenizer else None,
        pad_token_id=tokenizer.pad_token_id if tokenizer else None,
    )


def project_args(case: dict, out: Path) -> dict:
    """The project's TrainingArguments (selfimprove.training.sft.trainer_args) for a CPU float32 run."""
    from selfimprove.training.sft import trainer_args

    train = dict(
        steps=case["steps"],
        batch_size=case["batch"],
        micro_batch_size=case["batch"],
        lr=1e-4,
        lr_scheduler="constant",
        warmup_ratio=0.0,
        weight_decay=0.0,
    )
    hardware = {"device": "cpu", "dtype": "float32", "checkpoint_steps": None}
    return trainer_args(train, hardware, out, seed=0)


def sft_trainer(case: dict, model, tokenizer, out: Path):
    """SFTTrainer on pre-tokenized examples of exactly seq_len random token ids."""
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rows = case["batch"] * case["steps"]
    ids = torch.randint(4, case["model"]["vocab_size"], (rows, case["seq_len"])).tolist()
    config = SFTConfig(**project_args(case, out), max_length=case["seq_len"], packing=False)
    dataset = Dataset.from_list([{"input_ids": row} for row in ids])
    return SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)


def dpo_trainer(case: dict, model, tokenizer, out: Path):
    """DPOTrainer on text pairs whose prompt+chosen and prompt+rejected are seq_len characters each
    (the character tokenizer: one token per character, TRL appends one EOS to each completion);
    the reference is a copy of the model, as TRL loads when the project passes none."""
    import copy
    import random

    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from selfimprove.models import CHARACTERS

    rng = random.Random(0)
    letters = [c for c in CHARACTERS if c.isalnum()]
    text = lambda n: "".join(rng.choice(letters) for _ in range(n))  # noqa: E731
    half = case["seq_len"] // 2
    rows = [
        {"prompt": text(half), "chosen": text(half - 1), "rejected": text(half - 1)}
        for _ in range(case["batch"] * case["steps"])
    ]
    config = DPOConfig(**project_args(case, out), beta=0.1, max_length=case["seq_len"])
    reference = copy.deepcopy(model).eval()
    return DPOTrainer(
        model=model,
        ref_model=reference,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )


def train(case: dict, tokenizer) -> tuple[object, float]:
    """Build the case's model and train it; returns (model, seconds of training)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(case["model"], tokenizer))
    make = sft_trainer if case["trainer"] == "sft" else dpo_trainer
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make(case, model, tokenizer, Path(tmp))
        started = time.perf_counter()
        trainer.train()
    return model, time.perf_counter() - started


def measure_in_process(case: dict) -> dict[str, int]:
    """Train one case here and return its peak RSS above the RSS before the model existed.

    A 10k-parameter model is trained the same way first: the first trainer of a process imports and
    initialises ~150 MB of libraries (accelerate, datasets, oneDNN) whatever the model's size; that
    warm-up moves them into the baseline, as the imports are."""
    import transformers

    from selfimprove.models import char_tokenizer

    transformers.logging.set_verbosity_error()
    tokenizer = char_tokenizer()
    train({**case, "model": MICRO, "batch": 1, "seq_len": 8, "steps": 2}, tokenizer)
    before = rss_bytes()
    model, seconds = train(case, tokenizer)
    parameters = sum(p.numel() for p in model.parameters())
    return {
        "measured": peak_rss_bytes() - before,
        "baseline": before,
        "parameters": parameters,
        "train_seconds": round(seconds, 1),
    }


def measure(case: dict, threads: int | None = None) -> dict[str, int]:
    """Measure one case in a fresh Python process (ru_maxrss only ever grows within a process)."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TRL_EXPERIMENTAL_SILENCE="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(case)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"measuring {case} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(names: list[str]) -> None:
    from selfimprove.memory import format_bytes

    names = names or list(CASES)
    header = (
        f"{'case':14} {'params':>7} {'tokens':>6} {'estimate':>10} {'measured':>10} {'meas/est':>8} "
        f"{'tensors':>10} {'meas/tens':>9}  components"
    )
    print(header)
    for name in names:
        case = CASES[name]
        est = estimate(case)
        got = measure(case)
        sequences = case["batch"] * (2 if case["trainer"] == "dpo" else 1)
        tensors = est["total"] - est["overhead"]  # live tensors only, without the allocator's share
        parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in est.items() if v and k != "total")
        print(
            f"{name:14} {got['parameters'] / 1e6:6.2f}M {sequences * case['seq_len']:>6} "
            f"{format_bytes(est['total']):>10} {format_bytes(got['measured']):>10} "
            f"{got['measured'] / est['total']:8.2f} {format_bytes(tensors):>10} {got['measured'] / tensors:9.2f}  {parts}  "
            f"[bytes: est {est['total']}, measured {got['measured']}; train {got['train_seconds']} s]",
            flush=True,
        )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(measure_in_process(json.loads(sys.argv[2]))))
    else:
        main(sys.argv[1:])
