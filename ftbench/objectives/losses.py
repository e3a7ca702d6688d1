"""Pure loss functions for the objectives: tensors in, tensors out, no model.

Every function follows TRL's definition (users compare ftbench's numbers with TRL's); where TRL
versions differ, the choice is written down at the function. Sources: TRL 1.16
(``trl/trainer/{dpo,kto,cpo,orpo,reward,grpo,rloo}_trainer.py``), TRL <= 0.28, torchtune
(``torchtune/rlhf/loss/dpo.py``) and LLaMA-Factory.

Sequence log-probabilities (:func:`token_logps`, :func:`sequence_logps`)
    Position ``t`` of the logits predicts label ``t + 1`` (``logits[:, :-1]`` against
    ``labels[:, 1:]``); ``log p = logit[label] - logsumexp(logits)`` in float32, labels equal to
    ``ignore_index`` (-100) excluded. A sequence's log-prob is the SUM over its kept tokens
    (TRL, torchtune, LLaMA-Factory); only IPO averages per token, inside :func:`dpo_loss`.

DPO (:func:`dpo_loss` per pair, :func:`dpo_batch_loss` for the batch, :func:`dpo_metrics`), TRL 1.16
    With the log-ratios ``c = pi_c - ref_c`` and ``r = pi_r - ref_r`` and ``D = c - r``:

    - ``sigmoid`` (DPO, Rafailov et al. 2023; with ``e > 0`` conservative DPO, Mitchell 2023):
      ``-(1 - e) * logsig(b * D) - e * logsig(-b * D)``. TRL <= 0.28, LLaMA-Factory and torchtune
      apply ``e``; TRL 1.x ignores ``label_smoothing`` for ``sigmoid`` (its loss is
      ``-logsig(b * D)`` whatever ``e`` is), so the numbers agree with TRL 1.x only at ``e = 0``.
    - ``ipo`` (Azar et al. 2023, eq. 17): ``((c / len_c - r / len_r) - 1 / (2 b))^2``, the
      log-ratios averaged per completion token (TRL: "we confirmed this choice with the IPO
      authors"), lengths clamped to >= 1 as TRL does. Only the loss averages: the rewards are
      built from the summed log-ratios (TRL 1.16; TRL 0.x logged the averages).
    - ``hinge`` (SLiC, Zhao et al. 2023): ``relu(1 - b * D)``.
    - ``robust`` (Chowdhury et al. 2024): ``(-(1 - e) * logsig(b * D) + e * logsig(-b * D)) / (1 - 2e)``.
    - ``exo_pair`` (Ji et al. 2024): ``q = sig(b D)``; ``q (logsig(b D) - log(1 - e)) +
      (1 - q)(logsig(-b D) - log e)``, ``0 < e < 1``.
    - ``nca_pair`` (Chen et al. 2024): ``-logsig(b c) - logsig(-b c)/2 - logsig(-b r)/2``.
    - ``bco_pair`` (Jung et al. 2024): ``-logsig(b c) - logsig(-b r)`` (no running-mean shift in 1.16).
    - ``sppo_hard`` (Wu et al. 2024): ``(c - 1/(2b))^2 + (r + 1/(2b))^2``.
    - ``apo_zero`` / ``apo_down`` (D'Oosterlinck et al. 2024): ``1 - sig(b c) + sig(b r)`` /
      ``sig(b c) + 1 - sig(b D)``.
    - ``discopop`` (Chan et al. 2024): ``x = b D``, ``m = sig(x / tau)``:
      ``(1 - m)(-logsig(x)) + m exp(-x)``.
    - ``sigmoid_norm``: ``-logsig(b (c / len_c - r / len_r))`` (``e`` ignored).
    - on the batch only (:func:`dpo_batch_loss`): ``aot`` and ``aot_unpaired`` (Melnyk et al.
      2024, the log-ratios sorted over the batch), ``sft`` (the chosen completions' token-mean NLL),
      and weighted combinations (MPO: ``sum_k w_k mean(loss_k)``).

    Implicit rewards: ``chosen = b * c``, ``rejected = b * r`` (summed log-ratios), detached.

KTO (:func:`kto_loss`), CPO/SimPO/AlphaPO (:func:`cpo_loss`), ORPO (:func:`orpo_loss`)
    TRL 1.16's formulas, written at each function.

Reward model (:func:`reward_loss`, :func:`reward_metrics`), TRL ``RewardTrainer``
    Bradley-Terry: ``mean(-logsig(r_c - r_r - m)) + k * mean((r_c + r_r)^2)`` with an optional
    per-pair margin ``m`` and centering coefficient ``k`` (Eisenstein et al. 2023).

GRPO (:func:`grpo_advantages`, :func:`rloo_advantages`, :func:`grpo_loss`, :func:`rloo_loss`, :func:`frac_reward_zero_std`)
    Advantages from ``G`` completions per prompt, laid out consecutively: ``A = r - mean_group(r)``,
    divided by ``std + 1e-4`` (Bessel-corrected std, as TRL's ``nanstd``) of the group
    (``"group"``, Shao et al. 2024) or of the whole batch (``"batch"``), or not divided (``"none"``,
    Dr. GRPO, Liu et al. 2025). RLOO: ``A_i = r_i - (sum_group(r) - r_i) / (G - 1)``.
    :func:`grpo_loss` is TRL 1.16's ``GRPOTrainer._compute_loss``: an importance weight per token or
    per sequence (GSPO), the per-token loss of ``loss_type`` (the clipped surrogate of grpo, bnpo,
    dr_grpo, dapo, luspo; cispo, sapo, vespo), ``+ beta * k3`` (optionally bias-corrected), and the
    loss type's aggregation (:func:`_grpo_aggregate`, one place). :func:`rloo_loss` is TRL's
    ``RLOOTrainer`` loss: a clipped ratio of summed sequence log-probs, mean over sequences.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CPO_LOSS_TYPES",
    "DPO_LOSS_TYPES",
    "DPO_PAIR_LOSS_TYPES",
    "KTO_LOSS_TYPES",
    "GRPO_LOSS_TYPES",
    "SCALE_REWARDS",
    "cpo_loss",
    "dpo_batch_loss",
    "dpo_loss",
    "dpo_metrics",
    "frac_reward_zero_std",
    "grpo_advantages",
    "grpo_loss",
    "kto_loss",
    "orpo_loss",
    "reward_loss",
    "reward_metrics",
    "rloo_advantages",
    "rloo_loss",
    "sequence_logps",
    "token_logps",
]

#: the DPO loss types that are defined per pair (:func:`dpo_loss`)
DPO_PAIR_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
                       "apo_zero", "apo_down", "discopop", "sigmoid_norm")
#: every DPO loss type of TRL 1.16: the per-pair ones and those defined on the batch (:func:`dpo_batch_loss`)
DPO_LOSS_TYPES = DPO_PAIR_LOSS_TYPES + ("aot", "aot_unpaired", "sft")
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")
CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo", "alphapo")
# TRL 1.16 GRPOConfig.loss_type (its default: dapo); the first five share the clipped surrogate
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")
CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
SCALE_REWARDS = ("group", "batch", "none")

# TRL adds this to the std before dividing (grpo_trainer: ``advantages / (std_rewards + 1e-4)``).
_STD_EPS = 1e-4


def _choices(options: tuple[str, ...]) -> str:
    return ", ".join(repr(o) for o in options)


# --------------------------------------------------------------------------------------------
# Log-probabilities
# --------------------------------------------------------------------------------------------


def token_logps(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Per-token log-probabilities of ``labels`` under ``logits``, after the causal shift.

    Args:
        logits: ``(B, T, V)``, any float dtype (bf16 is upcast to float32 row by row).
        labels: ``(B, T)`` token ids; positions equal to ``ignore_index`` are excluded.
        ignore_index: the label that marks a position to skip (prompt, padding).

    Returns:
        ``(logps, mask)``, both ``(B, T - 1)``: ``logps[b, t] = log p(labels[b, t + 1] | logits[b, t])``
        in float32 (float64 for float64 logits), exactly 0 where excluded; ``mask`` is True where a label counts.

    Memory: no full log-softmax is built. The label's logit is gathered (``B * T`` values) and
    ``logsumexp`` runs one batch row at a time, so the float32 temporaries of the forward pass are
    one row's ``(T - 1, V)``. With autograd on and bf16 logits, each row's float32 copy is kept for
    the backward of ``logsumexp`` (one float32 copy of the logits in all, where
    ``F.log_softmax(logits.float())`` holds the upcast copy and the float32 result at once); with
    float32 logits nothing of size ``V`` is added.
    """
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"token_logps: logits must be (B, T, V) and labels (B, T) with the same B and T, "
            f"got logits {tuple(logits.shape)} and labels {tuple(labels.shape)}"
        )
    logits = logits[:, :-1]
    labels = labels[:, 1:]
    mask = labels != ignore_index
    index = labels.masked_fill(~mask, 0).unsqueeze(-1)
    dtype = torch.promote_types(logits.dtype, torch.float32)  # bf16/fp16 -> fp32; fp64 stays fp64
    picked = logits.gather(-1, index).squeeze(-1).to(dtype)  # (B, T-1)
    if logits.size(0) == 0:
        lse = picked.clone()
    else:
        lse = torch.stack([torch.logsumexp(row.to(dtype), dim=-1) for row in logits])  # (B, T-1)
    logps = (picked - lse).masked_fill(~mask, 0.0)
    return logps, mask


def sequence_logps(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Per-sequence SUM of the labels' log-probabilities, and the number of tokens summed.

    ``logits[:, :-1]`` predicts ``labels[:, 1:]`` (the causal shift), the log-softmax is taken in
    float32 (logits may be bf16), and positions whose label is ``ignore_index`` are left out.
    See :func:`token_logps` for the memory behaviour.

    Args:
        logits: ``(B, T, V)``.
        labels: ``(B, T)``, ``ignore_index`` on prompt and padding positions.
        ignore_index: the label to skip.

    Returns:
        ``(sums, counts)``: ``sums`` is ``(B,)`` float32 (float64 for float64 logits), ``counts`` is ``(B,)`` int64 (the
        completion lengths that :func:`dpo_loss` needs for ``ipo``).
    """
    logps, mask = token_logps(logits, labels, ignore_index)
    return logps.sum(-1), mask.sum(-1)


# --------------------------------------------------------------------------------------------
# DPO
# --------------------------------------------------------------------------------------------


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    discopop_tau: float = 0.05,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair DPO-family losses and the implicit rewards (TRL 1.16's ``DPOTrainer``).

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps:
            ``(pairs,)`` summed sequence log-probs (:func:`sequence_logps`).
        beta: ``b > 0``, the strength of the tie to the reference (IPO's ``tau``).
        loss_type: one of :data:`DPO_PAIR_LOSS_TYPES` (formulas in the module docstring). The
            batch-level types (``aot``, ``aot_unpaired``, ``sft``) and combinations are
            :func:`dpo_batch_loss`'s.
        label_smoothing: ``e``, the assumed probability that a preference label is flipped.
            ``sigmoid`` (conservative DPO): ``0 <= e <= 0.5``; ``robust``: ``0 <= e < 0.5``;
            ``exo_pair``: ``0 < e < 1``; the other types ignore it, as TRL 1.16 does (the objective,
            :class:`ftbench.objectives.DPO`, refuses a value its loss types do not read, so a run
            never carries a setting that changes nothing). TRL 1.x ignores it for ``sigmoid``;
            ftbench applies it as TRL <= 0.28, LLaMA-Factory and torchtune do.
        chosen_lengths, rejected_lengths: ``(pairs,)`` completion token counts (the counts of
            :func:`sequence_logps`), required for ``ipo`` and ``sigmoid_norm``. Clamped to >= 1.
        discopop_tau: ``discopop``'s temperature ``tau`` (TRL's default 0.05).

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``(pairs,)``; the rewards are
        ``b * (pi - ref)`` from the SUMMED log-probs for every loss type, ``ipo`` included (TRL
        1.16; TRL 0.x logged ``ipo``'s per-token averages), detached. The training loss is
        ``losses.mean()``.
    """
    if loss_type not in DPO_PAIR_LOSS_TYPES:
        raise ValueError(f"dpo_loss: unknown loss_type {loss_type!r}; expected one of {_choices(DPO_PAIR_LOSS_TYPES)}")
    _check_dpo_arguments("dpo_loss", beta, loss_type, label_smoothing, discopop_tau)
    eps = float(label_smoothing)
    four = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    shapes = {tuple(x.shape) for x in four}
    if len(shapes) != 1:
        raise ValueError(f"dpo_loss: the four log-prob tensors must have one shape, got {sorted(shapes)}")

    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    delta = chosen_logratios - rejected_logratios
    z = beta * delta

    if loss_type in ("ipo", "sigmoid_norm"):
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError(
                f"dpo_loss: loss_type {loss_type!r} averages the log-ratios per completion token and needs "
                "chosen_lengths and rejected_lengths (the token counts returned by sequence_logps)"
            )
        dtype, device = policy_chosen_logps.dtype, policy_chosen_logps.device
        len_c = torch.as_tensor(chosen_lengths, device=device).to(dtype).clamp(min=1.0)
        len_r = torch.as_tensor(rejected_lengths, device=device).to(dtype).clamp(min=1.0)
        per_token = chosen_logratios / len_c - rejected_logratios / len_r

    if loss_type == "sigmoid":
        losses = -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    elif loss_type == "ipo":
        losses = (per_token - 1.0 / (2.0 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - z)
    elif loss_type == "robust":
        losses = (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)
    elif loss_type == "exo_pair":
        # TRL makes e a float32 tensor: its two logs are float32 values (within 1e-7 of float64)
        e32 = torch.tensor(eps, dtype=torch.float32)
        log_keep, log_flip = torch.log(1.0 - e32).item(), torch.log(e32).item()
        q = torch.sigmoid(z)
        losses = q * (F.logsigmoid(z) - log_keep) + (1.0 - q) * (F.logsigmoid(-z) - log_flip)
    elif loss_type == "nca_pair":
        zc, zr = beta * chosen_logratios, beta * rejected_logratios
        losses = -F.logsigmoid(zc) - 0.5 * F.logsigmoid(-zc) - 0.5 * F.logsigmoid(-zr)
    elif loss_type == "bco_pair":
        # no running-mean shift of the rewards (TRL 0.x had one; 1.16 has not)
        losses = -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)
    elif loss_type == "sppo_hard":
        a = 1.0 / (2.0 * beta)
        losses = (chosen_logratios - a) ** 2 + (rejected_logratios + a) ** 2
    elif loss_type == "apo_zero":
        losses = 1.0 - torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)
    elif loss_type == "apo_down":
        losses = torch.sigmoid(beta * chosen_logratios) + 1.0 - torch.sigmoid(z)
    elif loss_type == "discopop":
        m = torch.sigmoid(z / discopop_tau)
        losses = (1.0 - m) * -F.logsigmoid(z) + m * torch.exp(-z)
    else:  # sigmoid_norm
        losses = -F.logsigmoid(beta * per_token)

    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def _check_dpo_arguments(fn: str, beta: float, loss_type: str, label_smoothing: float, discopop_tau: float) -> None:
    if isinstance(beta, bool) or not (isinstance(beta, (int, float)) and 0 < beta < float("inf")):
        raise ValueError(f"{fn}: beta must be a positive finite number, got {beta!r}")
    eps = float(label_smoothing)
    if loss_type == "sigmoid" and not 0.0 <= eps <= 0.5:
        raise ValueError(f"{fn}: label_smoothing must be in [0, 0.5] for loss_type 'sigmoid', got {eps}")
    if loss_type in ("robust", "aot", "aot_unpaired") and not 0.0 <= eps < 0.5:
        raise ValueError(f"{fn}: label_smoothing must be in [0, 0.5) for loss_type {loss_type!r}, got {eps}")
    if loss_type == "exo_pair" and not 0.0 < eps < 1.0:
        raise ValueError(f"{fn}: loss_type 'exo_pair' needs label_smoothing in (0, 1) (its log(e) term), got {eps}")
    if loss_type == "discopop" and not (isinstance(discopop_tau, (int, float)) and discopop_tau > 0):
        raise ValueError(f"{fn}: discopop_tau must be > 0, got {discopop_tau!r}")


def dpo_batch_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    discopop_tau: float = 0.05,
    loss_weights: Sequence[float] | None = None,
    chosen_token_logps: Tensor | None = None,
    chosen_token_mask: Tensor | None = None,
) -> Tensor:
    """The DPO batch loss of one loss type or a weighted combination (TRL 1.16; MPO is
    ``["sigmoid", "bco_pair", "sft"]`` with ``[0.8, 0.2, 1.0]``): ``sum_k w_k * mean_i(loss_k,i)``.

    Per-pair types are :func:`dpo_loss`'s, averaged over the pairs. Batch-level types:

    - ``aot`` (Melnyk et al. 2024): ``a = sort(pi_c - pi_r)``, ``b = sort(ref_c - ref_r)`` over the
      BATCH, ascending, each on its own; ``d = a - b``; ``-(1 - e) logsig(b d) - e logsig(-b d)``;
    - ``aot_unpaired``: the same with ``d = sort(c) - sort(r)`` (the log-ratios sorted apart);
    - ``sft``: ``-(sum of the policy's per-token log-probs over ALL chosen completion tokens of the
      batch) / (their count)``: one token mean over the batch, not a mean of per-sequence means.
      From ``chosen_token_logps``/``chosen_token_mask`` ``(B, T)`` when given, else from the summed
      ``policy_chosen_logps`` and ``chosen_lengths`` (the same number).

    Args:
        loss_type: a type name or a list of them (each once).
        loss_weights: one weight per type (default 1.0 each).
        The rest: as :func:`dpo_loss`.

    Returns:
        The scalar batch loss.
    """
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    if not types:
        raise ValueError("dpo_batch_loss: loss_type is an empty list")
    for name in types:
        if name not in DPO_LOSS_TYPES:
            raise ValueError(f"dpo_batch_loss: unknown loss_type {name!r}; expected one of {_choices(DPO_LOSS_TYPES)}")
    if loss_weights is None:
        weights = [1.0] * len(types)
    else:
        weights = [float(w) for w in loss_weights]
        if len(weights) != len(types):
            raise ValueError(f"dpo_batch_loss: {len(weights)} loss_weights for {len(types)} loss types {types}")
    total: Tensor | float = 0.0
    for name, weight in zip(types, weights):
        if name in DPO_PAIR_LOSS_TYPES:
            losses, _, _ = dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                                    beta, name, label_smoothing, chosen_lengths, rejected_lengths, discopop_tau)
            term = losses.mean()
        elif name == "sft":
            term = _chosen_nll(policy_chosen_logps, chosen_lengths, chosen_token_logps, chosen_token_mask)
        else:  # aot, aot_unpaired
            _check_dpo_arguments("dpo_batch_loss", beta, name, label_smoothing, discopop_tau)
            eps = float(label_smoothing)
            if name == "aot":
                sorted_policy, _ = torch.sort(policy_chosen_logps - policy_rejected_logps)
                sorted_ref, _ = torch.sort(ref_chosen_logps - ref_rejected_logps)
                d = sorted_policy - sorted_ref
            else:
                sorted_c, _ = torch.sort(policy_chosen_logps - ref_chosen_logps)
                sorted_r, _ = torch.sort(policy_rejected_logps - ref_rejected_logps)
                d = sorted_c - sorted_r
            term = (-(1.0 - eps) * F.logsigmoid(beta * d) - eps * F.logsigmoid(-beta * d)).mean()
        total = total + weight * term
    return total


def _chosen_nll(policy_chosen_logps: Tensor, chosen_lengths: Tensor | None, token_logps: Tensor | None,
                token_mask: Tensor | None) -> Tensor:
    """Minus the token mean of the chosen completions' log-probs over the whole batch."""
    if token_logps is not None:
        if token_mask is None or token_mask.shape != token_logps.shape:
            raise ValueError("dpo_batch_loss: loss_type 'sft' needs chosen_token_mask with chosen_token_logps's shape")
        return _token_mean_nll(token_logps, token_mask)
    if chosen_lengths is None:
        raise ValueError("dpo_batch_loss: loss_type 'sft' needs chosen_token_logps and chosen_token_mask "
                         "(or chosen_lengths with the summed policy_chosen_logps)")
    count = torch.as_tensor(chosen_lengths, device=policy_chosen_logps.device).sum().clamp(min=1)
    return -policy_chosen_logps.sum() / count


def _token_mean_nll(token_logps: Tensor, mask: Tensor) -> Tensor:
    """``-sum(logp over masked tokens) / count`` for a ``(B, T)`` batch (a padded slot may hold anything)."""
    keep = mask.bool()
    picked = torch.where(keep, token_logps, torch.zeros_like(token_logps))
    return -picked.sum() / keep.sum().clamp(min=1)


@torch.no_grad()
def dpo_metrics(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
) -> dict[str, Tensor]:
    """TRL's DPO batch metrics, under TRL's names (0-dim tensors, batch means).

    ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies`` (fraction of pairs with
    ``chosen > rejected``, strictly: a tie counts as wrong), ``rewards/margins`` (mean of
    ``chosen - rejected``), ``logps/chosen``, ``logps/rejected``.
    """
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": policy_chosen_logps.detach().mean(),
        "logps/rejected": policy_rejected_logps.detach().mean(),
    }


# --------------------------------------------------------------------------------------------
# KTO
# --------------------------------------------------------------------------------------------


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    labels: Tensor,
    kl_logps: Tensor | None = None,
    ref_kl_logps: Tensor | None = None,
    beta: float = 0.1,
    loss_type: str = "kto",
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """KTO (Ethayarajh et al. 2024) on unpaired examples, as TRL 1.16's ``KTOTrainer``.

    With ``rho = pi - ref`` per example and the KL estimate
    ``z = max(0, mean_i(kl_logps_i - ref_kl_logps_i))`` over the whole batch (both labels), detached:

    - ``kto``: desirable ``1 - sigmoid(b (rho - z))``, undesirable ``1 - sigmoid(b (z - rho))``;
    - ``apo_zero_unpaired``: desirable ``1 - sigmoid(b rho)``, undesirable ``sigmoid(b rho)``; no KL
      (``z`` is 0, and ``kl_logps`` may be None).

    Args:
        policy_logps, ref_logps: ``(B,)`` summed completion log-probs under the policy and reference.
        labels: ``(B,)`` bool, True = desirable.
        kl_logps, ref_kl_logps: ``(B,)`` summed log-probs of each example's MISMATCHED completion
            (the previous example's of the batch, cyclic:
            :func:`ftbench.data.unpaired.kl_completion_order`) under policy and reference.
        beta: ``b > 0``. desirable_weight, undesirable_weight: the per-example weights (>= 0).

    Returns:
        ``(losses, kl, metrics)``: ``losses`` ``(B,)`` per example in input order, already weighted
        (the batch loss is their plain mean, not divided by the sum of weights); ``kl`` = ``z``
        (0-dim); ``metrics`` under TRL's names: ``kl``; ``rewards/chosen`` and ``logps/chosen``
        (means of ``b rho`` and ``pi`` over the desirable examples, only if there are any), the same
        ``/rejected``; ``rewards/margins`` (their difference) only when both kinds are present. The
        rewards do not subtract ``z``.
    """
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"kto_loss: unknown loss_type {loss_type!r}; expected one of {_choices(KTO_LOSS_TYPES)}")
    if isinstance(beta, bool) or not (isinstance(beta, (int, float)) and 0 < beta < float("inf")):
        raise ValueError(f"kto_loss: beta must be a positive finite number, got {beta!r}")
    for name, w in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
        if not w >= 0:
            raise ValueError(f"kto_loss: {name} must be >= 0, got {w}")
    labels = torch.as_tensor(labels, device=policy_logps.device).bool()
    if policy_logps.shape != ref_logps.shape or labels.shape != policy_logps.shape:
        raise ValueError(f"kto_loss: policy_logps, ref_logps and labels must have one shape (B,), got "
                         f"{tuple(policy_logps.shape)}, {tuple(ref_logps.shape)}, {tuple(labels.shape)}")
    zero = torch.zeros((), dtype=policy_logps.dtype, device=policy_logps.device)
    if loss_type == "kto":
        if kl_logps is None or ref_kl_logps is None:
            raise ValueError("kto_loss: loss_type 'kto' needs kl_logps and ref_kl_logps (the mismatched completions' "
                             "summed log-probs under the policy and the reference)")
        kl = (kl_logps - ref_kl_logps).detach().mean().clamp(min=0).to(policy_logps.dtype)
    else:
        kl = zero
    logratios = policy_logps - ref_logps
    if loss_type == "kto":
        desirable = 1.0 - torch.sigmoid(beta * (logratios - kl))
        undesirable = 1.0 - torch.sigmoid(beta * (kl - logratios))
    else:  # apo_zero_unpaired
        desirable = 1.0 - torch.sigmoid(beta * logratios)
        undesirable = torch.sigmoid(beta * logratios)
    losses = torch.where(labels, desirable_weight * desirable, undesirable_weight * undesirable)

    with torch.no_grad():
        rewards = beta * logratios.detach()
        metrics: dict[str, Tensor] = {"kl": kl.detach()}
        for name, rows in (("chosen", labels), ("rejected", ~labels)):
            # (on the meta device, ftbench estimate's step, nothing can be read: both kinds are kept)
            if rows.device.type == "meta" or bool(rows.any()):
                count = rows.sum()  # masked means (boolean indexing has no meta kernel)
                metrics[f"rewards/{name}"] = torch.where(rows, rewards, 0.0).sum() / count
                metrics[f"logps/{name}"] = torch.where(rows, policy_logps.detach(), 0.0).sum() / count
        if "rewards/chosen" in metrics and "rewards/rejected" in metrics:
            metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return losses, kl.detach(), metrics


# --------------------------------------------------------------------------------------------
# CPO / SimPO / AlphaPO and ORPO: no reference model
# --------------------------------------------------------------------------------------------


def _masked_sum_and_count(token_logps: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    keep = mask.bool()
    picked = torch.where(keep, token_logps, torch.zeros_like(token_logps))
    return picked.sum(-1), keep.sum(-1)


def cpo_loss(
    chosen_token_logps: Tensor,
    chosen_mask: Tensor,
    rejected_token_logps: Tensor,
    rejected_mask: Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    cpo_alpha: float = 1.0,
    simpo_gamma: float = 0.5,
    alpha: float = 0.0,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """CPO (Xu et al. 2024), SimPO (Meng et al. 2024) and AlphaPO (Gupta et al. 2025): reference-free
    preference losses, as TRL 1.16's ``CPOTrainer``.

    Scores ``s`` over the completion tokens: the SUM for ``sigmoid``/``hinge``, the per-token MEAN
    for ``ipo``/``simpo``. With ``alpha != 0`` (any type) each score becomes AlphaPO's reward
    ``r = (1 - exp(s)^(-alpha)) / alpha`` and ``u = r_c - r_r``; else ``u = s_c - s_r``.

    - ``sigmoid``: ``-(1 - e) logsig(b u) - e logsig(-b u)``; ``hinge``: ``relu(1 - b u)``;
      ``ipo``: ``(u - 1/(2b))^2`` (both ignore ``e``);
    - ``simpo``: the sigmoid formula on ``u - simpo_gamma / b`` (``-logsig(b u - gamma)`` at e = 0);
    - ``alphapo``: TRL's config sugar for ``simpo`` with ``cpo_alpha = 0`` (``alpha`` is not set by it).

    ``loss = mean(losses) + cpo_alpha * NLL``, NLL = minus the token mean of the chosen completions'
    log-probs over the batch (0 when ``cpo_alpha`` is 0).

    Args:
        chosen_token_logps, rejected_token_logps: ``(B, T)`` per-token log-probs of the completions
            (:func:`token_logps`); chosen_mask, rejected_mask: ``(B, T)`` 1 on completion tokens.

    Returns:
        ``(loss, losses, metrics)``: the scalar loss, the ``(B,)`` preference losses, and TRL's
        metrics: ``rewards/chosen`` (mean ``b s_c``, or ``b r_c``), ``rewards/rejected``,
        ``rewards/accuracies`` (strict), ``rewards/margins``, ``logps/chosen`` and
        ``logps/rejected`` (mean scores, summed or averaged as above), ``nll_loss``.
    """
    if loss_type not in CPO_LOSS_TYPES:
        raise ValueError(f"cpo_loss: unknown loss_type {loss_type!r}; expected one of {_choices(CPO_LOSS_TYPES)}")
    if isinstance(beta, bool) or not (isinstance(beta, (int, float)) and 0 < beta < float("inf")):
        raise ValueError(f"cpo_loss: beta must be a positive finite number, got {beta!r}")
    if loss_type == "alphapo":
        loss_type, cpo_alpha = "simpo", 0.0
    eps = float(label_smoothing)
    sum_c, n_c = _masked_sum_and_count(chosen_token_logps, chosen_mask)
    sum_r, n_r = _masked_sum_and_count(rejected_token_logps, rejected_mask)
    if loss_type in ("ipo", "simpo"):
        s_c, s_r = sum_c / n_c.clamp(min=1), sum_r / n_r.clamp(min=1)
    else:
        s_c, s_r = sum_c, sum_r
    if alpha != 0.0:
        def shaped(s: Tensor) -> Tensor:
            return (1.0 - torch.exp(-alpha * s)) / alpha  # exp(s)^(-alpha) = exp(-alpha s)

        v_c, v_r = shaped(s_c), shaped(s_r)
    else:
        v_c, v_r = s_c, s_r
    u = v_c - v_r
    if loss_type == "simpo":
        u = u - simpo_gamma / beta
    if loss_type in ("sigmoid", "simpo"):
        losses = -(1.0 - eps) * F.logsigmoid(beta * u) - eps * F.logsigmoid(-beta * u)
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - beta * u)
    else:  # ipo
        losses = (u - 1.0 / (2.0 * beta)) ** 2
    if cpo_alpha != 0.0:
        nll = _token_mean_nll(chosen_token_logps, chosen_mask)
    else:
        nll = torch.zeros((), dtype=chosen_token_logps.dtype, device=chosen_token_logps.device)
    loss = losses.mean() + cpo_alpha * nll

    with torch.no_grad():
        chosen_rewards, rejected_rewards = beta * v_c.detach(), beta * v_r.detach()
        metrics = {
            **dpo_metrics(chosen_rewards, rejected_rewards, s_c, s_r),  # TRL's pair metrics, as DPO's
            "nll_loss": nll.detach(),
        }
    return loss, losses, metrics


def orpo_loss(
    chosen_token_logps: Tensor,
    chosen_mask: Tensor,
    rejected_token_logps: Tensor,
    rejected_mask: Tensor,
    beta: float = 0.1,
    nll_token_logps: Tensor | None = None,
    nll_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """ORPO (Hong et al. 2024), as TRL 1.16's ``ORPOTrainer``: an SFT loss plus an odds-ratio term,
    no reference model.

    ``s_c, s_r`` = per-token MEAN log-probs of the completions;
    ``log_odds = (s_c - s_r) - (log(1 - e^s_c) - log(1 - e^s_r))`` in float32 (TRL calls
    ``.float()``); ``losses = b * logsig(log_odds)`` (<= 0); ``loss = NLL - mean(losses)``. ``beta``
    is the paper's lambda (there is no other weight).

    Args:
        chosen_token_logps, rejected_token_logps, chosen_mask, rejected_mask: ``(B, T)`` per-token
            log-probs of the completions and their 0/1 masks.
        nll_token_logps, nll_mask: ``(B, T')`` the tokens of the NLL term. TRL's: the chosen
            sequence's PROMPT and completion tokens (every attended token but the first), which the
            objective passes; default: the chosen completion tokens (the paper's variant).

    Returns:
        ``(loss, losses, metrics)``; metrics under TRL's names: ``rewards/chosen`` (mean ``b s_c``,
        float32), ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``,
        ``logps/rejected`` (mean ``s``), ``nll_loss``, ``log_odds_ratio`` (mean ``logsig(log_odds)``)
        and ``log_odds_chosen`` (mean ``log_odds``).
    """
    if isinstance(beta, bool) or not (isinstance(beta, (int, float)) and 0 < beta < float("inf")):
        raise ValueError(f"orpo_loss: beta must be a positive finite number, got {beta!r}")
    sum_c, n_c = _masked_sum_and_count(chosen_token_logps, chosen_mask)
    sum_r, n_r = _masked_sum_and_count(rejected_token_logps, rejected_mask)
    s_c, s_r = sum_c / n_c.clamp(min=1), sum_r / n_r.clamp(min=1)
    c32, r32 = s_c.float(), s_r.float()
    log_odds = (c32 - r32) - (torch.log1p(-torch.exp(c32)) - torch.log1p(-torch.exp(r32)))
    ratio = F.logsigmoid(log_odds)
    losses = beta * ratio
    if nll_token_logps is None:
        nll_token_logps, nll_mask = chosen_token_logps, chosen_mask
    elif nll_mask is None or nll_mask.shape != nll_token_logps.shape:
        raise ValueError("orpo_loss: nll_token_logps needs nll_mask of the same shape")
    nll = _token_mean_nll(nll_token_logps, nll_mask)
    loss = nll - losses.mean()

    with torch.no_grad():
        chosen_rewards, rejected_rewards = beta * c32.detach(), beta * r32.detach()
        metrics = {
            **dpo_metrics(chosen_rewards, rejected_rewards, s_c, s_r),  # TRL's pair metrics, as DPO's
            "nll_loss": nll.detach(),
            "log_odds_ratio": ratio.detach().mean(),
            "log_odds_chosen": log_odds.detach().mean(),
        }
    return loss, losses, metrics


# --------------------------------------------------------------------------------------------
# Reward model
# --------------------------------------------------------------------------------------------


def reward_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    margin: Tensor | float | None = None,
    center_rewards_coefficient: float | None = None,
) -> Tensor:
    """Bradley-Terry reward-model loss, as TRL's ``RewardTrainer.compute_loss``.

    ``mean_pairs(-logsig(r_c - r_r - margin)) + k * mean((r_c + r_r)^2)``.

    Args:
        chosen_rewards, rejected_rewards: ``(pairs,)`` scalar scores.
        margin: optional ``(pairs,)`` (or scalar) margin the chosen score must beat the rejected
            one by (Llama 2's preference-strength margin).
        center_rewards_coefficient: optional ``k``; the term pushes the scores towards mean 0.

    Returns:
        The scalar loss.
    """
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * torch.mean((chosen_rewards + rejected_rewards) ** 2)
    return loss


@torch.no_grad()
def reward_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor) -> dict[str, Tensor]:
    """TRL ``RewardTrainer``'s metrics (0-dim tensors).

    ``accuracy`` (fraction of pairs with ``r_c > r_r``, strictly: ties count as wrong),
    ``margin`` (mean ``r_c - r_r``), and ``mean_reward``, ``min_reward``, ``max_reward`` over the
    chosen and rejected scores together.
    """
    both = torch.cat([chosen_rewards.reshape(-1), rejected_rewards.reshape(-1)])
    return {
        "accuracy": (chosen_rewards > rejected_rewards).float().mean(),
        "margin": (chosen_rewards - rejected_rewards).mean(),
        "mean_reward": both.mean(),
        "min_reward": both.min(),
        "max_reward": both.max(),
    }


# --------------------------------------------------------------------------------------------
# GRPO / RLOO
# --------------------------------------------------------------------------------------------


def _grouped(rewards: Tensor, num_generations: int, fn: str) -> Tensor:
    if not isinstance(num_generations, int) or isinstance(num_generations, bool) or num_generations < 1:
        raise ValueError(f"{fn}: num_generations must be a positive int, got {num_generations!r}")
    if rewards.dim() != 1 or rewards.numel() % num_generations != 0:
        raise ValueError(
            f"{fn}: rewards must be 1-D with a multiple of num_generations={num_generations} entries "
            f"(prompts * G, each prompt's completions consecutive), got shape {tuple(rewards.shape)}"
        )
    return rewards.view(-1, num_generations)


def _constant_groups(grouped: Tensor) -> Tensor:
    """(prompts,) True where every reward in the group is the same value."""
    return grouped.amax(dim=1) == grouped.amin(dim=1)


def grpo_advantages(rewards: Tensor, num_generations: int, scale_rewards: str | bool = "group") -> Tensor:
    """GRPO advantages: group-centred rewards, optionally scaled by a std (TRL ``scale_rewards``).

    ``A = r - mean_group(r)``, then divided by ``std + 1e-4`` where ``std`` is the Bessel-corrected
    standard deviation of the group (``"group"``, default) or of the whole batch (``"batch"``), or
    left unscaled (``"none"``, Dr. GRPO). ``True``/``False`` mean ``"group"``/``"none"`` as in TRL.
    A group of one completion has std 0 (TRL's rule for ``num_generations == 1``).

    Args:
        rewards: ``(prompts * G,)``, each prompt's ``G`` completions consecutive.
        num_generations: ``G``.
        scale_rewards: ``"group"``, ``"batch"`` or ``"none"``.

    Returns:
        ``(prompts * G,)`` advantages.

    A group whose rewards are all equal gets advantage exactly 0. TRL computes
    ``r - mean`` there, which float rounding can leave at ~3e-8 for 8 equal float32 rewards of 0.3;
    divided by ``std + 1e-4`` (TRL's ``nanstd`` is ~3e-8 there too) that becomes ~3e-4, and
    ``isclose(std, 0)`` misses the group in TRL's ``frac_reward_zero_std``. ftbench zeroes such groups; every other
    group gets TRL's numbers.
    """
    if scale_rewards is True:
        scale_rewards = "group"
    elif scale_rewards is False:
        scale_rewards = "none"
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(
            f"grpo_advantages: unknown scale_rewards {scale_rewards!r}; expected one of {_choices(SCALE_REWARDS)}"
        )
    grouped = _grouped(rewards, num_generations, "grpo_advantages")
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_rewards == "group":
        std = grouped.std(dim=1, keepdim=True) if num_generations > 1 else torch.zeros_like(grouped[:, :1])
        advantages = advantages / (std + _STD_EPS)
    elif scale_rewards == "batch":
        std = rewards.std() if rewards.numel() > 1 else torch.zeros((), dtype=rewards.dtype, device=rewards.device)
        advantages = advantages / (std + _STD_EPS)
    advantages = advantages.masked_fill(_constant_groups(grouped).unsqueeze(1), 0.0)
    return advantages.reshape(-1)


def rloo_advantages(rewards: Tensor, num_generations: int) -> Tensor:
    """RLOO advantages (Ahmadian et al. 2024; TRL ``RLOOTrainer`` with ``normalize_advantages=False``).

    ``A_i = r_i - (sum_group(r) - r_i) / (G - 1)``: each reward minus the mean of the other
    ``G - 1`` rewards of its prompt. Needs ``G >= 2``.

    Args:
        rewards: ``(prompts * G,)``, each prompt's ``G`` completions consecutive.
        num_generations: ``G``.
    """
    if isinstance(num_generations, int) and not isinstance(num_generations, bool) and num_generations < 2:
        raise ValueError(
            "rloo_advantages: num_generations must be >= 2 (the baseline is the mean of the other "
            f"G - 1 rewards), got {num_generations}"
        )
    grouped = _grouped(rewards, num_generations, "rloo_advantages")
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (num_generations - 1)
    return (grouped - baseline).reshape(-1)


@torch.no_grad()
def frac_reward_zero_std(rewards: Tensor, num_generations: int) -> Tensor:
    """Fraction of prompts whose ``G`` rewards are all equal (std 0: no learning signal), 0-dim.

    TRL logs ``frac_reward_zero_std`` from ``isclose(std, 0)`` of the std it scaled by, so under
    ``scale_rewards="batch"`` it reports the batch; this always counts groups, by exact equality.
    """
    grouped = _grouped(rewards, num_generations, "frac_reward_zero_std")
    return _constant_groups(grouped).float().mean()


def _masked_sum(x: Tensor, mask: Tensor, dim: int | None = None, keepdim: bool = False) -> Tensor:
    """Sum of ``x`` where ``mask``; ``torch.where``, not a product: padding slots may hold inf/NaN."""
    x = torch.where(mask, x, torch.zeros_like(x))
    return x.sum() if dim is None else x.sum(dim=dim, keepdim=keepdim)


def _clip_indicators(low: Tensor, high: Tensor, mask: Tensor, dtype: torch.dtype, prefix: str = "clip_ratio"
                     ) -> dict[str, Tensor]:
    """TRL's clip metrics from the indicators ``low``/``high``: ``(B, T)`` per token (``*_mean`` over
    the kept tokens; ``low_min``/``high_max`` over the sequences' own token means, sequences without a
    kept token skipped, NaN when there is none) or ``(B, 1)`` per sequence (over the ``B`` sequences,
    masked ones included)."""
    region = low | high
    out: dict[str, Tensor] = {}
    if low.shape[-1] == 1:  # one weight per sequence
        for name, x in (("low", low), ("high", high), ("region", region)):
            out[f"{prefix}/{name}_mean"] = x.to(dtype).mean()
        out[f"{prefix}/low_min"] = low.to(dtype).min()
        out[f"{prefix}/high_max"] = high.to(dtype).max()
        return out
    counts = mask.sum(-1)
    n_tokens = counts.sum().clamp(min=1)
    for name, x in (("low", low), ("high", high), ("region", region)):
        out[f"{prefix}/{name}_mean"] = _masked_sum(x.to(dtype), mask) / n_tokens
    rows = counts > 0
    per_row = {name: _masked_sum(x.to(dtype), mask, dim=-1)[rows] / counts[rows]
               for name, x in (("low", low), ("high", high))}
    nan = torch.tensor(float("nan"), dtype=dtype, device=mask.device)
    some = rows.device.type == "meta" or bool(rows.any())  # meta (ftbench estimate): every row is kept
    out[f"{prefix}/low_min"] = per_row["low"].min() if some else nan
    out[f"{prefix}/high_max"] = per_row["high"].max() if some else nan
    return out


def rloo_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    completion_mask: Tensor,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """TRL ``RLOOTrainer``'s loss: a clipped ratio of SUMMED sequence log-probs, mean over sequences.

    ``S_i = sum_t M logps``, ``w_i = exp(S_i - old_logps_i)``,
    ``l_i = -min(w_i A_i, clip(w_i, 1 - epsilon, 1 + epsilon_high) A_i)``, ``loss = mean_i l_i`` (not
    divided for gradient accumulation: Lightning divides by ``accumulate_grad_batches`` itself). No
    KL term: RLOO puts ``beta`` times the sequence's summed k1 KL into the reward
    (:func:`rloo_advantages` of ``r - beta * KL``).

    Args:
        logps: ``(B, T)`` per-token log-probs under the policy (with grad).
        old_logps: ``(B,)`` the SUMMED log-probs of each completion stored at generation
            (``logps`` summed and detached on the first update: ratio 1).
        advantages: ``(B,)``.
        completion_mask: ``(B, T)``.
        epsilon, epsilon_high: the clip range ``[1 - epsilon, 1 + epsilon_high]``
            (``epsilon_high`` None: ``epsilon``).

    Returns:
        ``(loss, metrics)``: ``clip_ratio/low_mean`` (``w < 1 - epsilon`` and ``A < 0``),
        ``clip_ratio/high_mean`` (``w > 1 + epsilon_high`` and ``A > 0``), ``clip_ratio/region_mean``
        (either), means over the sequences; ``clip_ratio/low_min`` and ``clip_ratio/high_max``, the
        min/max of the same indicators.
    """
    eps_low = float(epsilon)
    eps_high = eps_low if epsilon_high is None else float(epsilon_high)
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"rloo_loss: epsilon and epsilon_high must be >= 0, got {epsilon} and {epsilon_high}")
    if logps.dim() != 2 or completion_mask.shape != logps.shape:
        raise ValueError(f"rloo_loss: logps and completion_mask must be (B, T), got {tuple(logps.shape)} and "
                         f"{tuple(completion_mask.shape)}")
    B = logps.shape[0]
    if old_logps.shape != (B,) or advantages.shape != (B,):
        raise ValueError(f"rloo_loss: old_logps (summed per sequence) and advantages must be ({B},), got "
                         f"{tuple(old_logps.shape)} and {tuple(advantages.shape)}")
    mask = completion_mask.bool()
    ratio = torch.exp(_masked_sum(logps, mask, dim=-1) - old_logps)
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = -torch.min(ratio * advantages, clipped * advantages).mean()
    with torch.no_grad():
        low = ((ratio < 1.0 - eps_low) & (advantages < 0)).unsqueeze(-1)
        high = ((ratio > 1.0 + eps_high) & (advantages > 0)).unsqueeze(-1)
        metrics = _clip_indicators(low, high, mask, logps.dtype)
    return loss, metrics


def _grpo_per_token_loss(loss_type: str, w: Tensor, log_ratio: Tensor, logps: Tensor, advantages: Tensor,
                         mask: Tensor, eps_low: float, eps_high: float, delta: float | None,
                         sapo_temperature_pos: float, sapo_temperature_neg: float, vespo: tuple[float, float, float, float]
                         ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """``(per-token loss before the KL term, w after the delta cap, what the metrics need)`` of one
    loss type (TRL 1.16 ``GRPOTrainer._compute_loss``); ``w`` is ``(B, T)`` or ``(B, 1)``."""
    A = advantages
    if loss_type in CLIPPED_LOSS_TYPES:
        clipped = torch.clamp(w, 1.0 - eps_low, 1.0 + eps_high)
        if delta is not None:  # two-sided clipping: the unclipped term capped at delta too
            w = torch.clamp(w, max=delta)
        return -torch.min(w * A, clipped * A), w, {}
    if loss_type == "cispo":
        # the weight capped at epsilon_high itself (not 1 + epsilon_high) and detached: REINFORCE with
        # a clipped importance weight (MiniMax-M1), so capped tokens still get a gradient
        return -torch.clamp(w, max=eps_high).detach() * A * logps, w, {}
    if loss_type == "sapo":
        # A = 0 takes the negative temperature (TRL: ``where(A > 0, pos, neg)``)
        tau = torch.where(A > 0, torch.full_like(A, sapo_temperature_pos), torch.full_like(A, sapo_temperature_neg))
        return -torch.sigmoid(tau * (w - 1.0)) * (4.0 / tau) * A, w, {}
    # vespo: a gamma weight of the sequence's summed token log-ratio (whatever the level), detached
    k_pos, lambda_pos, k_neg, lambda_neg = vespo
    with torch.no_grad():
        summed = _masked_sum(torch.clamp(log_ratio, -20.0, 20.0), mask, dim=-1, keepdim=True)
        log_w = torch.clamp(summed, math.log(1e-8), 20.0)
        nonneg = A >= 0
        k = torch.where(nonneg, torch.full_like(A, k_pos), torch.full_like(A, k_neg))
        lam = torch.where(nonneg, torch.full_like(A, lambda_pos), torch.full_like(A, lambda_neg)).clamp(min=1e-4)
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    return -phi * A * logps, w, {"phi": phi}


def _grpo_aggregate(per_token: Tensor, mask: Tensor, loss_type: str, max_completion_length: int | None,
                    num_items_in_batch: Tensor | float | None, gradient_accumulation_steps: int,
                    steps_per_generation: int | None) -> Tensor:
    """Each loss type's aggregation of the masked per-token losses, in one place (``G`` =
    ``gradient_accumulation_steps``, ``S`` = ``steps_per_generation``, ``N`` = ``num_items_in_batch``):
    grpo, sapo: ``mean_i(sum_t l / max(1, n_i)) / G``; bnpo: ``sum l / max(1, n) / G``; dr_grpo:
    ``sum l / (B * max_completion_length) / G``; dapo, cispo, vespo: ``sum l / (N * G / S)``; luspo:
    ``mean_i(sum_t l) / G``."""
    G = gradient_accumulation_steps
    B = per_token.shape[0]
    if loss_type in ("grpo", "sapo"):
        return (per_token.sum(-1) / mask.sum(-1).clamp(min=1)).mean() / G
    if loss_type == "bnpo":
        return per_token.sum() / mask.sum().clamp(min=1) / G
    if loss_type == "dr_grpo":
        return per_token.sum() / (B * max_completion_length) / G
    if loss_type == "luspo":
        return per_token.sum(-1).mean() / G
    # dapo, cispo, vespo: N counts the active tokens of the whole generation batch (S micro-batches)
    # N at least 1, as the other types' token counts: a generation batch whose completions are all
    # left out (mask_truncated_completions, none ended) gives 0 (TRL: 0 / 0 = NaN)
    N = torch.as_tensor(mask.sum() if num_items_in_batch is None else num_items_in_batch).clamp(min=1)
    S = G if steps_per_generation is None else steps_per_generation
    return per_token.sum() / (N * G / S)


def grpo_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    completion_mask: Tensor,
    ref_logps: Tensor | None = None,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    loss_type: str = "grpo",
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    num_items_in_batch: Tensor | float | None = None,
    gradient_accumulation_steps: int = 1,
    steps_per_generation: int | None = None,
    use_bias_correction_kl: bool = True,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_pos: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    truncated: Tensor | None = None,
    entropy: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO and its variants (TRL 1.16 ``GRPOTrainer._compute_loss``), the defaults TRL's GRPOConfig's
    except ``loss_type`` (TRL: ``dapo``).

    Importance weight ``w = exp(logps - old_logps)`` per token (``importance_sampling_level="token"``)
    or ``exp(mean_t(logps - old_logps))`` one per sequence (``"sequence"``, GSPO: the exp of the MEAN
    token log-ratio). Per-token loss ``l`` by ``loss_type``:

    - ``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``, ``luspo``: ``-min(w' A, clip(w, 1 - epsilon,
      1 + epsilon_high) A)``, ``w' = min(w, delta)`` when ``delta`` is set (two-sided clipping), else ``w``;
    - ``cispo``: ``-min(w, epsilon_high) A logps``, the weight detached (the cap is ``epsilon_high``
      itself; TRL recommends 5.0);
    - ``sapo``: ``-sigmoid(tau (w - 1)) (4 / tau) A``, ``tau = sapo_temperature_pos`` if ``A > 0`` else
      ``sapo_temperature_neg``;
    - ``vespo``: ``-phi A logps``, ``phi = exp(lambda + k lw - lambda e^lw)`` (detached; NaN/inf -> 0)
      of ``lw = clamp(sum_t clamp(log-ratio, -20, 20), log 1e-8, 20)``, ``(k, lambda)`` the ``_pos``
      pair if ``A >= 0`` else the ``_neg`` pair;

    then ``l + beta k3`` with ``k3 = exp(ref - logps) - (ref - logps) - 1`` (times ``w`` when
    ``use_bias_correction_kl``), aggregated by :func:`_grpo_aggregate` (already divided by
    ``gradient_accumulation_steps``).

    Args:
        logps: ``(B, T)`` per-token log-probs of the completions under the policy (with grad).
        old_logps: ``(B, T)`` the same under the policy that sampled them, stored at generation; on
            the first update pass ``logps.detach()`` (then ``w = 1``: the loss value is ~0 for
            centred advantages, its gradient is not).
        advantages: ``(B,)`` one per completion (or ``(B, T)`` per token).
        completion_mask: ``(B, T)`` 1 on completion tokens, 0 on padding (anything there is ignored).
        ref_logps: ``(B, T)`` reference log-probs; required when ``beta != 0``.
        beta: KL coefficient (TRL 1.x default 0.0).
        epsilon, epsilon_high: the clip range ``[1 - epsilon, 1 + epsilon_high]`` (``epsilon_high``
            None: ``epsilon``); for ``cispo`` ``epsilon_high`` is the cap.
        delta: cap of the unclipped weight (two-sided clipping), None: off.
        loss_type: see above and :func:`_grpo_aggregate`.
        importance_sampling_level: ``token`` or ``sequence``.
        max_completion_length: the generation limit; required for ``dr_grpo``.
        num_items_in_batch: the active (masked-in) tokens of the whole generation batch (dapo,
            cispo, vespo); None: this call's.
        gradient_accumulation_steps: ``G``, micro-batches per optimizer step.
        steps_per_generation: ``S``, micro-batches per generation batch (None: ``G``).
        use_bias_correction_kl: multiply the KL by the importance weight.
        sapo_temperature_pos, sapo_temperature_neg, vespo_k_pos, vespo_k_neg, vespo_lambda_pos,
            vespo_lambda_neg: the sapo and vespo parameters.
        truncated: ``(B,)`` bool, rows left out of the loss (``mask_truncated_completions``): their
            mask is zeroed before anything else (they still count in ``B``; at sequence level w = 1).
        entropy: ``(B, T)`` per-token entropies, for the ``entropy`` metric.

    Returns:
        ``(loss, metrics)``, metrics detached: ``kl`` (masked token mean, when ``ref_logps`` is
        given), ``entropy`` (when given); for the clipped family ``clip_ratio/low_mean``,
        ``low_min``, ``high_mean``, ``high_max``, ``region_mean`` (``low``: ``w' < 1 - epsilon`` and
        ``A < 0``; ``high``: ``w' > 1 + epsilon_high`` and ``A > 0``; see :func:`_clip_indicators`)
        and ``clip_ratio`` (= ``region_mean``); ``cispo_clip_ratio`` (``w > epsilon_high`` and
        ``A > 0``); ``vespo/phi_seq_mean``.
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"grpo_loss: unknown loss_type {loss_type!r}; expected one of {_choices(GRPO_LOSS_TYPES)}")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"grpo_loss: unknown importance_sampling_level {importance_sampling_level!r}; expected one "
                         f"of {_choices(IMPORTANCE_SAMPLING_LEVELS)}")
    bad_length = (
        not isinstance(max_completion_length, int)
        or isinstance(max_completion_length, bool)
        or max_completion_length < 1
    )
    if loss_type == "dr_grpo" and bad_length:
        raise ValueError(
            "grpo_loss: loss_type 'dr_grpo' divides by batch_size * max_completion_length and needs "
            f"max_completion_length (a positive int), got {max_completion_length!r}"
        )
    if beta < 0:
        raise ValueError(f"grpo_loss: beta must be >= 0, got {beta}")
    if beta != 0.0 and ref_logps is None:
        raise ValueError(f"grpo_loss: beta={beta} needs ref_logps (the reference model's per-token log-probs)")
    eps_low = float(epsilon)
    eps_high = eps_low if epsilon_high is None else float(epsilon_high)
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"grpo_loss: epsilon and epsilon_high must be >= 0, got {epsilon} and {epsilon_high}")
    if logps.dim() != 2 or old_logps.shape != logps.shape or completion_mask.shape != logps.shape:
        raise ValueError(
            "grpo_loss: logps, old_logps and completion_mask must all be (B, T), got "
            f"{tuple(logps.shape)}, {tuple(old_logps.shape)}, {tuple(completion_mask.shape)}"
        )
    if ref_logps is not None and ref_logps.shape != logps.shape:
        raise ValueError(f"grpo_loss: ref_logps must be {tuple(logps.shape)}, got {tuple(ref_logps.shape)}")
    if advantages.shape == logps.shape[:1]:
        advantages = advantages.unsqueeze(-1)
    elif advantages.shape != logps.shape:
        raise ValueError(
            f"grpo_loss: advantages must be (B,) or (B, T) = {tuple(logps.shape)}, got {tuple(advantages.shape)}"
        )
    if gradient_accumulation_steps < 1 or (steps_per_generation is not None and steps_per_generation < 1):
        raise ValueError(f"grpo_loss: gradient_accumulation_steps and steps_per_generation must be >= 1, got "
                         f"{gradient_accumulation_steps} and {steps_per_generation}")

    mask = completion_mask.bool()
    if truncated is not None:  # mask_truncated_completions: such a row adds nothing, yet counts in B
        mask = mask & ~truncated.bool().unsqueeze(-1)
    log_ratio = torch.where(mask, logps - old_logps, torch.zeros_like(logps))
    if importance_sampling_level == "token":
        w = torch.exp(log_ratio)
    else:  # GSPO: exp of the MEAN token log-ratio, one weight per sequence (a fully masked row: w = 1)
        w = torch.exp(log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1))

    per_token, w_capped, extra = _grpo_per_token_loss(
        loss_type, w, log_ratio, logps, advantages, mask, eps_low, eps_high, delta, sapo_temperature_pos,
        sapo_temperature_neg, (vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg))
    per_token_kl = None
    if ref_logps is not None:
        d = ref_logps - logps
        per_token_kl = torch.exp(d) - d - 1.0
        if use_bias_correction_kl:
            per_token_kl = per_token_kl * w
    if beta != 0.0:
        per_token = per_token + beta * per_token_kl
    per_token = torch.where(mask, per_token.expand_as(logps), torch.zeros_like(logps))
    loss = _grpo_aggregate(per_token, mask, loss_type, max_completion_length, num_items_in_batch,
                           gradient_accumulation_steps, steps_per_generation)

    with torch.no_grad():
        n_tokens = mask.sum().clamp(min=1)
        metrics: dict[str, Tensor] = {}
        if per_token_kl is not None:
            metrics["kl"] = _masked_sum(per_token_kl.detach(), mask) / n_tokens
        if entropy is not None:
            metrics["entropy"] = _masked_sum(entropy.detach(), mask) / n_tokens
        w_capped = w_capped.detach()
        if loss_type in CLIPPED_LOSS_TYPES:
            low = (w_capped < 1.0 - eps_low) & (advantages < 0)
            high = (w_capped > 1.0 + eps_high) & (advantages > 0)
            if low.shape[-1] != w_capped.shape[-1]:  # (B, T) advantages against one weight per sequence
                low, high = low.expand_as(logps), high.expand_as(logps)
            metrics.update(_clip_indicators(low, high, mask, logps.dtype))
            metrics["clip_ratio"] = metrics["clip_ratio/region_mean"]
        elif loss_type == "cispo":
            capped = (w_capped > eps_high) & (advantages > 0)
            if capped.shape[-1] == 1:
                metrics["cispo_clip_ratio"] = capped.to(logps.dtype).mean()
            else:
                metrics["cispo_clip_ratio"] = _masked_sum(capped.to(logps.dtype), mask) / n_tokens
        elif loss_type == "vespo":
            metrics["vespo/phi_seq_mean"] = extra["phi"].mean()
    return loss, metrics


# PPO with a critic: its pure functions live in their own module (GAE, whitening, the clipped losses,
# the KL controller) and are part of this one's interface.
from ftbench.objectives.ppo_losses import (KLController, gae, ppo_policy_loss, ppo_rewards,  # noqa: E402,F401
                                           ppo_value_loss, whiten)
