"""Pure functions of PPO with a critic (re-exported by :mod:`ftbench.objectives.losses`): tensors in,
tensors out, no model.

They follow TRL's former ``PPOTrainer`` (``trl/trainer/ppo_trainer.py`` and ``trl/core.py``, TRL
0.12-0.19), which implements Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO: A
Case Study on TL;DR Summarization", and the adaptive KL controller of Ziegler et al. 2019 as TRL
<= 0.11 had it (``AdaptiveKLController``). Per-token tensors are ``(B, T)`` over the completion
tokens; ``mask`` is 1 on the tokens up to and including each completion's first EOS.

Where ftbench differs from TRL, it is written at the function:

- the score goes on the completion's last token (its EOS, or its last token when it never ended);
  TRL adds it one position later, on the first padding token (``sequence_lengths_p1``; trl#1893,
  trl#3750), and trains values on that extra position;
- ``policy/approxkl`` and ``val/ratio`` are means over the completion tokens; TRL averages them
  over the whole padded ``(B, T)`` block, where padding contributes 0 and 1.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

#: added to the variance before the square root in :func:`whiten` (TRL's ``masked_whiten``)
WHITEN_EPS = 1e-8


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` over the positions where ``mask`` is nonzero (TRL's ``masked_mean``)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum()


def masked_var(x: Tensor, mask: Tensor) -> Tensor:
    """Bessel-corrected variance of ``x`` over ``mask`` (TRL's ``masked_var(unbiased=True)``)."""
    mask = mask.to(x.dtype)
    count = mask.sum()
    if count < 2:
        raise ValueError(f"whiten: the mask keeps {int(count)} value(s); a variance needs at least 2 "
                         "(more completion tokens per mini-batch)")
    centred = x - masked_mean(x, mask)
    return masked_mean(centred**2, mask) * count / (count - 1)


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """``(x - mean) / sqrt(var + 1e-8)`` over ``mask`` (TRL's ``masked_whiten``); with ``shift_mean``
    False the mean is added back (only the scale changes: reward whitening, Huang et al. 2024 keep
    the rewards' mean so that the value function's targets keep their sign). Positions outside the
    mask are transformed too: the caller zeroes them."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + WHITEN_EPS)
    return out + mean if not shift_mean else out


def last_token_index(mask: Tensor) -> Tensor:
    """``(B,)`` index of each row's last masked token (0 for an empty row)."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (mask.long() * positions).argmax(dim=1)


def ppo_rewards(scores: Tensor, logps: Tensor, ref_logps: Tensor, mask: Tensor, kl_coef: float
                ) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token rewards: ``-kl_coef * kl_t`` on every completion token, plus the score on the last
    one. ``kl_t = logp_t - ref_logp_t`` (k1, Schulman's estimator; TRL's default ``kl_estimator:
    k1``), of the sampled token under the policy that sampled it.

    Returns ``(rewards, kl, non_score_reward)``, each ``(B, T)`` and 0 outside ``mask``.
    """
    mask = mask.to(logps.dtype)
    kl = (logps - ref_logps) * mask
    non_score_reward = -kl_coef * kl
    rewards = non_score_reward.clone()
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.dtype) * (mask.sum(1) > 0).to(rewards.dtype)
    return rewards, kl, non_score_reward


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), backwards over the tokens:
    ``delta_t = r_t + gamma V_{t+1} - V_t``, ``A_t = delta_t + gamma lam A_{t+1}``, with ``V`` and
    ``r`` 0 outside ``mask`` (after the last token the episode has ended: ``V_{T} = 0``). The
    returns (the value targets) are ``A + V``. TRL's loop, unwhitened.

    Returns ``(advantages, returns)``, ``(B, T)``; both 0 after each row's last token.
    """
    mask = mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    T = rewards.shape[1]
    last = torch.zeros_like(rewards[:, 0])
    reversed_advantages = []
    for t in reversed(range(T)):
        next_values = values[:, t + 1] if t < T - 1 else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last = delta + gamma * lam * last
        reversed_advantages.append(last)
    advantages = torch.stack(reversed_advantages[::-1], dim=1)
    return advantages, advantages + values


def ppo_policy_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, cliprange: float = 0.2
                    ) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017), mean over the completion tokens:
    ``max(-A rho, -A clip(rho, 1 - e, 1 + e))`` with ``rho = exp(logp - old_logp)``.

    Metrics (detached): ``clipfrac`` (share of tokens where the clipped term is the larger),
    ``approxkl`` (``0.5 (logp - old_logp)^2``, mean over tokens) and ``ratio`` (mean ``rho``).
    """
    diff = logps - old_logps
    ratio = torch.exp(diff)
    losses = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(losses, clipped), mask)
    with torch.no_grad():
        metrics = {"clipfrac": masked_mean((clipped > losses).to(logps.dtype), mask),
                   "approxkl": masked_mean(0.5 * diff**2, mask),
                   "ratio": masked_mean(ratio, mask)}
    return loss, metrics


def ppo_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, cliprange_value: float = 0.2
                   ) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped value loss (OpenAI baselines' ``ppo2``; TRL): ``0.5 * max((V - R)^2,
    (clip(V, V_old - c, V_old + c) - R)^2)``, mean over the completion tokens. Metric ``clipfrac``:
    share of tokens where the clipped term is the larger."""
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    losses = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(losses, clipped), mask)
    with torch.no_grad():
        metrics = {"clipfrac": masked_mean((clipped > losses).to(values.dtype), mask)}
    return loss, metrics


class KLController:
    """The KL coefficient beta of the per-token penalty: fixed (``target`` None: TRL 0.12-0.19's
    ``kl_coef``), or adaptive (Ziegler et al. 2019, sec. 2.2; TRL <= 0.11's ``AdaptiveKLController``):
    after each rollout batch of ``n_steps`` episodes whose KL (summed over tokens, mean over
    sequences) is ``current``, ``beta *= 1 + clip(current / target - 1, -0.2, 0.2) * n_steps / horizon``."""

    def __init__(self, kl_coef: float, target: Optional[float] = None, horizon: float = 10000.0):
        self.value = float(kl_coef)
        self.target = target
        self.horizon = float(horizon)

    def update(self, current: float, n_steps: int) -> float:
        """Adapt the coefficient to the measured KL (a no-op when fixed); returns the new value."""
        if self.target is not None:
            error = min(max(float(current) / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

