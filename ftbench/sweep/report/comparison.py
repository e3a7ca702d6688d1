"""Paired comparisons in the report: each point against its reference on the rows both answered (the
table's columns), and ``ftbench report --compare A B`` (two points, with the rows where they disagree).

Per point, from its runs' predictions files (:mod:`.rowscores`): its primary metric on each test row
(the mean over seeds), the 95 % interval of its mean (:func:`.paired.score_interval`); against its
reference: the paired test (:func:`.paired.paired_test`), Holm's adjustment over every test of the table
(or of the ``--compare`` pairs), a verdict at the adjusted level, and for "no evidence" the smallest
difference the test could have detected (:func:`.paired.min_detectable_difference`, at level
alpha / k, the strictest step of Holm's k tests: detected whatever the other tests show). Torch-free.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import pandas as pd

from ftbench.sweep.report.paired import (ALPHA, NO_EVIDENCE, POWER, RESAMPLES, SEED, holm, min_detectable_difference,
                                         paired_test, score_interval, verdict)
from ftbench.sweep.report.records import ReportError
from ftbench.sweep.report.rowscores import STAGE_NAMES, PairingError, RowScores, point_scores, shared_rows

#: the points-frame columns this module adds (raw numbers and words; the CSV keeps them all)
COLUMNS = ("paired_metric", "paired_stage", "paired_rows", "score_ci_low", "score_ci_high", "score_ci_proportion",
           "diff", "diff_ci_low", "diff_ci_high", "paired_test", "p_paired", "p_holm", "mdd", "verdict", "paired_note")


def point_name(point: pd.Series) -> str:
    """How a comparison names a point: the sweep's name for its run when it has one (``dpo.lr1e-4``),
    else ``method (setting)`` as the examples do."""
    run = str(point.get("run") or "")
    if run and ", " not in run:
        return run
    return str(point["method"]) + (f" ({point['setting']})" if point.get("setting") else "")


def scores_of(point: pd.Series, runs: pd.DataFrame) -> Optional[RowScores]:
    """The point's row scores from its completed runs' predictions files (lowest seed first)."""
    mine = runs[(runs["point"] == point["point"]) & (runs["status"] == "completed") & runs["predictions"].notna()]
    mine = mine.sort_values("seed", key=lambda s: pd.to_numeric(s, errors="coerce").fillna(0), kind="stable")
    return point_scores([str(p) for p in mine["predictions"]])


def metric_title(metric: str) -> str:
    from ftbench.sweep.report.table import column

    return column(metric).title


def is_percent(metric: str) -> bool:
    from ftbench.sweep.report.table import kind_of

    return kind_of(metric) == "percent"


def paired_columns(points: pd.DataFrame, runs: Optional[pd.DataFrame], refs: dict[Any, Any]) -> pd.DataFrame:
    """``points`` with :data:`COLUMNS`: each point's interval, and each point against ``refs[i]`` (its
    reference; None or itself: no test). A pair that cannot be matched gets its reason in ``paired_note``."""
    points = points.copy()
    cols: dict[str, list] = {c: [None] * len(points) for c in COLUMNS}
    if runs is None or "predictions" not in runs or not runs["predictions"].notna().any():
        for c in COLUMNS:
            points[c] = [math.nan] * len(points) if c not in ("paired_metric", "paired_stage", "paired_test",
                                                              "verdict", "paired_note") else None
        return points
    index = list(points.index)
    scores = {i: scores_of(points.loc[i], runs) for i in index}
    for pos, i in enumerate(index):
        s = scores[i]
        if s is not None:
            cols["paired_metric"][pos], cols["paired_stage"][pos] = s.metric, s.stage
            low, high = score_interval(list(s.scores.values()), s.proportion)
            cols["score_ci_low"][pos], cols["score_ci_high"][pos] = low, high
            cols["score_ci_proportion"][pos] = float(s.proportion)
    tests: dict[int, tuple] = {}
    for pos, i in enumerate(index):
        r = refs.get(i)
        if r is None or r == i or scores[i] is None or scores[r] is None:
            continue
        name, ref_name = point_name(points.loc[i]), point_name(points.loc[r])
        try:
            keys = shared_rows(scores[i], scores[r], name, ref_name)
        except PairingError as err:
            cols["paired_note"][pos] = str(err)
            continue
        a, b = [scores[i].scores[k] for k in keys], [scores[r].scores[k] for k in keys]
        tests[pos] = (paired_test(a, b), [x - y for x, y in zip(a, b)])
    adjusted, reject = holm([t.p for t, _ in tests.values()])
    k = len(tests)
    for (pos, (t, diffs)), p_adj, rej in zip(tests.items(), adjusted, reject):
        cols["paired_rows"][pos], cols["paired_test"][pos], cols["p_paired"][pos] = t.rows, t.test, t.p
        cols["diff"][pos], cols["diff_ci_low"][pos], cols["diff_ci_high"][pos] = t.diff, t.diff_low, t.diff_high
        cols["p_holm"][pos], cols["verdict"][pos] = p_adj, verdict(t.diff, rej)
        if cols["verdict"][pos] == NO_EVIDENCE:
            cols["mdd"][pos] = min_detectable_difference(diffs, ALPHA / k)
    for c in COLUMNS:
        values = cols[c]
        points[c] = values if c in ("paired_metric", "paired_stage", "paired_test", "verdict", "paired_note") else \
            [math.nan if v is None else float(v) for v in values]
    return points


def verdict_text(verdict_: Any, mdd: Any, metric: Any, same: bool = False) -> str:
    """``better``, ``worse``, ``no evidence (MDD 12.5)`` (points for a percentage metric), ``no evidence
    (same scores)`` when the two scored every row alike."""
    if not isinstance(verdict_, str):
        return "–"
    if verdict_ != NO_EVIDENCE:
        return verdict_
    if same:
        return f"{NO_EVIDENCE} (same scores)"
    if isinstance(mdd, float) and not math.isnan(mdd):
        return f"{NO_EVIDENCE} (MDD {number(mdd, metric)})"
    return NO_EVIDENCE


def number(value: float, metric: Any, sign: bool = False) -> str:
    """A difference or interval end: points (1 decimal) for a percentage metric, else 3 significant digits."""
    if isinstance(metric, str) and is_percent(metric):
        return f"{100 * value:+.1f}" if sign else f"{100 * value:.1f}"
    return f"{value:+.3g}" if sign else f"{value:.3g}"


def interval_text(low: Any, high: Any, metric: Any, sign: bool = False) -> str:
    if not isinstance(low, float) or math.isnan(low):
        return "–"
    unit = "%" if isinstance(metric, str) and is_percent(metric) and not sign else ""
    return f"[{number(low, metric, sign)}, {number(high, metric, sign)}]{unit}"


def table_note(points: pd.DataFrame, keys: Sequence[str], reference: str) -> Optional[str]:
    """What the paired columns among ``keys`` mean, as a paragraph under the table (None without them)."""
    out = []
    if "score_ci" in keys and "score_ci_low" in points and points["score_ci_low"].notna().any():
        metrics = " / ".join(dict.fromkeys(metric_title(m) for m in points["paired_metric"].dropna()))
        kinds = {bool(p) for p in points["score_ci_proportion"].dropna()} if "score_ci_proportion" in points else {True}
        how = " or ".join(x for x, k in (("Wilson's interval", True), ("a percentile bootstrap interval", False)) if k in kinds)
        out.append(f"95% CI: {how} of each point's {metrics} over its test rows (the predictions files; per row "
                   "the mean over seeds).")
    tested = points["p_paired"].notna() if "p_paired" in points else pd.Series(False, index=points.index)
    if tested.any() and any(k in keys for k in ("diff", "p_paired", "p_holm", "verdict")):
        k = int(tested.sum())
        tests = set(points.loc[tested, "paired_test"])
        how = []
        if "McNemar" in tests:
            how.append("McNemar's exact test on the rows only one of the two got right (0/1 scores)")
        if "permutation" in tests:
            how.append(f"a paired permutation test of the mean difference ({RESAMPLES:,} resamples, seed {SEED}; "
                       "per row the mean over seeds, or a graded score)")
        out.append(f"Paired, against {reference} on the test rows both answered (matched by task, prompt and "
                   f"reference): Δ, the mean difference with its 95% bootstrap interval ({RESAMPLES:,} resamples of the "
                   f"rows, seed {SEED}); p, {' / '.join(how)}; Holm p, adjusted by Holm's method over the {k} paired "
                   f"test{'s' * (k != 1)} of this table (statsmodels multipletests). Verdict: better / worse where "
                   f"Holm p < {ALPHA:g}, else no evidence, with MDD: the smallest difference the test detects with "
                   f"{POWER:.0%} power at level {ALPHA:g}/{k} on these rows.")
    return " ".join(out) or None


def refusals(points: pd.DataFrame) -> list[str]:
    """The pairs of the table that were not compared, and why (a line each)."""
    return [f"{note}." for note in points["paired_note"].dropna()] if "paired_note" in points else []


# ---------------------------------------------------------------------------------- --compare
def find_point(points: pd.DataFrame, name: str) -> Any:
    """The one point ``name`` names: a run name (the sweep's), a run id, ``method (setting)``, or a
    method with one point; a :class:`ReportError` that lists the choices otherwise."""
    def names(i: Any) -> set[str]:
        p = points.loc[i]
        runs = {x for x in str(p.get("run") or "").split(", ") if x}
        method = str(p["method"]) + (f" ({p['setting']})" if p.get("setting") else "")
        return runs | {str(x) for x in p["run_ids"]} | {point_name(p), method}

    found = [i for i in points.index if name in names(i)]
    if not found:
        found = [i for i in points.index if points.at[i, "method"] == name]
    if len(found) == 1:
        return found[0]
    listed = "; ".join(point_name(points.loc[i]) for i in (found or points.index))
    if found:
        raise ReportError(f"--compare {name}: names {len(found)} points ({listed}); name one as 'method (setting)', "
                          "by its run name or by a run id")
    raise ReportError(f"--compare {name}: no point of these records is named so (points: {listed})")


def compare_text(points: pd.DataFrame, runs: pd.DataFrame, pairs: Sequence[tuple[str, str]], examples: int = 0) -> str:
    """The ``--compare`` output: one table row per pair (Holm over the pairs), its notes, and with
    ``examples`` N up to N rows per pair where the two scored differently."""
    if not pairs:
        raise ReportError("--compare: give two points, A B")
    rows, tests, details = [], [], []
    for a_name, b_name in pairs:
        i, j = find_point(points, a_name), find_point(points, b_name)
        if i == j:
            raise ReportError(f"--compare {a_name} {b_name}: the same point twice")
        sa, sb = scores_of(points.loc[i], runs), scores_of(points.loc[j], runs)
        for s, n in ((sa, a_name), (sb, b_name)):
            if s is None:
                raise ReportError(f"--compare: {n} has no predictions file with scored rows (its records name none, "
                                  "or the files are missing)")
        keys = shared_rows(sa, sb, point_name(points.loc[i]), point_name(points.loc[j]))
        a, b = [sa.scores[k] for k in keys], [sb.scores[k] for k in keys]
        tests.append((paired_test(a, b), [x - y for x, y in zip(a, b)]))
        rows.append((i, j, sa, sb, keys))
    adjusted, reject = holm([t.p for t, _ in tests])
    k = len(tests)
    metric = rows[0][2].metric
    table = ["| A | B | rows | A's mean [95% CI] | B's mean [95% CI] | Δ A − B [95% CI] | test | p | Holm p | verdict |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|---|"]
    for (i, j, sa, sb, keys), (t, diffs), p_adj, rej in zip(rows, tests, adjusted, reject):
        m = sa.metric
        ci_a = score_interval([sa.scores[x] for x in keys], sa.proportion)
        ci_b = score_interval([sb.scores[x] for x in keys], sb.proportion)
        said = verdict(t.diff, rej)
        mdd = min_detectable_difference(diffs, ALPHA / k) if said == NO_EVIDENCE else math.nan
        test = f"McNemar {t.a_only}/{t.b_only}" if t.test == "McNemar" else "permutation"
        table.append(f"| {point_name(points.loc[i])} | {point_name(points.loc[j])} | {t.rows} | "
                     f"{number(t.mean_a, m)} {interval_text(*ci_a, m)} | {number(t.mean_b, m)} {interval_text(*ci_b, m)} | "
                     f"{number(t.diff, m, sign=True)} {interval_text(t.diff_low, t.diff_high, m, sign=True)} | {test} | "
                     f"{t.p:.3g} | {p_adj:.3g} | {verdict_text(said, mdd, m, t.same)} |")
        if examples:
            details.append(disagreements(points.loc[i], points.loc[j], sa, sb, keys, examples))
    stages = ", ".join(dict.fromkeys(STAGE_NAMES.get(r[2].stage, r[2].stage) for r in rows))
    lines = [f"Paired comparison on the {stages} rows both points answered (matched by task, prompt and reference), "
             f"by {metric_title(metric)}" + (" (points)" if is_percent(metric) else "") + ":", "", *table, "",
             f"- McNemar a/b: McNemar's exact test on the a rows only A got right and the b rows only B did (0/1 scores); "
             f"permutation: a paired permutation test of the mean difference ({RESAMPLES:,} resamples, seed {SEED}; graded "
             "scores, or the mean over seeds). Δ: the mean per-row difference, 95% percentile bootstrap interval "
             f"({RESAMPLES:,} resamples, seed {SEED}); a mean's interval: Wilson's for 0/1 scores, the bootstrap's otherwise.",
             f"- Holm p: Holm's adjustment over the {k} comparison{'s' * (k != 1)} given. Verdict: better / worse (A against B) "
             f"where Holm p < {ALPHA:g}, else no evidence; MDD: the smallest difference the test detects with "
             f"{POWER:.0%} power at level {ALPHA:g}/{k} on these rows."]
    return "\n".join(lines + [d for d in details]).rstrip() + "\n"


def disagreements(a: pd.Series, b: pd.Series, sa: RowScores, sb: RowScores, keys: list[str], n: int) -> str:
    """Up to ``n`` rows where A and B scored differently, A's losses first (the largest first)."""
    from ftbench.sweep.report.examples import ANSWER_CHARS, PROMPT_CHARS, cell_text

    differ = sorted((k for k in keys if sa.scores[k] != sb.scores[k]), key=lambda k: sa.scores[k] - sb.scores[k])
    name_a, name_b = point_name(a), point_name(b)
    out = ["", f"### {name_a} vs {name_b}: {len(differ)} of {len(keys)} rows scored differently"
           + (f" (the first {n}: {name_a}'s losses first)" if len(differ) > n else ""), ""]
    if not differ:
        return "\n".join(out)
    head = ["task", "prompt", "reference", name_a, name_b]
    out.append("| " + " | ".join(h.replace("|", "\\|") for h in head) + " |")
    out.append("|" + "|".join("---" for _ in head) + "|")
    for k in differ[:n]:
        row = sa.rows[k]
        answers = [cell_text(s.rows[k].get("prediction"), ANSWER_CHARS) + f" ({score_text(s.scores[k], s.metric)})"
                   for s in (sa, sb)]
        out.append("| " + " | ".join([cell_text(row.get("task") or "–", 30), cell_text(row.get("prompt"), PROMPT_CHARS, tail=True),
                                      cell_text(row.get("reference"), ANSWER_CHARS), *answers]) + " |")
    return "\n".join(out)


def score_text(value: float, metric: str) -> str:
    """A row's score in a cell: ✓ / ✗ for 1 / 0, else its value (3 digits)."""
    return {1.0: "✓", 0.0: "✗"}.get(value, f"{value:.3g}")

