"""Reward model: a Bradley-Terry loss on preference pairs, trained on the backbone's scalar ``score`` head.

One forward over ``cat([chosen, rejected])`` (both padded to one width) gives one score per sequence,
read at its last real token from the attention mask (:func:`ftbench.backbone.last_token_scores`: with
pad = EOS a pad-id search would read the wrong token). The loss is TRL ``RewardTrainer``'s
(:func:`ftbench.objectives.losses.reward_loss`)::

    mean_pairs(-logsigmoid(r_c - r_r - margin)) + center_rewards_coefficient * mean((r_c + r_r)^2)

* ``margin``: per pair, from the batch's ``margin`` column when the data module gives one (a
  ``(pairs,)`` float tensor, Llama 2's preference-strength margin). ``ftbench.data.PreferenceData`` does
  not give one today, so the margin is 0 unless a custom data module or collator adds ``margin``.
* ``center_rewards_coefficient`` (Eisenstein et al. 2023): pulls the scores towards mean 0, so that the
  model's rewards are comparable between runs (TRL suggests 0.01).

Metrics, under TRL's names, for ``train/`` (batch values; ``loss`` every step, the others every
``trainer.log_every_n_steps`` steps and at the last), ``val/`` and ``test/`` (over the whole set): ``loss``, ``accuracy`` (fraction of pairs with ``r_c > r_r``, strict: a tie is wrong),
``margin`` (mean ``r_c - r_r``), ``mean_reward``, ``min_reward``, ``max_reward`` (over chosen and
rejected scores together; in evaluation the minimum and maximum of the whole set, where TRL logs the
mean of per-batch extremes). Evaluation also logs ``pairwise_accuracy`` (= ``accuracy``), the name DPO
uses for the same quantity (its ``accuracy`` is exact match), so that one report column compares both.

The score head is new (randomly initialised, ``num_labels=1``); it trains under every tuner and is
saved with what the tuner trained (LoRA and other peft methods: as peft's ``modules_to_save``;
adapters and freeze: with the trained weights; full: in the whole model).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torchmetrics import MaxMetric, MinMetric

from ftbench.backbone import last_token_scores
from ftbench.data.base import IGNORE_INDEX
from ftbench.objectives.base import Objective
from ftbench.objectives.losses import reward_loss, reward_metrics

#: what a padded position holds in each concatenated field (ids: any id, the mask hides it)
_PAD = {"input_ids": 0, "attention_mask": 0, "labels": IGNORE_INDEX}


def concatenate_pairs(batch: dict[str, Any], fields: tuple[str, ...] = ("input_ids", "attention_mask")) -> dict[str, torch.Tensor]:
    """``chosen_{field}`` on top of ``rejected_{field}`` for each field, right-padded to one width:
    ``(2 * pairs, T)``, rows ``[:pairs]`` chosen and ``[pairs:]`` rejected, for one forward."""
    out = {}
    for f in fields:
        c, r = batch[f"chosen_{f}"], batch[f"rejected_{f}"]
        width = max(c.shape[1], r.shape[1])
        c, r = (F.pad(t, (0, width - t.shape[1]), value=_PAD.get(f, 0)) for t in (c, r))
        out[f] = torch.cat([c, r], dim=0)
    return out


def pair_memory_batch(batch_size: int, seq_len: int, device: str | torch.device = "meta") -> dict[str, torch.Tensor]:
    """``batch_size`` pairs whose chosen and rejected sides are ``seq_len`` real tokens, every one
    trained: the batch ``ftbench estimate`` steps (``memory_batch``) for the pairwise objectives."""
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
    batch = {}
    for side in ("chosen", "rejected"):
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": torch.ones_like(ids),
                      f"{side}_labels": torch.zeros_like(ids)})
    return batch


class Reward(Objective):
    """Bradley-Terry reward model on the scalar score head (TRL ``RewardTrainer``'s loss and metrics)."""

    name = "reward"
    head = "score"

    def __init__(self, center_rewards_coefficient: Optional[float] = None, **kwargs):
        """
        Args:
            center_rewards_coefficient: Weight of ``mean((r_c + r_r)^2)`` in the loss, which centres
                the scores on 0 (TRL: 0.01 is typical). Default: no term. A per-pair ``margin`` comes
                from the data (a ``margin`` batch key) when it has one.
        """
        super().__init__(**kwargs)
        if center_rewards_coefficient is not None and not center_rewards_coefficient >= 0:
            raise ValueError(f"objective reward: center_rewards_coefficient must be >= 0, got {center_rewards_coefficient}")
        self.center_rewards_coefficient = center_rewards_coefficient

    def memory_batch(self, batch_size: int, seq_len: int, device: str | torch.device = "meta") -> dict[str, torch.Tensor]:
        """``ftbench estimate``'s batch: ``batch_size`` pairs of two ``seq_len``-token sequences."""
        return pair_memory_batch(batch_size, seq_len, device)

    # ------------------------------------------------------------------ scores
    def scores(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(chosen scores, rejected scores, the concatenated inputs), scores in float32, ``(pairs,)``."""
        cat = concatenate_pairs(batch)
        s = last_token_scores(self.model, cat["input_ids"], cat["attention_mask"]).float()
        n = batch["chosen_input_ids"].shape[0]
        return s[:n], s[n:], cat

    @staticmethod
    def margin(batch: dict[str, Any], like: torch.Tensor) -> Optional[torch.Tensor]:
        m = batch.get("margin")
        if m is None:
            return None
        return torch.as_tensor(m, dtype=like.dtype, device=like.device).reshape(like.shape)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        chosen, rejected, cat = self.scores(batch)
        loss = reward_loss(chosen, rejected, self.margin(batch, chosen), self.center_rewards_coefficient)
        extra = self.tuner.regularization(self.model)  # e.g. AdaLoRA's orthogonality penalty
        if extra is not None:
            loss = loss + extra
        self.check_finite(loss, batch_idx)
        n = chosen.shape[0]
        self.log("train/loss", loss, on_step=True, prog_bar=True, batch_size=n)
        if self.should_log_step():  # every log_every_n_steps steps and the last
            self.log_dict({f"train/{k}": v for k, v in reward_metrics(chosen.detach(), rejected.detach()).items()},
                          on_step=True, batch_size=n)
        # every real token of both sequences feeds the scores
        return self.step_output(loss, cat["attention_mask"].sum(), cat["input_ids"], cat["attention_mask"])

    # ------------------------------------------------------------------ evaluation
    def metric(self, name: str):
        # the set's extremes, not the mean of per-batch extremes
        if name not in self._eval_metrics and name.endswith(("/min_reward", "/max_reward")):
            kind = MinMetric if name.endswith("/min_reward") else MaxMetric
            self._eval_metrics[name] = kind(sync_on_compute=True).to(self.device)
        return super().metric(name)

    def evaluate(self, batch: dict[str, Any], stage: str) -> None:
        chosen, rejected, _ = self.scores(batch)
        margin = self.margin(batch, chosen)
        # per pair, so that each task's scope gets its own mean; the mean over pairs is reward_loss
        losses = torch.stack([
            reward_loss(chosen[i], rejected[i], None if margin is None else margin[i], self.center_rewards_coefficient)
            for i in range(chosen.shape[0])
        ])
        right = (chosen > rejected).float()
        values = {"loss": losses, "accuracy": right, "pairwise_accuracy": right, "margin": chosen - rejected,
                  "mean_reward": (chosen + rejected) / 2, "min_reward": torch.minimum(chosen, rejected),
                  "max_reward": torch.maximum(chosen, rejected)}
        self.update_by_task(stage, batch.get("tasks"), values)
