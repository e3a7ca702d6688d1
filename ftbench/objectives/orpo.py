"""ORPO (Hong et al. 2024): supervised fine-tuning on the chosen responses plus an odds-ratio penalty,
in one stage and with no reference model, as TRL 1.16's ``ORPOTrainer``
(:func:`ftbench.objectives.losses.orpo_loss`).

``s_c, s_r`` = per-token MEAN log-probs of the completions; ``log_odds = (s_c - s_r) - (log(1 - e^s_c) -
log(1 - e^s_r))`` in float32; ``loss = NLL - beta * mean(logsig(log_odds))``. ``beta`` is the paper's
lambda (TRL's default 0.1), the only weight.

The NLL term: **TRL takes it over the chosen sequence's prompt AND completion tokens** (every attended
token but the first), not over the completion alone as the paper writes it; ftbench does the same by
default (``nll_on_prompt: true``) and offers the paper's completion-only variant (``nll_on_prompt:
false``). So ORPO trains on the prompts too: on short-answer data most of its NLL tokens are prompt tokens.

What it holds: no reference model (no reference pass, no frozen copy): one forward and backward over
``cat([chosen, rejected])`` per step. It needs no SFT stage before it (that is its point).

Metrics, under TRL's names, for ``train/``, ``val/`` and ``test/``: ``loss``, ``rewards/chosen`` (mean
``beta * s_c``), ``rewards/rejected``, ``rewards/accuracies`` (strict), ``rewards/margins``,
``logps/chosen``, ``logps/rejected`` (mean per-token log-probs), ``nll_loss``, ``log_odds_ratio`` (mean
``logsig(log_odds)``), ``log_odds_chosen`` (mean ``log_odds``); evaluation adds ``pairwise_accuracy`` and
the data set's answer metrics. In evaluation a pair's ``loss`` is its batch's NLL minus its own odds-ratio
term (their mean over the set is the loss); ``nll_loss`` is the token mean over the set.
"""

from __future__ import annotations

from typing import Any

import torch

from ftbench.data.pairs import pair_memory_batch
from ftbench.errors import ConfigError
from ftbench.objectives.base import Objective
from ftbench.objectives.losses import orpo_loss
from ftbench.objectives.pair_forward import PairTokens, model_inputs, pair_token_logps
from ftbench.objectives.step import TrainingLoss


def check_settings(beta: float) -> None:
    """The ORPO options that cannot work, each a one-line :class:`~ftbench.errors.ConfigError` naming the option."""
    if isinstance(beta, bool) or not (isinstance(beta, (int, float)) and 0 < beta < float("inf")):
        raise ConfigError(f"model.init_args.beta: must be a positive finite number, got {beta!r}")


class ORPO(Objective):
    """ORPO: the chosen responses' NLL plus beta x an odds-ratio preference term, no reference model."""

    name = "orpo"
    data_regimes = ("preference",)
    data_needs = "preference pairs (chosen and rejected answers)"
    packed_regimes = ("preference",)  # per-token log-probs gathered from the segments (pair_forward)

    def __init__(self, beta: float = 0.1, nll_on_prompt: bool = True, **kwargs):
        """
        Args:
            beta: The paper's lambda, the weight of the odds-ratio term (TRL's default 0.1).
            nll_on_prompt: The NLL over the chosen prompt and completion tokens, as TRL (true), or
                over the completion only, as the paper writes it (false).
        """
        super().__init__(**kwargs)
        check_settings(beta)
        self.beta, self.nll_on_prompt = float(beta), bool(nll_on_prompt)

    def memory_batch(self, batch_size: int, seq_len: int, device: str | torch.device = "meta") -> dict[str, torch.Tensor]:
        """``ftbench estimate``'s batch: ``batch_size`` pairs of two ``seq_len``-token sequences."""
        return pair_memory_batch(batch_size, seq_len, device)

    def nll_tokens(self, tokens: PairTokens) -> tuple[torch.Tensor, torch.Tensor]:
        """The log-probs and mask of the NLL term's tokens (see the module docstring)."""
        return tokens.chosen_attended() if self.nll_on_prompt else tokens.chosen()

    def compute(self, batch: dict[str, Any]):
        tokens = pair_token_logps(self, batch)
        (c, cm), (r, rm) = tokens.chosen(), tokens.rejected()
        nll_logps, nll_mask = self.nll_tokens(tokens)
        loss, losses, metrics = orpo_loss(c, cm, r, rm, self.beta, nll_logps, nll_mask)
        return tokens, loss, losses, metrics

    def training_loss(self, batch: dict[str, Any]) -> TrainingLoss:
        tokens, loss, losses, metrics = self.compute(batch)
        ids, mask = model_inputs(batch, tokens.cat)  # the packed blocks when packed
        # trained tokens: both completions (the odds ratio) and the NLL's chosen prompt tokens, each once
        trained = tokens.completion_mask.sum() + (self.nll_tokens(tokens)[1] & ~tokens.chosen()[1]).sum()
        return TrainingLoss(loss, trained, ids, mask, losses.shape[0],
                            metrics=lambda: metrics)

    def evaluate(self, batch: dict[str, Any], stage: str) -> None:
        tokens, _, losses, metrics = self.compute(batch)
        (c, cm), (r, rm) = tokens.chosen(), tokens.rejected()
        nll_logps, nll_mask = self.nll_tokens(tokens)
        rows = [orpo_loss(c[i:i + 1], cm[i:i + 1], r[i:i + 1], rm[i:i + 1], self.beta, nll_logps[i:i + 1],
                          nll_mask[i:i + 1])[2] for i in range(losses.shape[0])]
        per_row = {name: torch.stack([m[name] for m in rows]) for name in rows[0] if name != "nll_loss"}
        nll_sum = -torch.where(nll_mask, nll_logps, torch.zeros_like(nll_logps)).sum(-1)
        values = {"loss": metrics["nll_loss"] - losses.detach(), **per_row,
                  "pairwise_accuracy": per_row["rewards/accuracies"], "nll_loss": nll_sum.detach()}
        self.evaluator.update(batch, stage, values, weights={"nll_loss": nll_mask.sum(-1)})
