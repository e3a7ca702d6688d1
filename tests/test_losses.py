"""ftbench.objectives.losses against values worked out by hand (the arithmetic is in the comments and
in plain ``math``), against a naive log-softmax, and the exact error messages."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from ftbench.objectives.losses import (
    dpo_loss,
    dpo_metrics,
    frac_reward_zero_std,
    grpo_advantages,
    grpo_loss,
    reward_loss,
    reward_metrics,
    rloo_advantages,
    sequence_logps,
    token_logps,
)

TOL = dict(rtol=0, atol=1e-6)


def t(*xs, dtype=torch.float64):
    return torch.tensor(xs, dtype=dtype)


def close(actual: torch.Tensor, expected) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, **TOL)


def nls(x: float) -> float:
    """-log(sigmoid(x)) = log(1 + e^-x)."""
    return math.log1p(math.exp(-x))


def _raises(exc_msg: str):
    return pytest.raises(ValueError, match="^" + re.escape(exc_msg) + "$")


# --------------------------------------------------------------------------------------------
# sequence_logps
# --------------------------------------------------------------------------------------------


def test_sequence_logps_one_row_by_hand():
    # V = 3, T = 4. labels[1:] = [2, -100, 0]: position 0 predicts token 2, position 1 is skipped,
    # position 2 predicts token 0; position 3's logits predict nothing (causal shift).
    logits = torch.tensor([[[0.0, 1.0, 2.0], [100.0, 0.0, 0.0], [1.0, 1.0, 1.0], [9.0, -9.0, 0.0]]])
    labels = torch.tensor([[-100, 2, -100, 0]])
    sums, counts = sequence_logps(logits, labels)
    # log p(2 | [0, 1, 2]) = 2 - log(e^0 + e^1 + e^2);  log p(0 | [1, 1, 1]) = log(1/3)
    expected = 2.0 - math.log(1.0 + math.e + math.e**2) + math.log(1.0 / 3.0)
    assert sums.dtype == torch.float32 and sums.shape == (1,)
    close(sums, [expected])
    assert counts.tolist() == [2] and counts.dtype == torch.int64
    per_token, mask = token_logps(logits, labels)
    close(per_token, [[2.0 - math.log(1.0 + math.e + math.e**2), 0.0, math.log(1.0 / 3.0)]])
    assert mask.tolist() == [[True, False, True]]


def _naive(logits: torch.Tensor, labels: torch.Tensor):
    """Per-token log-probs from a full F.log_softmax, in float64."""
    lp = F.log_softmax(logits[:, :-1].double(), dim=-1)
    tgt = labels[:, 1:]
    keep = tgt != -100
    return lp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep, keep


def _batch(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 7, 11, generator=g, dtype=torch.float64) * 3).to(dtype)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[0, :3] = -100  # a prompt: labels[1:] keeps positions 3..6 -> 4 tokens
    labels[1, 5:] = -100  # padding: labels[1:] keeps positions 1..4 -> 4 tokens
    labels[2, :] = -100  # nothing to score: sum 0, count 0
    return logits, labels


def test_sequence_logps_matches_naive_log_softmax_values_and_grads():
    # float64 logits stay float64, so the comparison with the naive float64 version is exact to 1e-6
    logits, labels = _batch(torch.float64)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    sums, counts = sequence_logps(a, labels)
    ref_tok, ref_keep = _naive(b, labels)
    ref_sums = ref_tok.sum(-1)
    assert sums.dtype == torch.float64
    close(sums, ref_sums.detach())
    assert counts.tolist() == ref_keep.sum(-1).tolist() == [4, 4, 0]
    assert sums[2].item() == 0.0
    weights = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    (sums * weights).sum().backward()
    (ref_sums * weights).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, **TOL)
    assert a.grad[2].abs().sum() == 0  # the row with nothing to score gets no gradient


def test_sequence_logps_bf16_logits_computed_in_fp32():
    logits, labels = _batch(torch.bfloat16)
    sums, counts = sequence_logps(logits, labels)
    per_token, mask = token_logps(logits, labels)
    assert sums.dtype == per_token.dtype == torch.float32
    ref_tok, ref_keep = _naive(logits, labels)  # the bf16 values, upcast to float64 first
    close(per_token, ref_tok.float())
    torch.testing.assert_close(sums, ref_tok.sum(-1).float(), rtol=1e-6, atol=1e-6)
    assert mask.tolist() == ref_keep.tolist() and counts.tolist() == [4, 4, 0]
    # A bf16 log-softmax is off by far more than the tolerance: the test tells the two apart.
    bf16 = F.log_softmax(logits[:, :-1], dim=-1).gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    assert ((bf16.double() - ref_tok) * ref_keep).abs().max() > 1e-3


def test_sequence_logps_shape_error():
    with _raises("token_logps: logits must be (B, T, V) and labels (B, T) with the same B and T, "
                 "got logits (2, 5, 3) and labels (2, 4)"):
        sequence_logps(torch.zeros(2, 5, 3), torch.zeros(2, 4, dtype=torch.long))


# --------------------------------------------------------------------------------------------
# DPO
# --------------------------------------------------------------------------------------------

# Three pairs, beta = 0.5.
#   chosen log-ratios   c = pi_c - ref_c = [-1.0+1.5, -3.0+2.0, -0.5+2.0] = [0.5, -1.0, 1.5]
#   rejected log-ratios r = pi_r - ref_r = [-2.0+1.5, -1.0+2.5, -3.0+0.5] = [-0.5, 1.5, -2.5]
#   D = c - r = [1.0, -2.5, 4.0];  z = beta * D = [0.5, -1.25, 2.0]
PI_C, PI_R = t(-1.0, -3.0, -0.5), t(-2.0, -1.0, -3.0)
REF_C, REF_R = t(-1.5, -2.0, -2.0), t(-1.5, -2.5, -0.5)
BETA = 0.5
Z = [0.5, -1.25, 2.0]


def _dpo(**kw):
    return dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=BETA, **kw)


def test_dpo_sigmoid():
    losses, chosen, rejected = _dpo(loss_type="sigmoid")
    close(losses, [nls(z) for z in Z])  # -logsig(z) = log(1 + e^-z)
    close(chosen, [0.25, -0.5, 0.75])  # 0.5 * c
    close(rejected, [-0.25, 0.75, -1.25])  # 0.5 * r


def test_dpo_sigmoid_label_smoothing_is_conservative_dpo():
    losses, _, _ = _dpo(loss_type="sigmoid", label_smoothing=0.1)
    # -(1 - 0.1) logsig(z) - 0.1 logsig(-z)
    close(losses, [0.9 * nls(z) + 0.1 * nls(-z) for z in Z])
    # e = 0.5: both labels equally likely, the loss is log(1 + e^-z)/2 + log(1 + e^z)/2
    half, _, _ = _dpo(loss_type="sigmoid", label_smoothing=0.5)
    close(half, [0.5 * nls(z) + 0.5 * nls(-z) for z in Z])


def test_dpo_hinge():
    losses, chosen, _ = _dpo(loss_type="hinge")
    close(losses, [0.5, 2.25, 0.0])  # relu(1 - z) = relu([0.5, 2.25, -1.0])
    close(chosen, [0.25, -0.5, 0.75])


def test_dpo_robust():
    losses, _, _ = _dpo(loss_type="robust")
    close(losses, [nls(z) for z in Z])  # e = 0: plain DPO
    losses, _, _ = _dpo(loss_type="robust", label_smoothing=0.1)
    # (-(0.9) logsig(z) + 0.1 logsig(-z)) / (1 - 0.2) = (0.9 nls(z) - 0.1 nls(-z)) / 0.8
    close(losses, [(0.9 * nls(z) - 0.1 * nls(-z)) / 0.8 for z in Z])


def test_dpo_ipo_averages_per_token_and_rewards_use_the_sums():
    len_c, len_r = torch.tensor([2, 5, 3]), torch.tensor([1, 2, 4])
    losses, chosen, rejected = _dpo(loss_type="ipo", chosen_lengths=len_c, rejected_lengths=len_r)
    # c / len_c = [0.5/2, -1/5, 1.5/3] = [0.25, -0.2, 0.5]
    # r / len_r = [-0.5/1, 1.5/2, -2.5/4] = [-0.5, 0.75, -0.625]
    # delta = [0.75, -0.95, 1.125];  1 / (2 beta) = 1
    # (delta - 1)^2 = [0.0625, 3.8025, 0.015625]
    close(losses, [0.0625, 3.8025, 0.015625])
    # TRL 1.16 logs b x the SUMMED log-ratios for every loss type, ipo included
    close(chosen, [0.25, -0.5, 0.75])  # 0.5 * c
    close(rejected, [-0.25, 0.75, -1.25])  # 0.5 * r


def test_dpo_ipo_zero_length_counts_as_one():
    # TRL clamps the lengths to >= 1: lengths [0, 0, 0] give the same as [1, 1, 1].
    # delta = D = [1.0, -2.5, 4.0]; (D - 1)^2 = [0, 12.25, 9]
    losses, _, _ = _dpo(loss_type="ipo", chosen_lengths=torch.zeros(3), rejected_lengths=torch.tensor([1, 1, 1]))
    close(losses, [0.0, 12.25, 9.0])


def test_dpo_gradient_flows_to_policy_only_through_losses():
    pc = PI_C.clone().requires_grad_()
    losses, chosen, _ = dpo_loss(pc, PI_R, REF_C, REF_R, beta=BETA)
    assert losses.requires_grad and not chosen.requires_grad
    losses.sum().backward()
    # d/dpi_c [-logsig(beta * D)] = -beta * sigmoid(-z)
    close(pc.grad, [-BETA / (1.0 + math.exp(z)) for z in Z])


def test_dpo_errors():
    with _raises("dpo_loss: unknown loss_type 'kto'; expected one of 'sigmoid', 'ipo', 'hinge', 'robust', 'exo_pair', "
                 "'nca_pair', 'bco_pair', 'sppo_hard', 'apo_zero', 'apo_down', 'discopop', 'sigmoid_norm'"):
        _dpo(loss_type="kto")
    with _raises("dpo_loss: beta must be a positive finite number, got 0.0"):
        dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.0)
    with _raises("dpo_loss: beta must be a positive finite number, got -0.1"):
        dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=-0.1)
    with _raises("dpo_loss: label_smoothing must be in [0, 0.5] for loss_type 'sigmoid', got 0.6"):
        _dpo(label_smoothing=0.6)
    with _raises("dpo_loss: label_smoothing must be in [0, 0.5] for loss_type 'sigmoid', got -0.1"):
        _dpo(label_smoothing=-0.1)
    with _raises("dpo_loss: label_smoothing must be in [0, 0.5) for loss_type 'robust', got 0.5"):
        _dpo(loss_type="robust", label_smoothing=0.5)
    # hinge and ipo do not read label_smoothing: ignored, as TRL 1.16 (the objective refuses it: test_dpo)
    assert torch.equal(_dpo(loss_type="hinge", label_smoothing=0.1)[0], _dpo(loss_type="hinge")[0])
    ipo_msg = ("dpo_loss: loss_type 'ipo' averages the log-ratios per completion token and needs "
               "chosen_lengths and rejected_lengths (the token counts returned by sequence_logps)")
    with _raises(ipo_msg):
        _dpo(loss_type="ipo")
    with _raises(ipo_msg):
        _dpo(loss_type="ipo", chosen_lengths=torch.ones(3))
    with _raises("dpo_loss: the four log-prob tensors must have one shape, got [(2,), (3,)]"):
        dpo_loss(PI_C, PI_R, REF_C, REF_R[:2])


def test_dpo_metrics_trl_names_and_strict_accuracy():
    chosen, rejected = t(0.25, -0.5, 0.3), t(-0.25, 0.75, 0.3)  # the third pair is a tie: wrong
    m = dpo_metrics(chosen, rejected, PI_C, PI_R)
    assert list(m) == ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                       "logps/chosen", "logps/rejected"]
    close(m["rewards/chosen"], 0.05 / 3)  # (0.25 - 0.5 + 0.3) / 3
    close(m["rewards/rejected"], 0.8 / 3)  # (-0.25 + 0.75 + 0.3) / 3
    close(m["rewards/accuracies"].double(), 1.0 / 3.0)  # only pair 1
    close(m["rewards/margins"], -0.75 / 3)  # (0.5 - 1.25 + 0) / 3
    close(m["logps/chosen"], -4.5 / 3)  # (-1 - 3 - 0.5) / 3
    close(m["logps/rejected"], -2.0)  # (-2 - 1 - 3) / 3


# --------------------------------------------------------------------------------------------
# Reward model
# --------------------------------------------------------------------------------------------

R_C, R_R = t(1.0, 0.5, -0.2), t(0.0, 0.5, 0.3)  # differences [1.0, 0.0, -0.5]


def test_reward_loss_plain():
    # mean(log(1 + e^-1), log 2, log(1 + e^0.5))
    close(reward_loss(R_C, R_R), (nls(1.0) + math.log(2.0) + nls(-0.5)) / 3)


def test_reward_loss_margin():
    # differences minus margins [0.5, 0.0, 1.0] = [0.5, 0.0, -1.5]
    close(reward_loss(R_C, R_R, margin=t(0.5, 0.0, 1.0)), (nls(0.5) + math.log(2.0) + nls(-1.5)) / 3)


def test_reward_loss_centering():
    # (r_c + r_r)^2 = [1.0, 1.0, 0.01], mean 0.67; times 0.01 = 0.0067
    plain = (nls(1.0) + math.log(2.0) + nls(-0.5)) / 3
    close(reward_loss(R_C, R_R, center_rewards_coefficient=0.01), plain + 0.0067)
    close(reward_loss(R_C, R_R, margin=t(0.5, 0.0, 1.0), center_rewards_coefficient=0.01),
          (nls(0.5) + math.log(2.0) + nls(-1.5)) / 3 + 0.0067)


def test_reward_metrics_ties_count_as_wrong():
    m = reward_metrics(R_C, R_R)
    assert list(m) == ["accuracy", "margin", "mean_reward", "min_reward", "max_reward"]
    close(m["accuracy"].double(), 1.0 / 3.0)  # pair 2 ties (0.5 vs 0.5): wrong; pair 3 wrong
    close(m["margin"], 0.5 / 3)  # (1.0 + 0.0 - 0.5) / 3
    close(m["mean_reward"], 2.1 / 6)  # (1 + 0.5 - 0.2 + 0 + 0.5 + 0.3) / 6
    close(m["min_reward"], -0.2)
    close(m["max_reward"], 1.0)


# --------------------------------------------------------------------------------------------
# GRPO / RLOO advantages
# --------------------------------------------------------------------------------------------

# Two prompts, G = 4: group 1 varies, group 2 is all 0.3.
REWARDS = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.3, 0.3, 0.3, 0.3])
# group 1: mean 0.5, deviations [0.5, -0.5, 0, 0], unbiased var (0.25 + 0.25) / 3 = 1/6
GROUP1_STD = math.sqrt(1.0 / 6.0)
# batch: mean (2.0 + 1.2) / 8 = 0.4; squared deviations .36 + .16 + .01 + .01 + 4 * .01 = 0.58; var 0.58 / 7
BATCH_STD = math.sqrt(0.58 / 7.0)


def test_grpo_advantages_group():
    a = grpo_advantages(REWARDS, 4)
    s = GROUP1_STD + 1e-4
    close(a, [0.5 / s, -0.5 / s, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert (a[4:] == 0).all()  # the constant group: exactly 0
    close(grpo_advantages(REWARDS, 4, scale_rewards=True), a)


def test_grpo_advantages_batch():
    a = grpo_advantages(REWARDS, 4, scale_rewards="batch")
    s = BATCH_STD + 1e-4  # centred on the group mean, scaled by the batch std
    close(a, [0.5 / s, -0.5 / s, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert (a[4:] == 0).all()


def test_grpo_advantages_none():
    a = grpo_advantages(REWARDS, 4, scale_rewards="none")
    close(a, [0.5, -0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert (a[4:] == 0).all()
    close(grpo_advantages(REWARDS, 4, scale_rewards=False), a)


def test_grpo_advantages_constant_group_exactly_zero_despite_rounding():
    # Eight rewards of 0.3 in float32: r - mean(r) is ~3e-8, not 0, and TRL's nanstd (mean of the
    # squared deviations, times 8/7) ~3e-8; (r - mean) / (std + 1e-4) would give ~3e-4, and
    # isclose(std, 0) would not count the group. It carries no signal: exactly 0, and counted.
    r = torch.tensor([0.3] * 8 + [1.0, 0.0] * 4)
    assert (r[:8] - r[:8].mean()).abs().max() > 0  # the rounding this test is about
    for scale in ("group", "batch", "none"):
        a = grpo_advantages(r, 8, scale_rewards=scale)
        assert (a[:8] == 0).all(), scale
        assert (a[8:] != 0).all(), scale
    close(frac_reward_zero_std(r, 8), 0.5)


def test_grpo_advantages_single_generation_is_zero():
    # G = 1: std 0 by TRL's rule, r - mean = 0
    assert grpo_advantages(torch.tensor([0.7, -1.0]), 1).tolist() == [0.0, 0.0]


def test_frac_reward_zero_std():
    close(frac_reward_zero_std(REWARDS, 4), 0.5)  # group 2 of 2
    close(frac_reward_zero_std(torch.tensor([1.0, 1.0, 0.0, 1.0, 2.0, 2.0]), 2), 2.0 / 3.0)
    close(frac_reward_zero_std(torch.tensor([1.0, 0.0, 0.0, 1.0]), 2), 0.0)


def test_rloo_advantages():
    # group [1, 0, 2]: sum 3, A_i = r_i - (3 - r_i) / 2 = [1 - 1, 0 - 1.5, 2 - 0.5]
    # group [4, 4, 4]: A_i = 4 - 8 / 2 = 0
    a = rloo_advantages(torch.tensor([1.0, 0.0, 2.0, 4.0, 4.0, 4.0]), 3)
    close(a, [0.0, -1.5, 1.5, 0.0, 0.0, 0.0])
    # G = 2: A = [r1 - r2, r2 - r1]
    close(rloo_advantages(torch.tensor([0.25, 1.0]), 2), [-0.75, 0.75])


def test_advantage_errors():
    with _raises("grpo_advantages: unknown scale_rewards 'std'; expected one of 'group', 'batch', 'none'"):
        grpo_advantages(REWARDS, 4, scale_rewards="std")
    with _raises("grpo_advantages: rewards must be 1-D with a multiple of num_generations=3 entries "
                 "(prompts * G, each prompt's completions consecutive), got shape (8,)"):
        grpo_advantages(REWARDS, 3)
    with _raises("grpo_advantages: num_generations must be a positive int, got 0"):
        grpo_advantages(REWARDS, 0)
    with _raises("rloo_advantages: num_generations must be >= 2 (the baseline is the mean of the other "
                 "G - 1 rewards), got 1"):
        rloo_advantages(REWARDS, 1)
    with _raises("frac_reward_zero_std: rewards must be 1-D with a multiple of num_generations=3 entries "
                 "(prompts * G, each prompt's completions consecutive), got shape (8,)"):
        frac_reward_zero_std(REWARDS, 3)


# --------------------------------------------------------------------------------------------
# GRPO loss
# --------------------------------------------------------------------------------------------

# B = 2, T = 3; row 2's last position is padding (garbage values there must not count).
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
OLD = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.7, -3.0]], dtype=torch.float64)
LOG_RATIO = torch.tensor([[0.0, 0.3, -0.3], [0.1, -0.5, 90.0]], dtype=torch.float64)
LOGPS = OLD + LOG_RATIO
ADV = torch.tensor([1.0, -2.0], dtype=torch.float64)
# ref - logps = K
K = torch.tensor([[0.0, 0.5, -0.5], [1.0, -1.0, 200.0]], dtype=torch.float64)
REF = LOGPS + K

# Clipped surrogate, eps = 0.2 (clip to [0.8, 1.2]):
#   row 1, A = +1: ratio [1, e^.3 = 1.3499, e^-.3 = 0.7408], clipped [1, 1.2, 0.8]
#       -min(ratio, clipped) = [-1, -1.2 (clipped high), -e^-.3]
#   row 2, A = -2: ratio [e^.1 = 1.1052, e^-.5 = 0.6065], clipped [e^.1, 0.8]
#       -min(-2 ratio, -2 clipped) = [2 e^.1, 1.6 (clipped low)]
SURR = [[-1.0, -1.2, -math.exp(-0.3)], [2.0 * math.exp(0.1), 1.6]]
# k3 = e^K - K - 1 = [[0, e^.5 - 1.5, e^-.5 - .5], [e - 2, e^-1]]
K3 = [[0.0, math.exp(0.5) - 1.5, math.exp(-0.5) - 0.5], [math.e - 2.0, math.exp(-1.0)]]


def _agg(per_token, loss_type, max_len=4):
    rows = [sum(r) / len(r) for r in per_token]
    flat = [x for r in per_token for x in r]
    by_type = {"grpo": sum(rows) / len(rows), "bnpo": sum(flat) / len(flat), "dr_grpo": sum(flat) / (2 * max_len)}
    return by_type[loss_type]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
def test_grpo_loss_clipped_without_kl(loss_type):
    loss, m = grpo_loss(LOGPS, OLD, ADV, MASK, loss_type=loss_type, max_completion_length=4)
    # grpo:    mean(mean(-1, -1.2, -e^-.3), mean(2e^.1, 1.6))
    # bnpo:    (-1 - 1.2 - e^-.3 + 2e^.1 + 1.6) / 5
    # dr_grpo: (-1 - 1.2 - e^-.3 + 2e^.1 + 1.6) / (2 * 4)
    close(loss, _agg(SURR, loss_type))
    assert "kl" not in m
    close(m["clip_ratio"], 2 / 5)  # 2 of 5 tokens clipped
    close(m["clip_ratio/high_mean"], 1 / 5)  # row 1 token 2: ratio 1.35 > 1.2, A > 0
    close(m["clip_ratio/low_mean"], 1 / 5)  # row 2 token 2: ratio 0.61 < 0.8, A < 0 (row 1 token 3: A > 0, not clipped)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
def test_grpo_loss_clipped_with_kl(loss_type):
    loss, m = grpo_loss(LOGPS, OLD, ADV, MASK, ref_logps=REF, beta=0.1, loss_type=loss_type, max_completion_length=4,
                        use_bias_correction_kl=False)
    per_token = [[s + 0.1 * k for s, k in zip(sr, kr)] for sr, kr in zip(SURR, K3)]
    close(loss, _agg(per_token, loss_type))
    close(m["kl"], sum(sum(r) for r in K3) / 5)
    close(m["clip_ratio"], 2 / 5)


def test_grpo_loss_kl_metric_without_penalty():
    # ref given, beta = 0: the loss has no KL term, the metric is still reported
    loss, m = grpo_loss(LOGPS, OLD, ADV, MASK, ref_logps=REF, use_bias_correction_kl=False)
    close(loss, _agg(SURR, "grpo"))
    close(m["kl"], sum(sum(r) for r in K3) / 5)


def test_grpo_loss_epsilon_high():
    # epsilon_high = 0.4: row 1 token 2 (ratio 1.35 < 1.4) is no longer clipped: -e^.3
    loss, m = grpo_loss(LOGPS, OLD, ADV, MASK, epsilon_high=0.4, loss_type="bnpo")
    close(loss, (-1.0 - math.exp(0.3) - math.exp(-0.3) + 2.0 * math.exp(0.1) + 1.6) / 5)
    close(m["clip_ratio/high_mean"], 0.0)
    close(m["clip_ratio"], 1 / 5)


def test_grpo_loss_clipped_tokens_get_no_gradient():
    logps = LOGPS.clone().requires_grad_()
    loss, _ = grpo_loss(logps, OLD, ADV, MASK, loss_type="bnpo")
    loss.backward()
    # d/dlogps of -ratio * A / 5 = -ratio * A / 5 where unclipped, 0 where clipped or padded
    expected = [[-1.0 / 5, 0.0, -math.exp(-0.3) / 5], [2.0 * math.exp(0.1) / 5, 0.0, 0.0]]
    close(logps.grad, expected)


def test_grpo_loss_on_policy_value_is_minus_mean_advantage_but_gradient_is_not_zero():
    # first iteration: old = logps.detach(), ratio 1, no clipping; advantages centred -> loss 0
    logps = LOGPS.clone().requires_grad_()
    adv = torch.tensor([0.5, -0.5], dtype=torch.float64)
    mask = torch.ones(2, 3)
    loss, m = grpo_loss(logps, logps.detach(), adv, mask)
    close(loss, 0.0)  # mean(-0.5, +0.5)
    loss.backward()
    close(logps.grad, [[-0.5 / 6] * 3, [0.5 / 6] * 3])  # -A / (3 tokens * 2 rows)
    close(m["clip_ratio"], 0.0)


def test_grpo_loss_per_token_advantages():
    adv = ADV.unsqueeze(-1).expand(2, 3)  # (B, T) gives the same as (B,)
    loss, _ = grpo_loss(LOGPS, OLD, adv, MASK)
    close(loss, _agg(SURR, "grpo"))


def test_grpo_loss_errors():
    with _raises("grpo_loss: unknown loss_type 'ppo'; expected one of 'grpo', 'bnpo', 'dr_grpo', 'dapo', 'luspo', "
                 "'cispo', 'sapo', 'vespo'"):
        grpo_loss(LOGPS, OLD, ADV, MASK, loss_type="ppo")
    dr_msg = ("grpo_loss: loss_type 'dr_grpo' divides by batch_size * max_completion_length and needs "
              "max_completion_length (a positive int), got None")
    with _raises(dr_msg):
        grpo_loss(LOGPS, OLD, ADV, MASK, loss_type="dr_grpo")
    with _raises("grpo_loss: beta=0.04 needs ref_logps (the reference model's per-token log-probs)"):
        grpo_loss(LOGPS, OLD, ADV, MASK, beta=0.04)
    with _raises("grpo_loss: beta must be >= 0, got -0.1"):
        grpo_loss(LOGPS, OLD, ADV, MASK, ref_logps=REF, beta=-0.1)
    with _raises("grpo_loss: epsilon and epsilon_high must be >= 0, got -0.2 and None"):
        grpo_loss(LOGPS, OLD, ADV, MASK, epsilon=-0.2)
    with _raises("grpo_loss: logps, old_logps and completion_mask must all be (B, T), got (2, 3), (2, 2), (2, 3)"):
        grpo_loss(LOGPS, OLD[:, :2], ADV, MASK)
    with _raises("grpo_loss: ref_logps must be (2, 3), got (1, 3)"):
        grpo_loss(LOGPS, OLD, ADV, MASK, ref_logps=REF[:1])
    with _raises("grpo_loss: advantages must be (B,) or (B, T) = (2, 3), got (3,)"):
        grpo_loss(LOGPS, OLD, torch.zeros(3), MASK)
