"""Bisection rows 17 and 19-21 (docs/methods/length_gen.md): the reference's batch and steps trained by the
pipeline's own loop (training/sft.py:fine_tune, TRL) on a pipeline run's fixed data, from the pipeline's
initial model (default, or --init_dir) or from the reference's own initial draw (--ref_init 1, --init_seed),
scored by the reference's evaluator (length_gen_bisect.py)."""
import sys, time, argparse, shutil
from pathlib import Path
import torch
torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parent))
import length_gen_bisect as ref
from selfimprove.engine.pipeline import Artifact
from selfimprove.training.sft import fine_tune
from selfimprove.models import load_model

ap = argparse.ArgumentParser()
ap.add_argument("--run", required=True)
ap.add_argument("--steps", type=int, default=3000)
ap.add_argument("--batch", type=int, default=128)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--out", required=True)
ap.add_argument("--init_dir", default=None, help="a pipeline init folder (default RUN/init)")
ap.add_argument("--init_seed", type=int, default=None, help="seed of the reference draw (default --seed)")
ap.add_argument("--ref_init", type=int, default=0, help="1: the reference seed-0 initial weights, rows mapped to the pipeline ids")
a = ap.parse_args()
run = Path(a.run)
out = Path(a.out); shutil.rmtree(out, ignore_errors=True); out.mkdir(parents=True)
logf = open(str(out) + ".log", "a")
def log(m):
    line = f"{time.strftime('%H:%M:%S')} {m}"; print(line, flush=True); logf.write(line + "\n"); logf.flush()
log(f"cmd: {' '.join(sys.argv)}")
train = dict(steps=a.steps, batch_size=a.batch, micro_batch_size=a.batch, lr=1e-3, lr_scheduler="cosine",
             warmup_ratio=0.02, weight_decay=0.0, max_length=64, lora=None)
hw = dict(device="cpu", dtype="float32", num_threads=1, checkpoint_steps=None, gradient_checkpointing=False)
init = Path(a.init_dir) if a.init_dir else run / "init"
if a.ref_init:
    lm, tok = load_model(run / "init", hw)
    ref.CH = {c: tok.convert_tokens_to_ids(c) for c in "0123456789+="}
    draw = a.seed if a.init_seed is None else a.init_seed
    r = ref.build_model("nope", draw)   # vocab 14: the reference's own draw
    src = dict(r.named_parameters())
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if name == "model.embed_tokens.weight":
                for c, pid in ref.CH.items():
                    p[pid] = src[name][{**{str(d): d for d in range(10)}, "+": 10, "=": 11}[c]]
                p[tok.eos_token_id] = src[name][12]
                p[tok.pad_token_id] = src[name][13]
                # BOS and UNK keep the pipeline's own rows (N(0, 0.02), as the reference draws)
            else:
                p.copy_(src[name])
    init = out.parent / (out.name + "_init")
    shutil.rmtree(init, ignore_errors=True)
    lm.save_pretrained(init / "model"); tok.save_pretrained(init / "model")
    log(f"reference seed-{draw} initial weights mapped into {init}")
t0 = time.time()
counts = fine_tune(out, Artifact("init", init, "x"), Artifact("data", run / "warmstart/data", "y"), train, hw, a.seed)
log(f"trained {time.time() - t0:.0f}s {counts}")
model, tok = load_model(out, hw)
ref.CH = {c: tok.convert_tokens_to_ids(c) for c in "0123456789+="}
ref.EOS, ref.PAD, ref.BOS = tok.eos_token_id, tok.pad_token_id, tok.bos_token_id
ref.check_pe(model, "nope", log)
ref.evaluate(model, list(range(1, 9)), 300, log, "trl")
