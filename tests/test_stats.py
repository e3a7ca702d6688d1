"""The report's paired statistics (ftbench.sweep.report.paired, .rowscores), on hand-computed cases:
McNemar's exact p, Wilson's interval, Holm's adjustment, the paired bootstrap and permutation test
with a fixed seed, the minimum detectable difference, rows matched by their hash (never by position)
and the refusal of rows that do not match. Torch-free and fast."""

from __future__ import annotations

import math

import pytest

from ftbench.evaluation.predictions import write_predictions
from ftbench.sweep.report.paired import (bootstrap_interval, holm, mcnemar_exact, min_detectable_difference,
                                         paired_test, permutation_p, score_interval, verdict, wilson_interval)
from ftbench.sweep.report.rowscores import PairingError, keyed, point_scores, row_key, shared_rows

Z95 = 1.959963984540054  # z_{0.975}
Z80 = 0.8416212335729143  # z_{0.80}


def test_mcnemar_exact_p_on_a_known_table():
    # 2x2 table: both right 30, only A 2, only B 10, both wrong 8. Under no difference the 12 discordant
    # rows split Binomial(12, 1/2): P(X <= 2) = (1 + 12 + 66) / 4096 = 79/4096; two-sided: 158/4096
    assert mcnemar_exact(2, 10) == pytest.approx(158 / 4096, abs=1e-15)
    assert mcnemar_exact(10, 2) == pytest.approx(158 / 4096, abs=1e-15)
    assert mcnemar_exact(0, 0) == 1.0  # no discordant row: nothing against "no difference"
    a = [1] * 30 + [1] * 2 + [0] * 10 + [0] * 8
    b = [1] * 30 + [0] * 2 + [1] * 10 + [0] * 8
    t = paired_test(a, b)
    assert (t.test, t.rows, t.a_only, t.b_only) == ("McNemar", 50, 2, 10)
    assert t.p == pytest.approx(158 / 4096, abs=1e-15)
    assert t.diff == pytest.approx((2 - 10) / 50) and t.mean_a == pytest.approx(0.64) and t.mean_b == pytest.approx(0.8)


def test_wilson_interval():
    # 0 of 10: the interval is [0, z²/(n + z²)] = [0, 3.841459/13.841459]
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(Z95**2 / (10 + Z95**2), abs=1e-8)
    assert high == pytest.approx(0.277533, abs=1e-6)
    # 54 of 100: centre (0.54 + z²/200) / (1 + z²/100) = 0.559207/1.038415 = 0.538520;
    # half-width z/(1 + z²/100) * sqrt(0.54*0.46/100 + z²/40000) = 1.887458 * 0.050794 = 0.095872
    low, high = wilson_interval(54, 100)
    assert (low, high) == (pytest.approx(0.442649, abs=1e-6), pytest.approx(0.634392, abs=1e-6))
    # a proportion's score interval is Wilson's; a graded score's the bootstrap's
    assert score_interval([1.0] * 54 + [0.0] * 46, proportion=True) == pytest.approx((0.442649, 0.634392), abs=1e-6)
    assert score_interval([0.5, 0.5], proportion=False) == (0.5, 0.5)


def test_holm_on_four_p_values():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    adjusted, reject = holm([0.01, 0.04, 0.03, 0.005])
    assert adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02], abs=1e-15)
    assert reject == [True, False, False, True]
    adjusted, reject = holm([0.01, math.nan, 0.04])  # no test: out of the family (k = 2)
    assert adjusted[0] == pytest.approx(0.02) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.04)
    assert reject == [True, False, True]


def test_paired_bootstrap_with_a_fixed_seed():
    # two rows with differences 0 and 1: a resample's mean is 0, 1/2 or 1 with probability 1/4, 1/2, 1/4, so
    # the 2.5th percentile is 0 and the 97.5th is 1
    assert bootstrap_interval([0.0, 1.0]) == (0.0, 1.0)
    # 100 rows: 7 only A right, 16 only B: mean -0.09; the normal approximation gives -0.09 ± 1.96 * 0.0471
    # = [-0.182, 0.002]; the resampled means are multiples of 0.01: [-0.18, 0.00] with seed 0
    diffs = [1.0] * 7 + [-1.0] * 16 + [0.0] * 77
    assert bootstrap_interval(diffs) == pytest.approx((-0.18, 0.0), abs=1e-12)
    assert bootstrap_interval(diffs) == bootstrap_interval(diffs)  # the seed: the same report twice
    assert bootstrap_interval([0.25] * 5) == (0.25, 0.25)  # one value: its own interval


def test_paired_permutation_test():
    # graded scores, 3 rows, differences 0.5, 0.25, 0.25: all 2^3 sign flips enumerated; |mean| >= 1/3 only for
    # all + and all -: p = 2/8
    assert permutation_p([0.5, 0.75, 0.25], [0.0, 0.5, 0.0]) == pytest.approx(0.25, abs=1e-12)
    t = paired_test([0.5, 0.75, 0.25], [0.0, 0.5, 0.0])
    assert t.test == "permutation" and t.p == pytest.approx(0.25) and t.a_only is None
    # on 0/1 scores it is McNemar's test: 3 rows only A got right, 3 concordant -> 2 * (1/2)^3 = 0.25
    assert permutation_p([1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]) == pytest.approx(mcnemar_exact(3, 0)) == 0.25
    assert permutation_p([0.3, 0.4], [0.3, 0.4]) == 1.0


def test_minimum_detectable_difference_on_a_known_case():
    # 100 rows, 20 discordant: mean(d²) = 0.2; at alpha 0.05 and 80% power
    # (z_0.975 + z_0.8) * sqrt(0.2) / sqrt(100) = 2.801585 * 0.447214 / 10 = 0.125291
    diffs = [1.0] * 10 + [-1.0] * 10 + [0.0] * 80
    assert min_detectable_difference(diffs) == pytest.approx((Z95 + Z80) * math.sqrt(0.2) / 10, abs=1e-5)
    assert min_detectable_difference(diffs) == pytest.approx(0.125291, abs=1e-5)
    # at Holm's strictest level for 2 tests, 0.025: z_0.9875 = 2.241403; 20 rows, 2 discordant
    assert min_detectable_difference([1.0, -1.0] + [0.0] * 18, 0.025) == pytest.approx(
        (2.241403 + Z80) * math.sqrt(2 / 20) / math.sqrt(20), abs=1e-5)
    assert math.isnan(min_detectable_difference([0.0] * 10))  # the same scores on every row: no spread
    assert (verdict(-0.1, True), verdict(0.1, True), verdict(0.1, False)) == ("worse", "better", "no evidence")


def _row(i, acc, stage="test", prompt=None):
    return {"stage": stage, "step": 1, "task": "t", "prompt": prompt or f"What is {i}?", "reference": str(i),
            "prediction": str(i) if acc else "?", "metrics": {"accuracy": float(acc)}}


def test_rows_are_matched_by_their_hash_not_their_position(tmp_path):
    a_rows = [_row(i, i < 3) for i in range(6)]
    b_rows = [_row(i, i % 2 == 0) for i in reversed(range(6))]  # the same rows, written in the other order
    write_predictions(tmp_path / "a.jsonl", {"test": a_rows})
    write_predictions(tmp_path / "b.jsonl", {"test": b_rows})
    a, b = point_scores([str(tmp_path / "a.jsonl")]), point_scores([str(tmp_path / "b.jsonl")])
    keys = shared_rows(a, b, "A", "B")
    assert keys == [row_key(r) for r in a_rows]
    assert [a.scores[k] for k in keys] == [1, 1, 1, 0, 0, 0] and [b.scores[k] for k in keys] == [1, 0, 1, 0, 1, 0]
    assert (a.stage, a.metric, a.seeds, a.proportion) == ("test", "accuracy", 1, True)
    # position would have paired row 0 of A with row 5 of B; by hash: only A right on 1, only B on 4 -> p = 1
    t = paired_test([a.scores[k] for k in keys], [b.scores[k] for k in keys])
    assert (t.a_only, t.b_only, t.p) == (1, 1, 1.0)
    # a prompt asked twice is told apart by its occurrence
    twice = keyed([_row(1, True), _row(1, False)])
    assert list(twice) == [row_key(_row(1, True)), row_key(_row(1, True)) + "#2"]
    # several seeds: per row the mean over the seeds
    write_predictions(tmp_path / "a2.jsonl", {"test": [_row(i, i < 2) for i in range(6)]})
    two = point_scores([str(tmp_path / "a.jsonl"), str(tmp_path / "a2.jsonl")])
    assert [two.scores[k] for k in keys] == [1, 1, 0.5, 0, 0, 0] and two.seeds == 2 and two.proportion


def test_rows_that_do_not_match_are_refused(tmp_path):
    write_predictions(tmp_path / "test.jsonl", {"test": [_row(i, 1) for i in range(4)]})
    write_predictions(tmp_path / "val.jsonl", {"val": [_row(i, 1, stage="val") for i in range(4)]})
    write_predictions(tmp_path / "other.jsonl", {"test": [_row(i, 1) for i in range(10, 14)]})
    write_predictions(tmp_path / "rouge.jsonl", {"test": [{**_row(i, 1), "metrics": {"rouge_l": 0.5}} for i in range(4)]})
    test, val, other, rouge = (point_scores([str(tmp_path / f"{n}.jsonl")]) for n in ("test", "val", "other", "rouge"))
    with pytest.raises(PairingError, match=r"^A vs B: not compared: A has test rows and B validation rows "
                                           r"\(different splits\)$"):
        shared_rows(test, val, "A", "B")
    with pytest.raises(PairingError, match=r"^A vs B: not compared: none of A's 4 test rows is one of B's 4 \(rows are "
                                           r"matched by task, prompt and reference: different splits or data\)$"):
        shared_rows(test, other, "A", "B")
    with pytest.raises(PairingError, match=r"^A vs B: not compared: A's rows are scored by accuracy and B's by rouge_l$"):
        shared_rows(test, rouge, "A", "B")
    assert point_scores([str(tmp_path / "missing.jsonl")]) is None
