"""Evaluate a pipeline model the reference's way: greedy argmax loop, no KV cache, no padding,
batches grouped by prompt length; both operands exactly L digits; 300 problems per length."""
import random, sys
import torch
from transformers import AutoTokenizer, AutoModelForCausalLM
from selfimprove.models import apply_nope
torch.set_num_threads(1)
path = sys.argv[1]
tok = AutoTokenizer.from_pretrained(path); lm = AutoModelForCausalLM.from_pretrained(path).eval()
apply_nope(lm)
rev = lambda n: str(n)[::-1]
for L in [int(x) for x in sys.argv[2].split(",")]:
    rng = random.Random(12345 * 100 + L)
    probs = [(rng.randint(10 ** (L - 1) if L > 1 else 0, 10**L - 1), rng.randint(10 ** (L - 1) if L > 1 else 0, 10**L - 1)) for _ in range(300)]
    right = 0
    by_len = {}
    for a, b in probs:
        p = [tok.bos_token_id] + tok(f"{rev(a)}+{rev(b)}=", add_special_tokens=False)["input_ids"]
        by_len.setdefault(len(p), []).append((p, rev(a + b)))
    for n, group in by_len.items():
        ids = torch.tensor([p for p, _ in group])
        out = ids
        with torch.no_grad():
            for _ in range(L + 2):
                logits = lm(input_ids=out, use_cache=False).logits[:, -1]
                out = torch.cat([out, logits.argmax(-1, keepdim=True)], 1)
        for row, (_, ans) in zip(out[:, n:].tolist(), group):
            text = tok.decode(row, skip_special_tokens=False)
            right += text.startswith(ans + tok.eos_token)
    print(f"L={L}: {100 * right / 300:.1f} %", flush=True)
