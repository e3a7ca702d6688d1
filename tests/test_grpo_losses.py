"""GRPO's loss types, importance-sampling levels and aggregation, and RLOO's loss
(ftbench.objectives.losses.grpo_loss / rloo_loss) against values computed by hand in float64 (1e-6).

The fixture's numbers are chosen so that every branch is taken: ratios above 1 + epsilon_high and
below 1 - epsilon, positive, negative and zero advantages, padding holding garbage, a row that a
truncation mask removes. ``reference`` below is the formula sheet (TRL 1.16's GRPOTrainer) written
out with Python floats and ``math`` one token at a time, sharing no code with ftbench; a few cases are
also spelled out number by number."""

from __future__ import annotations

import math

import pytest
import torch

from ftbench.objectives.losses import GRPO_LOSS_TYPES, grpo_loss, rloo_loss

TOL = dict(atol=1e-6, rtol=0.0)

# B = 4, T = 4. Row 1's last slot and row 2's last two are padding holding garbage (90, -40).
MASK = [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]
LOG_RATIO = [[0.3, -0.1, 0.05, 90.0], [-0.4, 0.2, -40.0, 90.0], [0.1, 0.25, -0.3, 0.0], [0.5, -0.5, 0.1, -0.2]]
OLD = [[-1.0, -2.0, -0.5, -3.0], [-1.5, -0.7, -2.0, -1.0], [-0.3, -1.1, -2.2, -0.9], [-0.8, -1.6, -0.4, -2.5]]
LOGPS = [[o + r for o, r in zip(orow, rrow)] for orow, rrow in zip(OLD, LOG_RATIO)]
KREF = [[0.0, 0.5, -0.5, 200.0], [1.0, -1.0, 300.0, 9.0], [0.2, -0.3, 0.1, 0.4], [-0.2, 0.6, 0.0, 0.3]]  # ref - logps
REF = [[lp + k for lp, k in zip(lrow, krow)] for lrow, krow in zip(LOGPS, KREF)]
ADV = [1.0, -0.5, 0.0, -2.0]
ENTROPY = [[1.0, 2.0, 3.0, 99.0], [0.5, 0.5, 99.0, 99.0], [2.0, 2.0, 2.0, 2.0], [1.0, 1.0, 1.0, 1.0]]
B, T = 4, 4


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def close(actual, expected) -> None:
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64),
                               torch.as_tensor(expected, dtype=torch.float64), **TOL)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ----------------------------------------------------------------------------------- reference
def reference(loss_type="grpo", level="token", beta=0.0, eps=0.2, eps_high=None, delta=None, max_len=6,
              N=None, G=1, S=None, bias_kl=True, truncated=(), tau_pos=1.0, tau_neg=1.05,
              k_pos=2.0, lam_pos=3.0, k_neg=3.0, lam_neg=2.0):
    """(loss, metrics) of the formula sheet, in plain floats."""
    eps_high = eps if eps_high is None else eps_high
    mask = [[0 if i in truncated else m for m in row] for i, row in enumerate(MASK)]
    n_i = [sum(row) for row in mask]
    n = sum(n_i)
    rows_l, rows_kl, weights, lows, highs, capped, phis = [], [], [], [], [], [], []
    for i in range(B):
        a = ADV[i]
        lam_i = [LOG_RATIO[i][j] if mask[i][j] else 0.0 for j in range(T)]
        if level == "token":
            w = [math.exp(x) for x in lam_i]
        else:
            w = [math.exp(sum(lam_i) / max(1, n_i[i]))] * T
        weights.append(w)
        ls, ks, lo, hi, cp = [], [], [], [], []
        phi = None
        if loss_type == "vespo":
            s = sum(max(-20.0, min(20.0, x)) for x in lam_i)
            lw = max(math.log(1e-8), min(20.0, s))
            k, lam = (k_pos, lam_pos) if a >= 0 else (k_neg, lam_neg)
            phi = math.exp(lam + k * lw - lam * math.exp(lw))
            phis.append(phi)
        for j in range(T):
            wj = w[j]
            if loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
                w2 = min(max(wj, 1 - eps), 1 + eps_high)
                w1 = min(wj, delta) if delta is not None else wj
                l = -min(w1 * a, w2 * a)
                lo.append(w1 < 1 - eps and a < 0)
                hi.append(w1 > 1 + eps_high and a > 0)
            elif loss_type == "cispo":
                l = -min(wj, eps_high) * a * LOGPS[i][j]
                cp.append(wj > eps_high and a > 0)
            elif loss_type == "sapo":
                tau = tau_pos if a > 0 else tau_neg
                l = -sigmoid(tau * (wj - 1)) * (4 / tau) * a
            else:
                l = -phi * a * LOGPS[i][j]
            d = KREF[i][j]
            kl = math.exp(d) - d - 1 if mask[i][j] else 0.0
            if bias_kl:
                kl *= wj
            ls.append((l + beta * kl) * mask[i][j])
            ks.append(kl * mask[i][j])
        rows_l.append(ls)
        rows_kl.append(ks)
        lows.append(lo)
        highs.append(hi)
        capped.append(cp)
    total = sum(map(sum, rows_l))
    if loss_type in ("grpo", "sapo"):
        loss = sum(sum(r) / max(1, c) for r, c in zip(rows_l, n_i)) / B / G
    elif loss_type == "bnpo":
        loss = total / max(1, n) / G
    elif loss_type == "dr_grpo":
        loss = total / (B * max_len) / G
    elif loss_type == "luspo":
        loss = sum(sum(r) for r in rows_l) / B / G
    else:
        N = n if N is None else N
        S = G if S is None else S
        loss = total / (N * G / S)
    metrics = {"kl": sum(map(sum, rows_kl)) / n}
    if loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        if level == "token":
            def mean(ind):
                return sum(ind[i][j] * mask[i][j] for i in range(B) for j in range(T)) / n

            def per_row(ind):
                return [sum(ind[i][j] * mask[i][j] for j in range(T)) / n_i[i] for i in range(B) if n_i[i]]
        else:
            def mean(ind):
                return sum(ind[i][0] for i in range(B)) / B

            def per_row(ind):
                return [float(ind[i][0]) for i in range(B)]
        region = [[lo or hi for lo, hi in zip(lr, hr)] for lr, hr in zip(lows, highs)]
        metrics.update({"clip_ratio/low_mean": mean(lows), "clip_ratio/high_mean": mean(highs),
                        "clip_ratio/region_mean": mean(region), "clip_ratio/low_min": min(per_row(lows)),
                        "clip_ratio/high_max": max(per_row(highs))})
    elif loss_type == "cispo":
        metrics["cispo_clip_ratio"] = sum(capped[i][j] * mask[i][j] for i in range(B) for j in range(T)) / n
    elif loss_type == "vespo":
        metrics["vespo/phi_seq_mean"] = sum(phis) / B
    return loss, metrics


def run(loss_type="grpo", level="token", beta=0.0, eps=0.2, eps_high=None, delta=None, max_len=6, N=None, G=1,
        S=None, bias_kl=True, truncated=(), logps=None, **kw):
    trunc = torch.tensor([i in truncated for i in range(B)]) if truncated else None
    return grpo_loss(t(LOGPS) if logps is None else logps, t(OLD), t(ADV), torch.tensor(MASK), ref_logps=t(REF),
                     beta=beta, epsilon=eps, epsilon_high=eps_high, delta=delta, loss_type=loss_type,
                     importance_sampling_level=level, max_completion_length=max_len, num_items_in_batch=N,
                     gradient_accumulation_steps=G, steps_per_generation=S, use_bias_correction_kl=bias_kl,
                     truncated=trunc, **kw)


def check(got, want) -> None:
    loss, metrics = got
    want_loss, want_metrics = want
    close(loss, want_loss)
    for name, value in want_metrics.items():
        close(metrics[name], value)


# ----------------------------------------------------------------------------------- every type and level
CASES = [dict(), dict(beta=0.04), dict(beta=0.04, bias_kl=False), dict(eps_high=0.28), dict(delta=1.1),
         dict(G=2, N=20, S=4), dict(G=4, N=13), dict(truncated=(3,)), dict(beta=0.1, truncated=(0,), eps_high=0.3)]


@pytest.mark.parametrize("loss_type", [lt for lt in GRPO_LOSS_TYPES if lt not in ("cispo", "vespo")])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_every_loss_type_and_level_against_the_formula_sheet(loss_type, level, case):
    kw = CASES[case]
    check(run(loss_type, level, **kw), reference(loss_type, level, **kw))


@pytest.mark.parametrize("case", range(len(CASES)))
def test_cispo_and_vespo_against_the_formula_sheet(case):
    kw = {k: v for k, v in CASES[case].items() if k not in ("delta", "eps_high")}  # clipped-family options
    check(run("cispo", eps_high=5.0, **kw), reference("cispo", eps_high=5.0, **kw))
    check(run("vespo", **kw), reference("vespo", **kw))


def test_cispo_cap_below_ratio_counts_in_its_clip_ratio():
    # cap 1.2: row 0 token 0 (w = e^.3 = 1.35, A > 0) capped; row 2 (A = 0) and rows 1, 3 (A < 0) never
    check(run("cispo", eps_high=1.2), reference("cispo", eps_high=1.2))
    _, m = run("cispo", eps_high=1.2)
    close(m["cispo_clip_ratio"], 1 / 13)


def test_sapo_and_vespo_parameters():
    kw = dict(sapo_temperature_pos=0.5, sapo_temperature_neg=2.0)
    check(run("sapo", **kw), reference("sapo", tau_pos=0.5, tau_neg=2.0))
    kw = dict(vespo_k_pos=1.5, vespo_k_neg=4.0, vespo_lambda_pos=2.5, vespo_lambda_neg=1.0)
    check(run("vespo", **kw), reference("vespo", k_pos=1.5, k_neg=4.0, lam_pos=2.5, lam_neg=1.0))


# ----------------------------------------------------------------------------------- spelled out
def test_grpo_token_level_by_hand():
    # eps 0.2. row 0, A = 1, w = [e^.3, e^-.1, e^.05]: -min(w, clip(w)) = [-1.2, -e^-.1, -e^.05]
    # row 1, A = -.5, w = [e^-.4 = .670, e^.2 = 1.221]: -min(-.5w, -.5 clip) = [.5 * .8, .5 e^.2]
    # row 2, A = 0: 0. row 3, A = -2, w = [e^.5, e^-.5, e^.1, e^-.2]: [2e^.5, 1.6, 2e^.1, 2e^-.2]
    rows = [[-1.2, -math.exp(-0.1), -math.exp(0.05)], [0.4, 0.5 * math.exp(0.2)], [0.0] * 4,
            [2 * math.exp(0.5), 1.6, 2 * math.exp(0.1), 2 * math.exp(-0.2)]]
    loss, m = run("grpo")
    close(loss, sum(sum(r) / len(r) for r in rows) / 4)
    loss, _ = run("bnpo")
    close(loss, sum(map(sum, rows)) / 13)
    loss, _ = run("dr_grpo", max_len=6)
    close(loss, sum(map(sum, rows)) / (4 * 6))
    loss, _ = run("luspo", G=2)
    close(loss, sum(map(sum, rows)) / 4 / 2)
    # dapo: N = 20 tokens in the generation batch, G = 2 accumulation steps, S = 4 micro-batches per generation
    loss, _ = run("dapo", N=20, G=2, S=4)
    close(loss, sum(map(sum, rows)) / (20 * 2 / 4))
    # low: row 1 token 0 (.67 < .8, A < 0) and row 3 token 1 (.61): 2 / 13; high: row 0 token 0: 1 / 13
    close(m["clip_ratio/low_mean"], 2 / 13)
    close(m["clip_ratio/high_mean"], 1 / 13)
    close(m["clip_ratio/region_mean"], 3 / 13)
    close(m["clip_ratio"], 3 / 13)
    close(m["clip_ratio/low_min"], 0.0)  # rows 0 and 2 have no low-clipped token
    close(m["clip_ratio/high_max"], 1 / 3)  # row 0: 1 of its 3 tokens


def test_gspo_sequence_weight_is_the_exp_of_the_mean_log_ratio():
    # row 0: w = exp((.3 - .1 + .05) / 3) = e^(1/12) = 1.087 (within [.8, 1.2]): l = -1.087 per token
    # row 1: w = exp((-.4 + .2) / 2) = e^-.1 = .905: l = .5 * .905; row 3: w = exp(-.1 / 4) = .975: l = 2 * .975
    w0, w1, w3 = math.exp(0.25 / 3), math.exp(-0.1), math.exp(-0.025)
    loss, m = run("grpo", "sequence")
    close(loss, (-w0 + 0.5 * w1 + 0.0 + 2 * w3) / 4)
    loss, m = run("grpo", "sequence", eps=0.05, eps_high=0.05)  # [.95, 1.05]: rows 0 (high) and 1 (low) clip
    close(loss, (-1.05 + 0.5 * 0.95 + 0.0 + 2 * w3) / 4)
    close(m["clip_ratio/low_mean"], 1 / 4)
    close(m["clip_ratio/high_mean"], 1 / 4)
    close(m["clip_ratio/region_mean"], 2 / 4)
    close(m["clip_ratio/low_min"], 0.0)
    close(m["clip_ratio/high_max"], 1.0)


def test_delta_caps_the_unclipped_weight_and_the_metrics_see_the_cap():
    # row 3 token 0: w = e^.5 = 1.65, A = -2: clipped term -2 * 1.2, unclipped -2 * 1.65 -> loss 2 * 1.65;
    # delta 1.5 caps the unclipped weight: loss 2 * 1.5. Row 0 token 0 (A > 0, w 1.35): min picks 1.2 anyway.
    base, _ = run("bnpo")
    capped, m = run("bnpo", delta=1.5)
    close(capped - base, (2 * 1.5 - 2 * math.exp(0.5)) / 13)
    _, m = run("bnpo", delta=1.1)  # w after the cap: row 0 token 0's 1.35 -> 1.1, no longer above 1.2
    close(m["clip_ratio/high_mean"], 0.0)


def test_bias_corrected_kl_is_weighted_by_the_ratio():
    # beta 0.1, bnpo: the KL of each kept token times w (token level)
    plain, m_plain = run("bnpo", beta=0.1, bias_kl=False)
    corrected, m = run("bnpo", beta=0.1)
    k3 = [[math.exp(d) - d - 1 for d, keep in zip(kr, mr) if keep] for kr, mr in zip(KREF, MASK)]
    w = [[math.exp(x) for x, keep in zip(lr, mr) if keep] for lr, mr in zip(LOG_RATIO, MASK)]
    close(m_plain["kl"], sum(map(sum, k3)) / 13)
    close(m["kl"], sum(k * r for kr, wr in zip(k3, w) for k, r in zip(kr, wr)) / 13)
    close(corrected - plain, 0.1 * (m["kl"] - m_plain["kl"]))


def test_cispo_vespo_and_sapo_one_token_by_hand():
    one = dict(ref_logps=None, max_completion_length=4)
    logps, old, mask = t([[-0.5, -1.0]]), t([[-0.8, -1.0]]), torch.tensor([[1, 0]])
    # cispo, A = 2, w = e^.3 = 1.35 > cap 1.2: -1.2 * 2 * (-.5) = 1.2 over 1 token
    loss, m = grpo_loss(logps, old, t([2.0]), mask, epsilon_high=1.2, loss_type="cispo", **one)
    close(loss, 1.2)
    close(m["cispo_clip_ratio"], 1.0)
    # sapo, A = 2 > 0: tau = 1: -sigmoid(e^.3 - 1) * 4 * 2
    loss, _ = grpo_loss(logps, old, t([2.0]), mask, loss_type="sapo", **one)
    close(loss, -sigmoid(math.exp(0.3) - 1) * 8)
    # vespo, A = -1: k 3, lambda 2, lw = .3: phi = exp(2 + .9 - 2 e^.3); loss = -phi * (-1) * (-.5)
    phi = math.exp(2 + 0.9 - 2 * math.exp(0.3))
    loss, m = grpo_loss(logps, old, t([-1.0]), mask, loss_type="vespo", **one)
    close(loss, -0.5 * phi)
    close(m["vespo/phi_seq_mean"], phi)


def test_mask_truncated_completions_row_adds_nothing_but_counts_in_b():
    # row 3 truncated: grpo divides the three other rows' means by B = 4; bnpo by the 9 tokens left
    rows = [[-1.2, -math.exp(-0.1), -math.exp(0.05)], [0.4, 0.5 * math.exp(0.2)], [0.0] * 4]
    loss, _ = run("grpo", truncated=(3,))
    close(loss, sum(sum(r) / len(r) for r in rows) / 4)
    loss, _ = run("bnpo", truncated=(3,))
    close(loss, sum(map(sum, rows)) / 9)
    loss, _ = run("dapo", truncated=(3,))  # N counts after the truncation: 9
    close(loss, sum(map(sum, rows)) / 9)
    # at sequence level the truncated row's weight is 1: the low clip of row 3 is gone
    _, m = run("grpo", "sequence", eps=0.01, eps_high=0.01, truncated=(3,))
    close(m["clip_ratio/low_mean"], 1 / 4)  # row 1 only (w = .905); row 3 (w = 1) is counted, not clipped


def test_dapo_with_every_row_left_out_is_zero_not_nan():
    loss, _ = run("dapo", truncated=(0, 1, 2, 3))
    close(loss, 0.0)


def test_dapo_is_bnpo_when_the_generation_batch_is_the_micro_batch():
    assert torch.equal(run("dapo")[0], run("bnpo")[0])


def test_entropy_metric_is_the_masked_mean():
    _, m = run("grpo", entropy=t(ENTROPY))
    close(m["entropy"], (1 + 2 + 3 + 0.5 + 0.5 + 8 + 4) / 13)


def test_cispo_and_vespo_weights_are_detached():
    # d loss / d logps = -min(w, cap) * A / n for cispo (the weight is a constant); vespo: -phi * A / n
    logps = t(LOGPS).requires_grad_()
    loss, _ = run("cispo", eps_high=5.0, logps=logps)
    loss.backward()
    expected = [[-min(math.exp(x), 5.0) * a / 13 * m for x, m in zip(lr, mr)] for lr, mr, a in zip(LOG_RATIO, MASK, ADV)]
    close(logps.grad, expected)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown importance_sampling_level 'seq'"):
        run(level="seq")
    with pytest.raises(ValueError, match="gradient_accumulation_steps and steps_per_generation must be >= 1"):
        run(G=0)


# ----------------------------------------------------------------------------------- RLOO
def test_rloo_loss_by_hand():
    # sequence sums of the log-ratios: row 0 .25, row 1 -.2, row 2 .05, row 3 -.1 (padding left out)
    logps = t(LOGPS)
    old = torch.tensor([sum(o for o, m in zip(orow, mrow) if m) for orow, mrow in zip(OLD, MASK)], dtype=torch.float64)
    adv = t([1.0, -0.5, 0.3, -2.0])
    w = [math.exp(0.25), math.exp(-0.2), math.exp(0.05), math.exp(-0.1)]
    # eps 0.1: [0.9, 1.1]. row 0: A > 0, w 1.284 -> -1.1 (high); row 1: A < 0, w .819 -> .5 * .9 (low)
    # row 2: -.3 * 1.051; row 3: 2 * .905
    loss, m = rloo_loss(logps, old, adv, torch.tensor(MASK), epsilon=0.1)
    close(loss, (-1.1 + 0.45 - 0.3 * w[2] + 2 * w[3]) / 4)
    close(m["clip_ratio/low_mean"], 1 / 4)
    close(m["clip_ratio/high_mean"], 1 / 4)
    close(m["clip_ratio/region_mean"], 2 / 4)
    close(m["clip_ratio/low_min"], 0.0)
    close(m["clip_ratio/high_max"], 1.0)
    # epsilon_high 0.3: row 0 (1.284 < 1.3) no longer clipped
    loss, m = rloo_loss(logps, old, adv, torch.tensor(MASK), epsilon=0.1, epsilon_high=0.3)
    close(loss, (-w[0] + 0.45 - 0.3 * w[2] + 2 * w[3]) / 4)
    close(m["clip_ratio/high_mean"], 0.0)
    close(m["clip_ratio/high_max"], 0.0)


def test_rloo_on_policy_gradient_is_minus_advantage_over_b():
    logps = t(LOGPS).requires_grad_()
    summed = (logps * torch.tensor(MASK)).sum(-1).detach()
    adv = t(ADV)
    loss, _ = rloo_loss(logps, summed, adv, torch.tensor(MASK))
    close(loss, -sum(ADV) / 4)
    loss.backward()
    close(logps.grad, [[-a / 4 * m for m in mr] for a, mr in zip(ADV, MASK)])


def test_rloo_loss_shapes_are_checked():
    with pytest.raises(ValueError, match=r"old_logps \(summed per sequence\) and advantages must be \(4,\)"):
        rloo_loss(t(LOGPS), t(OLD), t(ADV), torch.tensor(MASK))
