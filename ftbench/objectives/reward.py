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

from ftbench.backbone import last_token_scores, position_scores
from ftbench.data.pairs import concatenate_pairs, pair_memory_batch, split_pairs
from ftbench.errors import ConfigError
from ftbench.objectives.base import Objective
from ftbench.objectives.step import TrainingLoss
from ftbench.objectives.losses import reward_loss, reward_metrics
from ftbench.objectives.pair_forward import is_packed, model_inputs

class Reward(Objective):
    """Bradley-Terry reward model on the scalar score head (TRL ``RewardTrainer``'s loss and metrics)."""

    name = "reward"
    data_regimes = ("preference",)
    data_needs = "preference pairs (chosen and rejected answers)"
    packed_regimes = ("preference",)  # each score read at its segment's last token
    head = "score"
    needs_reference = holds_reward_model = holds_critic = False  # it trains the reward model: the policy is it

    def __init__(self, center_rewards_coefficient: Optional[float] = None, **kwargs):
        """
        Args:
            center_rewards_coefficient: Weight of ``mean((r_c + r_r)^2)`` in the loss, which centres
                the scores on 0 (TRL: 0.01 is typical). Default: no term. A per-pair ``margin`` comes
                from the data (a ``margin`` batch key) when it has one.
        """
        super().__init__(**kwargs)
        if center_rewards_coefficient is not None and not center_rewards_coefficient >= 0:
            raise ConfigError(f"objective reward: center_rewards_coefficient must be >= 0, got {center_rewards_coefficient}")
        self.center_rewards_coefficient = center_rewards_coefficient

    def memory_batch(self, batch_size: int, seq_len: int, device: str | torch.device = "meta") -> dict[str, torch.Tensor]:
        """``ftbench estimate``'s batch: ``batch_size`` pairs of two ``seq_len``-token sequences."""
        return pair_memory_batch(batch_size, seq_len, device)

    # ------------------------------------------------------------------ scores
    def scores(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(chosen scores, rejected scores, the concatenated inputs), scores in float32, ``(pairs,)``."""
        cat = concatenate_pairs(batch)
        if is_packed(batch):  # each sequence's score at its segment's last token
            self.check_packed_forward()
            per_position = position_scores(self.model, batch["packed_input_ids"], None, batch["packed_position_ids"])
            block, start, length = batch["packed_segments"].to(per_position.device).unbind(-1)
            s = per_position[block, start + length - 1, 0].float()
        else:
            s = last_token_scores(self.model, cat["input_ids"], cat["attention_mask"]).float()
        chosen, rejected = split_pairs(s, batch["chosen_input_ids"].shape[0])
        return chosen, rejected, cat

    @staticmethod
    def margin(batch: dict[str, Any], like: torch.Tensor) -> Optional[torch.Tensor]:
        m = batch.get("margin")
        if m is None:
            return None
        return torch.as_tensor(m, dtype=like.dtype, device=like.device).reshape(like.shape)

    # ------------------------------------------------------------------ training
    def training_loss(self, batch: dict[str, Any]) -> TrainingLoss:
        chosen, rejected, cat = self.scores(batch)
        loss = reward_loss(chosen, rejected, self.margin(batch, chosen), self.center_rewards_coefficient)
        ids, mask = model_inputs(batch, cat)  # the packed blocks when packed
        # every real token of both sequences feeds the scores
        return TrainingLoss(loss, mask.sum(), ids, mask, chosen.shape[0],
                            metrics=lambda: reward_metrics(chosen.detach(), rejected.detach()))

    # ------------------------------------------------------------------ evaluation
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
        # the set's extremes, not the mean of per-batch extremes
        self.evaluator.update(batch, stage, values, reductions={"min_reward": "min", "max_reward": "max"})
