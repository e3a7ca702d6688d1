"""CPO (Xu et al. 2024), SimPO (Meng et al. 2024) and AlphaPO (Gupta et al. 2025): preference losses
with no reference model, as TRL 1.16's ``CPOTrainer`` (:func:`ftbench.objectives.losses.cpo_loss`).

Scores over the completion tokens: the SUM of the log-probs for ``sigmoid``/``hinge``, the per-token
MEAN for ``ipo``/``simpo`` (SimPO's length normalisation); ``alpha`` != 0 reshapes them into AlphaPO's
rewards ``(1 - exp(s)^-alpha) / alpha``. ``simpo`` subtracts the target margin ``simpo_gamma / beta``;
``loss = mean(losses) + cpo_alpha * NLL`` (the chosen completions' token-mean NLL over the batch: CPO's
behaviour-cloning term; SimPO's paper value is ``cpo_alpha: 0``). ``loss_type: alphapo`` is TRL's sugar
for ``simpo`` with ``cpo_alpha = 0``; ``alpha`` sets the shape (0 = plain SimPO).

What it holds: no reference model (no reference pass, no frozen copy, not under full tuning either):
one forward and backward over ``cat([chosen, rejected])`` per step, as :class:`~ftbench.objectives.reward.Reward`.

Metrics, under TRL's names, for ``train/``, ``val/`` and ``test/``: ``loss``, ``rewards/chosen``
(mean ``beta * s_c``, or ``beta * r_c`` with ``alpha``), ``rewards/rejected``, ``rewards/accuracies``
(strict), ``rewards/margins``, ``logps/chosen``, ``logps/rejected`` (the scores, summed or averaged as
above), ``nll_loss``; evaluation adds ``pairwise_accuracy`` (= ``rewards/accuracies``) and the data
set's answer metrics. In evaluation a pair's ``loss`` is its preference loss plus ``cpo_alpha`` x its
batch's NLL (their mean over the set is the loss); ``nll_loss`` is the token mean over the set.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch

from ftbench.data.pairs import pair_memory_batch
from ftbench.errors import ConfigError
from ftbench.objectives.base import Objective
from ftbench.objectives.losses import CPO_LOSS_TYPES, cpo_loss
from ftbench.objectives.pair_forward import model_inputs, pair_token_logps
from ftbench.objectives.step import TrainingLoss


def check_settings(beta: float, loss_type: str, label_smoothing: float, cpo_alpha: float, simpo_gamma: float,
                   alpha: float) -> None:
    """The CPO options that cannot work, each a one-line :class:`~ftbench.errors.ConfigError` naming the option."""
    if loss_type not in CPO_LOSS_TYPES:
        raise ConfigError(f"model.init_args.loss_type: unknown {loss_type!r}; expected one of {', '.join(CPO_LOSS_TYPES)}")
    if isinstance(beta, bool) or not (isinstance(beta, (int, float)) and 0 < beta < float("inf")):
        raise ConfigError(f"model.init_args.beta: must be a positive finite number, got {beta!r}")
    eps = float(label_smoothing)
    if loss_type in ("sigmoid", "simpo", "alphapo") and not 0.0 <= eps <= 0.5:
        raise ConfigError(f"model.init_args.label_smoothing: must be in [0, 0.5] for loss_type {loss_type!r}, got {eps}")
    if loss_type in ("hinge", "ipo") and eps != 0.0:
        raise ConfigError(f"model.init_args.label_smoothing: not used by loss_type {loss_type!r}; set it to 0 (got {eps})")
    if not cpo_alpha >= 0:
        raise ConfigError(f"model.init_args.cpo_alpha: must be >= 0, got {cpo_alpha}")
    if not simpo_gamma >= 0:
        raise ConfigError(f"model.init_args.simpo_gamma: must be >= 0, got {simpo_gamma}")
    if alpha != alpha or abs(alpha) == float("inf"):
        raise ConfigError(f"model.init_args.alpha: must be a finite number, got {alpha}")


class CPO(Objective):
    """CPO / SimPO / AlphaPO: a preference loss on the policy's own log-probs, no reference model."""

    name = "cpo"
    data_regimes = ("preference",)
    data_needs = "preference pairs (chosen and rejected answers)"
    packed_regimes = ("preference",)  # per-token log-probs gathered from the segments (pair_forward)

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: Literal["sigmoid", "hinge", "ipo", "simpo", "alphapo"] = "sigmoid",
        label_smoothing: float = 0.0,
        cpo_alpha: float = 1.0,
        simpo_gamma: float = 0.5,
        alpha: float = 0.0,
        **kwargs,
    ):
        """
        Args:
            beta: Scale of the score difference (TRL's default 0.1; SimPO uses about 2).
            loss_type: ``sigmoid`` (CPO) and ``hinge`` on summed scores, ``ipo`` and ``simpo`` on
                per-token means, ``alphapo`` (= ``simpo`` with ``cpo_alpha`` 0, as TRL).
            label_smoothing: e in [0, 0.5] for ``sigmoid``/``simpo`` (the conservative form); 0 for
                ``hinge`` and ``ipo``, which do not use it.
            cpo_alpha: Weight of the chosen completions' NLL (CPO's behaviour-cloning term); 0 = none
                (SimPO's paper value). ``alphapo`` sets it to 0.
            simpo_gamma: SimPO's target reward margin gamma (the loss is ``-logsig(beta u - gamma)``).
            alpha: AlphaPO's reward shape ``(1 - exp(s)^-alpha) / alpha``; 0 = the scores themselves.
        """
        super().__init__(**kwargs)
        check_settings(beta, loss_type, label_smoothing, cpo_alpha, simpo_gamma, alpha)
        if loss_type == "alphapo" and cpo_alpha != 0:
            warnings.warn(f"objective cpo: loss_type alphapo is simpo with cpo_alpha 0 (as TRL sets it); cpo_alpha "
                          f"{cpo_alpha} is not used", UserWarning, stacklevel=2)
        self.beta, self.loss_type, self.label_smoothing = float(beta), loss_type, float(label_smoothing)
        self.cpo_alpha = 0.0 if loss_type == "alphapo" else float(cpo_alpha)
        self.simpo_gamma, self.alpha = float(simpo_gamma), float(alpha)

    def memory_batch(self, batch_size: int, seq_len: int, device: str | torch.device = "meta") -> dict[str, torch.Tensor]:
        """``ftbench estimate``'s batch: ``batch_size`` pairs of two ``seq_len``-token sequences."""
        return pair_memory_batch(batch_size, seq_len, device)

    def compute(self, batch: dict[str, Any]):
        tokens = pair_token_logps(self, batch)
        (c, cm), (r, rm) = tokens.chosen(), tokens.rejected()
        loss, losses, metrics = cpo_loss(c, cm, r, rm, self.beta, self.loss_type, self.label_smoothing, self.cpo_alpha,
                                         self.simpo_gamma, self.alpha)
        return tokens, loss, losses, metrics

    def training_loss(self, batch: dict[str, Any]) -> TrainingLoss:
        tokens, loss, losses, metrics = self.compute(batch)
        ids, mask = model_inputs(batch, tokens.cat)  # the packed blocks when packed
        return TrainingLoss(loss, tokens.completion_mask.sum(), ids, mask, losses.shape[0],
                            metrics=lambda: metrics)

    def evaluate(self, batch: dict[str, Any], stage: str) -> None:
        tokens, _, losses, metrics = self.compute(batch)
        (c, cm), (r, rm) = tokens.chosen(), tokens.rejected()
        # per pair: the same scores and rewards cpo_loss averages (one pair at a time through it)
        rows = [cpo_loss(c[i:i + 1], cm[i:i + 1], r[i:i + 1], rm[i:i + 1], self.beta, self.loss_type, self.label_smoothing,
                         self.cpo_alpha, self.simpo_gamma, self.alpha)[2] for i in range(losses.shape[0])]
        per_row = {name: torch.stack([m[name] for m in rows]) for name in rows[0] if name != "nll_loss"}
        # TRL's nll_loss is 0 when cpo_alpha is 0 (the term is not computed)
        nll_sum = -torch.where(cm, c, torch.zeros_like(c)).sum(-1) * float(self.cpo_alpha != 0)
        right = per_row["rewards/accuracies"]
        values = {"loss": losses.detach() + self.cpo_alpha * metrics["nll_loss"], **per_row, "pairwise_accuracy": right,
                  "nll_loss": nll_sum.detach()}
        self.evaluator.update(batch, stage, values, weights={"nll_loss": cm.sum(-1)})
