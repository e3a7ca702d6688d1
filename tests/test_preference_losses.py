"""The preference losses of TRL 1.16 in ``ftbench.objectives.losses``, against values computed by hand
(scalar ``math`` per pair, float64, to 1e-6): every DPO loss type (per pair and on the batch, the
MPO combination), KTO with its KL estimate and clamp, CPO / SimPO / AlphaPO, ORPO; TRL's metric names
and the rules for when they exist."""

from __future__ import annotations

import math

import pytest
import torch

from ftbench.data.unpaired import kl_completion_order
from ftbench.objectives.losses import (CPO_LOSS_TYPES, DPO_LOSS_TYPES, DPO_PAIR_LOSS_TYPES, cpo_loss, dpo_batch_loss,
                                       dpo_loss, kto_loss, orpo_loss)


def t(*xs, dtype=torch.float64):
    return torch.tensor(xs, dtype=dtype)


def close(actual, expected, tol=1e-6):
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert torch.allclose(torch.as_tensor(actual).double(), expected, atol=tol, rtol=0), (actual, expected)


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def ls(x: float) -> float:  # log sigmoid
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


# Three pairs, beta 0.5 (as tests/test_losses.py):
#   c = pi_c - ref_c = [0.5, -1.0, 1.5]; r = pi_r - ref_r = [-0.5, 1.5, -2.5]; D = c - r = [1.0, -2.5, 4.0]
PI_C, PI_R = t(-1.0, -3.0, -0.5), t(-2.0, -1.0, -3.0)
REF_C, REF_R = t(-1.5, -2.0, -2.0), t(-1.5, -2.5, -0.5)
B = 0.5
C, R = [0.5, -1.0, 1.5], [-0.5, 1.5, -2.5]
D = [c - r for c, r in zip(C, R)]
LEN_C, LEN_R = t(2, 5, 3), t(1, 2, 4)


def dpo(loss_type, **kw):
    return dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=B, loss_type=loss_type, **kw)


def per_pair(f):
    return [f(c, r) for c, r in zip(C, R)]


# ---------------------------------------------------------------------------- DPO, per pair
def test_every_trl_dpo_loss_type_is_known():
    assert set(DPO_LOSS_TYPES) == {"sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
                                   "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"}
    assert set(DPO_LOSS_TYPES) - set(DPO_PAIR_LOSS_TYPES) == {"aot", "aot_unpaired", "sft"}


def test_exo_pair():
    e = 0.1
    losses, _, _ = dpo("exo_pair", label_smoothing=e)

    def exo(c, r):
        q = sig(B * (c - r))
        return q * (ls(B * (c - r)) - math.log(1 - e)) + (1 - q) * (ls(-B * (c - r)) - math.log(e))

    close(losses, per_pair(exo))
    # pair 0 by hand: x = 0.5, q = 0.622459, ls(0.5) = -0.474077, ls(-0.5) = -0.974077
    # 0.622459 * (-0.474077 + 0.105361) + 0.377541 * (-0.974077 + 2.302585) = -0.229510 + 0.501565
    assert float(losses[0]) == pytest.approx(0.2720549, abs=1e-6)


def test_nca_pair():
    losses, _, _ = dpo("nca_pair")
    close(losses, per_pair(lambda c, r: -ls(B * c) - 0.5 * ls(-B * c) - 0.5 * ls(-B * r)))


def test_bco_pair_has_no_running_mean_shift():
    losses, _, _ = dpo("bco_pair")
    close(losses, per_pair(lambda c, r: -ls(B * c) - ls(-B * r)))
    # pair 0: -ls(0.25) - ls(0.25) = 2 x 0.575939
    assert float(losses[0]) == pytest.approx(2 * 0.5759394, abs=1e-6)


def test_sppo_hard():
    losses, _, _ = dpo("sppo_hard")
    # 1 / (2 beta) = 1: (c - 1)^2 + (r + 1)^2 = [0.25 + 0.25, 4 + 6.25, 0.25 + 2.25]
    close(losses, [0.5, 10.25, 2.5])


def test_apo_zero_and_apo_down():
    zero, _, _ = dpo("apo_zero")
    close(zero, per_pair(lambda c, r: 1 - sig(B * c) + sig(B * r)))
    down, _, _ = dpo("apo_down")
    close(down, per_pair(lambda c, r: sig(B * c) + 1 - sig(B * (c - r))))


def test_discopop():
    tau = 0.05
    losses, _, _ = dpo("discopop")  # TRL's default tau 0.05

    def disco(c, r, tau=tau):
        x = B * (c - r)
        m = sig(x / tau)
        return (1 - m) * -ls(x) + m * math.exp(-x)

    close(losses, per_pair(disco))
    wide, _, _ = dpo("discopop", discopop_tau=2.0)
    close(wide, per_pair(lambda c, r: disco(c, r, 2.0)))


def test_sigmoid_norm_averages_per_token_and_ignores_label_smoothing():
    losses, chosen, rejected = dpo("sigmoid_norm", chosen_lengths=LEN_C, rejected_lengths=LEN_R, label_smoothing=0.3)
    # c / len_c = [0.25, -0.2, 0.5]; r / len_r = [-0.5, 0.75, -0.625]
    close(losses, [-ls(B * 0.75), -ls(B * -0.95), -ls(B * 1.125)])
    close(chosen, [0.25, -0.5, 0.75])  # rewards: b x the summed log-ratios
    close(rejected, [-0.25, 0.75, -1.25])
    with pytest.raises(ValueError, match="loss_type 'sigmoid_norm' averages the log-ratios per completion token"):
        dpo("sigmoid_norm")


def test_per_pair_losses_equal_the_batch_of_one():
    """TRL's per-pair loss is what it gives for a batch of one pair."""
    for loss_type in DPO_PAIR_LOSS_TYPES:
        kw = {"label_smoothing": 0.2} if loss_type == "exo_pair" else {}
        losses, _, _ = dpo(loss_type, chosen_lengths=LEN_C, rejected_lengths=LEN_R, **kw)
        for i in range(3):
            one = dpo_batch_loss(PI_C[i:i + 1], PI_R[i:i + 1], REF_C[i:i + 1], REF_R[i:i + 1], beta=B,
                                 loss_type=loss_type, chosen_lengths=LEN_C[i:i + 1], rejected_lengths=LEN_R[i:i + 1],
                                 **kw)
            close(one, float(losses[i]))


def test_errors_of_the_new_types():
    with pytest.raises(ValueError, match=r"loss_type 'exo_pair' needs label_smoothing in \(0, 1\) \(its log\(e\) term\), got 0.0"):
        dpo("exo_pair")
    with pytest.raises(ValueError, match="discopop_tau must be > 0, got 0"):
        dpo("discopop", discopop_tau=0)
    with pytest.raises(ValueError, match="unknown loss_type 'aot'"):
        dpo("aot")  # a batch-level type: dpo_batch_loss


# ---------------------------------------------------------------------------- DPO, on the batch
def test_aot_sorts_over_the_batch():
    # pi_c - pi_r = [1, -2, 2.5] -> sorted [-2, 1, 2.5]; ref_c - ref_r = [0, 0.5, -1.5] -> [-1.5, 0, 0.5]
    # delta = [-0.5, 1, 2]
    delta = [-0.5, 1.0, 2.0]
    loss = dpo_batch_loss(PI_C, PI_R, REF_C, REF_R, beta=B, loss_type="aot")
    close(loss, sum(-ls(B * d) for d in delta) / 3)
    e = 0.1
    smooth = dpo_batch_loss(PI_C, PI_R, REF_C, REF_R, beta=B, loss_type="aot", label_smoothing=e)
    close(smooth, sum(-(1 - e) * ls(B * d) - e * ls(-B * d) for d in delta) / 3)
    # not the sorting-free DPO: the pairs' own deltas are [1, -2.5, 4]
    plain = dpo_batch_loss(PI_C, PI_R, REF_C, REF_R, beta=B, loss_type="sigmoid")
    assert abs(float(loss) - float(plain)) > 0.1


def test_aot_unpaired_sorts_the_log_ratios_apart():
    # sort(c) = [-1, 0.5, 1.5], sort(r) = [-2.5, -0.5, 1.5]; delta = [1.5, 1.0, 0.0]
    loss = dpo_batch_loss(PI_C, PI_R, REF_C, REF_R, beta=B, loss_type="aot_unpaired")
    close(loss, (-ls(0.75) - ls(0.5) - ls(0.0)) / 3)


def test_sft_is_one_token_mean_over_the_batch():
    logps = t(-1.0, -2.0, 9.0, -3.0, 7.0, 7.0).reshape(2, 3)  # padded slots hold anything
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss = dpo_batch_loss(PI_C[:2], PI_R[:2], REF_C[:2], REF_R[:2], beta=B, loss_type="sft",
                          chosen_token_logps=logps, chosen_token_mask=mask)
    close(loss, 2.0)  # (1 + 2 + 3) / 3 tokens, not mean(1.5, 3) = 2.25
    # from the summed log-probs and the lengths: the same quantity
    summed = dpo_batch_loss(t(-3.0, -3.0), PI_R[:2], REF_C[:2], REF_R[:2], beta=B, loss_type="sft",
                            chosen_lengths=t(2, 1))
    close(summed, 2.0)


def test_mpo_weighted_combination():
    logps = t(-0.5, -0.5, -1.0, -2.0, -0.5, 0.0).reshape(3, 2)
    mask = torch.tensor([[1, 1], [1, 1], [1, 0]])
    loss = dpo_batch_loss(PI_C, PI_R, REF_C, REF_R, beta=B, loss_type=["sigmoid", "bco_pair", "sft"],
                          loss_weights=[0.8, 0.2, 1.0], chosen_token_logps=logps, chosen_token_mask=mask)
    sigmoid = sum(-ls(B * d) for d in D) / 3
    bco = sum(-ls(B * c) - ls(-B * r) for c, r in zip(C, R)) / 3
    sft = (0.5 + 0.5 + 1.0 + 2.0 + 0.5) / 5
    close(loss, 0.8 * sigmoid + 0.2 * bco + 1.0 * sft)
    # no weights: 1.0 each
    unweighted = dpo_batch_loss(PI_C, PI_R, REF_C, REF_R, beta=B, loss_type=["sigmoid", "hinge"])
    close(unweighted, sigmoid + sum(max(0.0, 1 - B * d) for d in D) / 3)
    with pytest.raises(ValueError, match=r"2 loss_weights for 3 loss types"):
        dpo_batch_loss(PI_C, PI_R, REF_C, REF_R, loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[1, 1],
                       chosen_lengths=LEN_C)


def test_batch_loss_is_float64_safe_and_differentiable():
    pc = PI_C.clone().requires_grad_()
    loss = dpo_batch_loss(pc, PI_R, REF_C, REF_R, beta=B, loss_type=["aot", "sigmoid"])
    assert loss.dtype == torch.float64
    loss.backward()
    assert pc.grad is not None and torch.all(pc.grad != 0)


# ---------------------------------------------------------------------------- KTO
POL, REF = t(-1.0, -2.0, -0.5, -3.0), t(-1.5, -1.0, -1.0, -2.0)  # rho = [0.5, -1.0, 0.5, -1.0]
LABELS = torch.tensor([True, False, True, False])


def test_kl_completion_order_is_the_previous_example_cyclic():
    assert kl_completion_order(4) == [3, 0, 1, 2]
    assert kl_completion_order(2) == [1, 0]
    with pytest.raises(ValueError, match="needs a batch of at least 2 rows, got 1"):
        kl_completion_order(1)


def test_kto_with_the_kl_estimate():
    kl_pol, kl_ref = t(-2.0, -1.0, -3.0, -1.0), t(-2.5, -1.5, -2.2, -1.4)  # differences [0.5, 0.5, -0.8, 0.4]
    z = 0.15  # their mean, over both labels
    losses, kl, m = kto_loss(POL, REF, LABELS, kl_pol, kl_ref, beta=B, desirable_weight=2.0, undesirable_weight=0.5)
    close(kl, z)
    rho = [0.5, -1.0, 0.5, -1.0]
    want = [2.0 * (1 - sig(B * (rho[0] - z))), 0.5 * (1 - sig(B * (z - rho[1]))),
            2.0 * (1 - sig(B * (rho[2] - z))), 0.5 * (1 - sig(B * (z - rho[3])))]
    close(losses, want)  # in input order, weighted; the batch loss is their plain mean
    assert list(m) == ["kl", "rewards/chosen", "logps/chosen", "rewards/rejected", "logps/rejected", "rewards/margins"]
    close(m["kl"], z)
    close(m["rewards/chosen"], 0.25)  # b rho over desirable, no z subtracted
    close(m["rewards/rejected"], -0.5)
    close(m["rewards/margins"], 0.75)
    close(m["logps/chosen"], -0.75)
    close(m["logps/rejected"], -2.5)


def test_kto_kl_is_clamped_at_zero_and_detached():
    kl_pol = t(-3.0, -3.0, -3.0, -3.0).requires_grad_()
    kl_ref = t(-1.0, -1.0, -1.0, -1.0)  # mean difference -2 -> clamped to 0
    pol = POL.clone().requires_grad_()
    losses, kl, _ = kto_loss(pol, REF, LABELS, kl_pol, kl_ref, beta=B)
    assert float(kl) == 0.0
    rho = [0.5, -1.0, 0.5, -1.0]
    close(losses, [1 - sig(B * rho[0]), 1 - sig(-B * rho[1]), 1 - sig(B * rho[2]), 1 - sig(-B * rho[3])])
    losses.mean().backward()
    assert kl_pol.grad is None and pol.grad is not None  # no gradient through the KL estimate


def test_kto_apo_zero_unpaired_and_one_kind_of_label():
    losses, kl, m = kto_loss(POL, REF, LABELS, None, None, beta=B, loss_type="apo_zero_unpaired")
    rho = [0.5, -1.0, 0.5, -1.0]
    close(losses, [1 - sig(B * rho[0]), sig(B * rho[1]), 1 - sig(B * rho[2]), sig(B * rho[3])])
    assert float(kl) == 0.0 and float(m["kl"]) == 0.0
    only_good = torch.ones(4, dtype=torch.bool)
    _, _, m = kto_loss(POL, REF, only_good, POL, REF, beta=B)
    assert "rewards/chosen" in m and "rewards/rejected" not in m and "rewards/margins" not in m
    assert "logps/rejected" not in m
    with pytest.raises(ValueError, match="loss_type 'kto' needs kl_logps and ref_kl_logps"):
        kto_loss(POL, REF, LABELS, beta=B)


# ---------------------------------------------------------------------------- CPO / SimPO / AlphaPO
# chosen tokens [-0.5, -1.5] (sum -2, mean -1); rejected [-1, -2, -3] (sum -6, mean -2); padding holds junk
CH = t(-0.5, -1.5, 5.0, -1.0, -1.0, -1.0).reshape(2, 3)
CH_MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])
RJ = t(-1.0, -2.0, -3.0, -2.0, 9.0, 9.0).reshape(2, 3)
RJ_MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])
# pair 0: sums (-2, -6), means (-1, -2); pair 1: sums (-3, -2), means (-1, -2)
SUMS = [(-2.0, -6.0), (-3.0, -2.0)]
MEANS = [(-1.0, -2.0), (-1.0, -2.0)]
NLL = (0.5 + 1.5 + 1 + 1 + 1) / 5  # the chosen completion tokens of the batch: one token mean


def cpo(loss_type, **kw):
    return cpo_loss(CH, CH_MASK, RJ, RJ_MASK, **{"beta": B, "loss_type": loss_type, **kw})


def test_cpo_sigmoid_sums_and_adds_the_nll():
    loss, losses, m = cpo("sigmoid", label_smoothing=0.1)
    want = [-(0.9) * ls(B * (c - r)) - 0.1 * ls(-B * (c - r)) for c, r in SUMS]
    close(losses, want)
    close(loss, sum(want) / 2 + 1.0 * NLL)  # cpo_alpha 1.0 by default
    assert list(m) == ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                       "logps/rejected", "nll_loss"]
    close(m["rewards/chosen"], B * -2.5)
    close(m["rewards/rejected"], B * -4.0)
    close(m["rewards/accuracies"], 0.5)  # pair 0 only
    close(m["rewards/margins"], B * 1.5)
    close(m["logps/chosen"], -2.5)
    close(m["nll_loss"], NLL)


def test_cpo_hinge_and_ipo():
    _, hinge, _ = cpo("hinge", cpo_alpha=0.0)
    close(hinge, [max(0.0, 1 - B * (c - r)) for c, r in SUMS])  # sums
    loss, ipo, m = cpo("ipo", cpo_alpha=0.0)
    close(ipo, [(1.0 - 1.0) ** 2, (1.0 - 1.0) ** 2])  # means: u = 1 = 1 / (2 b)
    close(loss, 0.0)
    close(m["nll_loss"], 0.0)  # cpo_alpha 0: no NLL


def test_simpo_means_and_the_margin():
    gamma = 0.5
    loss, losses, m = cpo("simpo", cpo_alpha=0.0, simpo_gamma=gamma)
    # u = mean_c - mean_r = 1; -logsig(b u - gamma) = -logsig(0)
    close(losses, [math.log(2.0), math.log(2.0)])
    close(loss, math.log(2.0))
    close(m["logps/chosen"], -1.0)  # per-token means for simpo
    close(m["rewards/margins"], B * 1.0)


def test_alphapo_shapes_the_rewards_and_alphapo_type_is_simpo_without_nll():
    a = 0.3
    loss, losses, m = cpo("simpo", cpo_alpha=0.0, alpha=a, simpo_gamma=0.2)

    def r(s):
        return (1 - math.exp(s) ** (-a)) / a

    us = [r(c) - r(rr) for c, rr in MEANS]
    close(losses, [-ls(B * (u - 0.2 / B)) for u in us])
    close(m["rewards/chosen"], B * r(-1.0))
    sugar, sugar_losses, sugar_m = cpo("alphapo", cpo_alpha=1.0, alpha=a, simpo_gamma=0.2)
    close(sugar, loss)  # -> simpo with cpo_alpha = 0
    close(sugar_m["nll_loss"], 0.0)
    assert "alphapo" in CPO_LOSS_TYPES
    # alpha is NOT set by loss_type alphapo: at alpha = 0 it is plain SimPO
    plain, _, _ = cpo("alphapo", simpo_gamma=0.2)
    close(plain, -ls(B * 1.0 - 0.2))


# ---------------------------------------------------------------------------- ORPO
def test_orpo_odds_ratio_and_nll_on_the_tokens_given():
    nll_logps = t(-1.0, -2.0, -3.0, -4.0).reshape(2, 2)
    nll_mask = torch.tensor([[1, 1], [1, 0]])
    loss, losses, m = orpo_loss(CH, CH_MASK, RJ, RJ_MASK, beta=B, nll_token_logps=nll_logps, nll_mask=nll_mask)

    def log_odds(sc, sr):
        return (sc - sr) - (math.log1p(-math.exp(sc)) - math.log1p(-math.exp(sr)))

    lo = [log_odds(c, r) for c, r in MEANS]  # both pairs: means (-1, -2)
    close(losses, [B * ls(x) for x in lo])
    nll = (1 + 2 + 3) / 3
    close(loss, nll - sum(B * ls(x) for x in lo) / 2)
    assert list(m) == ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                       "logps/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen"]
    close(m["nll_loss"], nll)
    close(m["log_odds_ratio"], sum(ls(x) for x in lo) / 2)
    close(m["log_odds_chosen"], sum(lo) / 2)
    close(m["rewards/chosen"], -B)
    close(m["rewards/margins"], B)
    # by hand: log_odds(-1, -2) = 1 - (log(1 - e^-1) - log(1 - e^-2)) = 1 - (-0.458675 + 0.145413) = 1.313262
    assert lo[0] == pytest.approx(1.3132617, abs=1e-6)
    # without NLL tokens: the chosen completion tokens
    alone, _, m = orpo_loss(CH, CH_MASK, RJ, RJ_MASK, beta=B)
    close(m["nll_loss"], NLL)
