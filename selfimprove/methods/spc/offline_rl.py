"""SPC's learning rule as the paper's released code has it (``method.update_rule=offline_rl``):
offline RL on the game's +1/-1 outcomes, plus the NLL of the round-0 SFT data.

The released code (chen-judge/SPC ``scripts/rl_critic.sh``) runs ``src/offline_rl.py`` with
``--lm_kl_coeff 0.1 --lm_sft_coeff 0.15`` on the rounds' RL data plus the round-0 SFT data; its
trainer is SPAG's (Cheng et al. 2024, Linear95/SPAG ``trainers.py:OfflineWeightedPolicyTrainer``,
``clip_range`` 0.2 in ``arguments.py``). For one batch of rows (prompt, completion, reward, sft):

    lp      = mean log-prob of the completion's tokens (EOS included) under the policy
    lp_ref  = the same under the reference: the round's start model, frozen
    ratio   = exp(lp - lp_ref)
    A       = reward - kl_coeff * (lp - lp_ref)            (not detached: as in SPAG's code)
    ppo     = -min(A * ratio, A * clip(ratio, 1 - clip, 1 + clip)), mean over the game rows
    nll     = -lp, mean over the replayed (sft) rows
    loss    = ppo + sft_coeff * nll

``offline_rl_loss`` is that formula on tensors; ``offline_rl_trainer`` is TRL's SFTTrainer (its
tokenization, completion-only labels, checkpoints) with ``compute_loss`` replaced by it; the
``spc_offline_rl`` stage is ``training.sft.fine_tune`` (the sft stage's body) with that trainer and a
frozen copy of the model.
"""

from __future__ import annotations

import copy
from pathlib import Path

from selfimprove.engine.pipeline import Artifact, stage
from selfimprove.training.launch import accelerated
from selfimprove.training.sft import fine_tune


def mean_logprob(logits, labels):
    """Per row: the mean log-probability of the labelled tokens (labels -100 are left out), the
    logits at position t predicting the label at t + 1 (SPAG's ``compute_lm_loglikeli``)."""
    import torch

    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != -100
    token = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def offline_rl_loss(logprob, ref_logprob, reward, sft, kl_coeff: float, sft_coeff: float, clip: float):
    """(loss, stats) of one batch: the PPO-clip loss of the game rows (``sft`` 0) with advantage
    ``reward - kl_coeff * (logprob - ref_logprob)``, plus ``sft_coeff`` times the NLL of the replayed
    rows (``sft`` 1); each part is a mean over its own rows, 0 when the batch has none. ``stats``:
    ppo, nll, kl (mean log pi - log pi_ref of the game rows) and ratio_outside (the fraction of game
    rows whose ratio is outside [1 - clip, 1 + clip])."""
    import torch

    game = 1.0 - sft
    kl = logprob - ref_logprob.detach()
    ratio = kl.exp()
    clipped = ratio.clamp(1 - clip, 1 + clip)
    advantage = reward - kl_coeff * kl
    ppo = -torch.minimum(advantage * ratio, advantage * clipped)
    ppo = (ppo * game).sum() / game.sum() if game.sum() > 0 else ppo.sum() * 0
    nll = (-logprob * sft).sum() / sft.sum() if sft.sum() > 0 else logprob.sum() * 0
    rows = game.sum().clamp(min=1)
    stats = {
        "ppo": ppo.item(),
        "nll": nll.item(),
        "kl": ((kl * game).sum() / rows).item(),
        "ratio_outside": ((((ratio - 1).abs() > clip).float() * game).sum() / rows).item(),
    }
    return ppo + sft_coeff * nll, stats


def offline_rl_trainer(ref_model, kl_coeff: float, sft_coeff: float, clip: float, **kwargs):
    """TRL's SFTTrainer whose loss is ``offline_rl_loss`` against ``ref_model`` (frozen). The rows'
    ``reward`` and ``sft`` columns travel through TRL's tokenization and collator to the loss."""
    import torch
    from trl import SFTTrainer

    class OfflineRLTrainer(SFTTrainer):
        # the loss is a mean over the micro-batch: the Trainer divides it by the accumulation steps
        loss_is_scaled_for_ga = False

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.ref_model = ref_model.to(self.accelerator.device).eval().requires_grad_(False)
            collate = self.data_collator
            self.data_collator = lambda rows: {
                **collate(rows),
                "reward": torch.tensor([float(r["reward"]) for r in rows]),
                "sft": torch.tensor([float(r["sft"]) for r in rows]),
            }

        def train(self, *args, **kwargs):
            result = super().train(*args, **kwargs)
            del self.ref_model  # not saved, and its memory is free before the save
            return result

        def _set_signature_columns_if_needed(self):  # keep the two columns the loss reads
            super()._set_signature_columns_if_needed()
            self._signature_columns = [*self._signature_columns, "reward", "sft"]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ids = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
            logprob = mean_logprob(model(**ids).logits, inputs["labels"])
            with torch.no_grad():
                ref_logprob = mean_logprob(self.ref_model(**ids).logits, inputs["labels"])
            loss, stats = offline_rl_loss(
                logprob, ref_logprob, inputs["reward"], inputs["sft"], kl_coeff, sft_coeff, clip
            )
            for key, value in stats.items():
                self._metrics["train"][f"rl/{key}"].append(value)
            return (loss, None) if return_outputs else loss

    return OfflineRLTrainer(**kwargs)


@stage(name="spc_offline_rl", version=1, resumable=True)
@accelerated
def offline_rl(
    out: Path, model: Artifact, data: Artifact, train: dict, rl: dict, hardware: dict, seed: int
) -> dict:
    """Stage: offline RL of ``model`` on ``data``'s rows (prompt, completion, ``reward``, ``sft``)
    with ``rl``'s kl_coeff, sft_coeff and clip; the reference is ``model`` itself, frozen. Writes
    model/ and model_meta.json, as ``training.sft.sft`` does (the same body, another trainer)."""

    def make_trainer(lm, **kwargs):
        # the copy is taken before peft wraps lm in place: the round's start model
        return offline_rl_trainer(
            copy.deepcopy(lm), rl["kl_coeff"], rl["sft_coeff"], rl["clip"], model=lm, **kwargs
        )

    return fine_tune(
        out,
        model,
        data,
        train,
        hardware,
        seed,
        make_trainer=make_trainer,
        columns=("reward", "sft"),
        counts=lambda kept: {"game_rows": sum(not r["sft"] for r in kept)},
    )
