"""Paired statistics: two methods scored on the same test rows, and the intervals the report prints.

Every method of a study answers the same test rows, and the predictions file keeps each row's score.
A test on the per-row differences needs one seed, where Welch's test over seeds needs several and
rarely says anything with three. Here, on the scores of the rows both methods answered (matched by
:mod:`.rowscores`), ``a`` the method and ``b`` its reference:

* **0/1 scores** (exact match, label accuracy, pairwise accuracy): McNemar's exact test. Only the
  discordant rows carry information; with no difference each is "a right, b wrong" with probability
  1/2, so the count of those is Binomial(discordant, 1/2): ``scipy.stats.binomtest``, two-sided.
* **graded scores** (ROUGE-L, chrF, a reward) and the per-row mean over several seeds: a paired
  permutation test of the mean difference (``scipy.stats.permutation_test``, ``permutation_type=
  "samples"``: each row's two scores swapped or not; exact when 2^rows <= :data:`RESAMPLES`). On 0/1
  scores it is McNemar's exact test again (swapping a concordant row changes nothing).
* the **difference's 95 % interval**: a percentile bootstrap of the mean per-row difference
  (``scipy.stats.bootstrap``, :data:`RESAMPLES` resamples of the rows, seed :data:`SEED`: a report
  made twice is the same file);
* a **proportion's 95 % interval**: Wilson's (``statsmodels`` ``proportion_confint``); a graded
  mean's: the percentile bootstrap over the rows;
* **many comparisons**: Holm's step-down adjustment (``statsmodels`` ``multipletests``);
* the **minimum detectable difference**: the smallest true mean difference a two-sided test at level
  alpha detects with :data:`POWER` power on these rows, (z_{1-alpha/2} + z_{power}) * s / sqrt(n),
  with s^2 = mean(d^2) the spread of the per-row differences d under "no difference" (the variance the
  permutation null gives the mean: sum(d^2)/n^2; for 0/1 scores s^2 is the discordant share) —
  ``statsmodels`` ``NormalIndPower`` with ``ratio=0`` (its one-sample form) solves for the effect size.

statsmodels and scipy are imported when a test runs; nothing here imports torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

#: the level of every test and interval (95 %)
ALPHA = 0.05
#: the power the minimum detectable difference is computed for
POWER = 0.8
#: resamples of the bootstrap and of the permutation test
RESAMPLES = 9999
#: the seed of both: the same records give the same report, byte for byte
SEED = 0

BETTER, WORSE, NO_EVIDENCE = "better", "worse", "no evidence"


def is_binary(values: Sequence[float]) -> bool:
    """Whether every value is 0 or 1 (a right/wrong score)."""
    return all(v in (0.0, 1.0) for v in values)


# ---------------------------------------------------------------------------------- intervals
def wilson_interval(successes: float, n: int, alpha: float = ALPHA) -> tuple[float, float]:
    """Wilson's score interval of a proportion ``successes / n`` (``statsmodels`` ``proportion_confint``,
    ``method="wilson"``): (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n). ``successes`` may be a
    seed-mean count (mean accuracy × rows)."""
    from statsmodels.stats.proportion import proportion_confint

    low, high = proportion_confint(successes, n, alpha=alpha, method="wilson")
    return float(low), float(high)


def bootstrap_interval(values: Sequence[float], seed: int = SEED, alpha: float = ALPHA) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of ``values`` (``scipy.stats.bootstrap``,
    :data:`RESAMPLES` resamples, ``seed``); a single repeated value is its own interval."""
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return math.nan, math.nan
    if np.all(x == x[0]):
        return float(x[0]), float(x[0])
    from scipy import stats

    res = stats.bootstrap((x,), np.mean, n_resamples=RESAMPLES, confidence_level=1 - alpha, method="percentile",
                          vectorized=True, rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def score_interval(values: Sequence[float], proportion: bool, seed: int = SEED) -> tuple[float, float]:
    """95 % interval of a method's mean score over its rows: Wilson's for a proportion (0/1 scores,
    or their mean over seeds), the bootstrap's for a graded score."""
    if not len(values):
        return math.nan, math.nan
    if proportion:
        return wilson_interval(float(np.sum(values)), len(values))
    return bootstrap_interval(values, seed)


# ---------------------------------------------------------------------------------- tests
def mcnemar_exact(a_only: int, b_only: int) -> float:
    """McNemar's exact two-sided p: ``a_only`` rows only ``a`` got right, ``b_only`` only ``b``; under
    no difference ``a_only`` ~ Binomial(a_only + b_only, 1/2) (``scipy.stats.binomtest``). No
    discordant row: p = 1."""
    if a_only + b_only == 0:
        return 1.0
    from scipy import stats

    return float(stats.binomtest(a_only, a_only + b_only, 0.5).pvalue)


def permutation_p(a: Sequence[float], b: Sequence[float], seed: int = SEED) -> float:
    """Two-sided p of a paired permutation test of mean(a - b) (``scipy.stats.permutation_test``, each
    row's pair swapped or not; exact up to 2^rows <= :data:`RESAMPLES`, else :data:`RESAMPLES` random
    swaps from ``seed``)."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if np.all(x == y):
        return 1.0
    from scipy import stats

    res = stats.permutation_test((x, y), lambda u, v, axis: np.mean(u - v, axis=axis), permutation_type="samples",
                                 vectorized=True, n_resamples=RESAMPLES, rng=np.random.default_rng(seed))
    return float(min(1.0, res.pvalue))


def holm(pvalues: Sequence[float], alpha: float = ALPHA) -> tuple[list[float], list[bool]]:
    """Holm's step-down adjustment (``statsmodels.stats.multitest.multipletests(method="holm")``): the
    adjusted p-values, in the order given, and which are below ``alpha``. NaN p-values (no test) are
    left out of the family and stay NaN / False."""
    idx = [i for i, p in enumerate(pvalues) if p is not None and not math.isnan(p)]
    adjusted, reject = [math.nan] * len(pvalues), [False] * len(pvalues)
    if idx:
        from statsmodels.stats.multitest import multipletests

        rej, padj, _, _ = multipletests([pvalues[i] for i in idx], alpha=alpha, method="holm")
        for i, r, p in zip(idx, rej, padj):
            adjusted[i], reject[i] = float(p), bool(r)
    return adjusted, reject


def min_detectable_difference(diffs: Sequence[float], alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest mean difference a two-sided paired test at ``alpha`` detects with ``power`` on these
    rows: (z_{1-alpha/2} + z_{power}) · sqrt(mean(d²)) / sqrt(n) (``statsmodels`` ``NormalIndPower``,
    ``ratio=0``: one sample). NaN with no spread (the two methods scored every row alike) or < 2 rows."""
    d = np.asarray(diffs, dtype=float)
    spread = float(np.sqrt(np.mean(d**2))) if len(d) else 0.0
    if len(d) < 2 or spread == 0:
        return math.nan
    from statsmodels.stats.power import NormalIndPower

    effect = NormalIndPower().solve_power(effect_size=None, nobs1=len(d), alpha=alpha, power=power, ratio=0,
                                          alternative="two-sided")
    return float(effect) * spread


@dataclass(frozen=True)
class PairedTest:
    """One method (a) against another (b) on their shared rows."""

    rows: int
    test: str                       # "McNemar" (0/1 scores) or "permutation" (graded, or seed means)
    mean_a: float
    mean_b: float
    diff: float                     # mean(a - b)
    diff_low: float                 # its 95 % bootstrap interval
    diff_high: float
    p: float
    a_only: Optional[int] = None    # McNemar: rows only a got right
    b_only: Optional[int] = None    # ... only b
    same: bool = False              # a and b scored every row alike


def paired_test(a: Sequence[float], b: Sequence[float], seed: int = SEED) -> PairedTest:
    """McNemar's exact test when both score lists are 0/1, else the paired permutation test; with the
    mean difference's bootstrap interval (:func:`bootstrap_interval` of the per-row differences)."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(x) != len(y) or not len(x):
        raise ValueError(f"paired_test: {len(x)} and {len(y)} scores; give the same rows, at least one")
    d = x - y
    low, high = bootstrap_interval(d, seed)
    common = dict(rows=len(x), mean_a=float(x.mean()), mean_b=float(y.mean()), diff=float(d.mean()), diff_low=low,
                  diff_high=high, same=bool(np.all(d == 0)))
    if is_binary(x) and is_binary(y):
        a_only, b_only = int(np.sum((x == 1) & (y == 0))), int(np.sum((x == 0) & (y == 1)))
        return PairedTest(test="McNemar", p=mcnemar_exact(a_only, b_only), a_only=a_only, b_only=b_only, **common)
    return PairedTest(test="permutation", p=permutation_p(x, y, seed), **common)


def verdict(diff: float, significant: bool) -> str:
    """better / worse (significant at the adjusted level, by the sign of the difference) / no evidence."""
    if significant and diff > 0:
        return BETTER
    if significant and diff < 0:
        return WORSE
    return NO_EVIDENCE
