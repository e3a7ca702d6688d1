"""Grid points from runs: mean ± std over seeds, selection by a validation metric, the reference
comparison (memory, speed, Welch's t-test; the paired tests on the test rows in :mod:`.comparison` and
:mod:`.paired`) and the Pareto front.

A **grid point** is the runs whose resolved config is the same but for the seed; its figures are the
mean and sample std (n-1) over the runs that completed. scipy is imported only for the t-test.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from ftbench.sweep.report.comparison import paired_columns
from ftbench.sweep.report.records import SEED_STD, ReportError, metric_columns

#: the suffix of a column's sample std over seeds (``accuracy_seed_std``); not ``_std``, which
#: metrics end in by their own names (TRL's ``reward_std``)

#: keys that come with the method (its objective and tuner config): not what tells a reference apart
_METHOD_KEYS = ("model.", "tuner.")
_CLASS_KEYS = ("model.class_path", "tuner.class_path")
#: metric names (last part) where lower is better for --select
_LOWER_IS_BETTER = re.compile(r"loss|perplexity|ppl|error|nll")


# ---------------------------------------------------------------------------------- setting labels
def _short_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, str) and v.endswith((".yaml", ".yml")):
        return Path(v).stem
    if isinstance(v, str) and "/" in v and len(v) > 24:
        return ".../" + v.rstrip("/").rsplit("/", 1)[-1]
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True)
    return str(v)


def _short_keys(keys: list[str]) -> dict[str, str]:
    """Readable names for dotted keys: ``model.init_args.optimizer.init_args.lr`` -> ``lr``, longer
    where the last part is ambiguous or generic (``backbone.model``, ``data.source``)."""
    parts = {k: [p for p in k.split(".") if p != "init_args"] for k in keys}
    out = {}
    for k, p in parts.items():
        n = 1
        while n < len(p):
            name = ".".join(p[-n:])
            clash = any(".".join(q[-n:]) == name for kk, q in parts.items() if kk != k)
            if not clash and p[-1] not in ("model", "source", "class_path", "name", "path"):
                break
            n += 1
        out[k] = ".".join(p[-n:]) or k
    return out


def _varying(frame: pd.DataFrame) -> list[str]:
    """Keys set in every row of ``frame`` (canonical JSON strings; NaN = not set) with more than one value."""
    full = frame.columns[frame.notna().all()] if len(frame) else []
    return sorted(c for c in full if frame[c].nunique() > 1)


def setting_labels(first: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """For each point (a row of ``first``: method, setting): the label of what sets it apart from the
    other points of its method (``lr=0.001, r=16``), and the settings that vary across all points
    outside the method's own keys (to find a reference trained on the same backbone/data)."""
    canon = pd.DataFrame([{k: json.dumps(v, sort_keys=True, default=str) for k, v in (s or {}).items()}
                          for s in first["setting"]], index=first.index)
    configured = first["setting"].map(lambda s: s is not None)
    vary_all = [k for k in _varying(canon[configured]) if not k.startswith(_METHOD_KEYS)]
    chosen: dict[Any, list[str]] = {i: [] for i in first.index}
    for _, idx in first[configured].groupby("method", sort=False).groups.items():
        # a key shows when it differs between points of the same method; keys that only differ
        # between methods come with the method (its config file), which the method column names
        vary = [k for k in _varying(canon.loc[idx]) if k not in _CLASS_KEYS]
        for i in idx:
            chosen[i] = vary
    names = _short_keys(sorted({k for ks in chosen.values() for k in ks}))
    labels = pd.Series({i: ", ".join(f"{names[k]}={_short_value(first.at[i, 'setting'][k])}" for k in ks)
                        for i, ks in chosen.items()}, dtype=object)
    common = pd.Series({i: {k: first.at[i, "setting"][k] for k in vary_all if k in (first.at[i, "setting"] or {})}
                        for i in first.index}, dtype=object)
    return labels, common


# ---------------------------------------------------------------------------------- grouping
def _status(statuses: pd.Series) -> str:
    counts = Counter(str(s) for s in statuses)
    if len(counts) == 1:
        return next(iter(counts))
    return ", ".join(f"{c} {s}" for s, c in sorted(counts.items(), key=lambda kv: -kv[1]))


def group_points(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per grid point in first-seen order: method, setting label, n (completed), runs, status,
    every metric column's mean over the completed runs (``key``) and its sample std (``key`` + :data:`SEED_STD`),
    the seeds and run ids."""
    first = runs.drop_duplicates("point").set_index("point")
    labels, common = setting_labels(first)
    metrics = metric_columns(runs)
    everyone = runs.groupby("point", sort=False)
    done = runs[runs["status"] == "completed"].groupby("point", sort=False)
    mean, std = done[metrics].mean(), done[metrics].std(ddof=1)
    cols: dict[str, Any] = {
        "method": first["method"], "setting": labels, "label": first["label"], "objective": first["objective"],
        "tuner": first["tuner"], "subcommand": first["subcommand"], "status": everyone["status"].agg(_status),
        "n": done.size().reindex(first.index, fill_value=0), "runs": everyone.size(),
        "run": everyone["run"].agg(lambda s: ", ".join(dict.fromkeys(x for x in s if x))),
        "config": first["setting"],
    }
    for k in metrics:
        cols[k] = mean[k].reindex(first.index)
        cols[k + SEED_STD] = std[k].reindex(first.index)
    cols["seeds"] = done["seed"].agg(list).reindex(first.index).map(lambda v: v if isinstance(v, list) else [])
    cols["run_ids"] = everyone["run_id"].agg(list)
    cols["common"] = common
    cols["acc_values"] = done["accuracy"].agg(lambda s: s.dropna().tolist()).reindex(first.index)
    points = pd.DataFrame(cols, index=first.index)
    points["acc_values"] = points["acc_values"].map(lambda v: v if isinstance(v, list) else [])
    return points.reset_index()


# ---------------------------------------------------------------------------------- selection
def parse_select(spec: str) -> tuple[str, str]:
    """``val/loss`` -> (val/loss, min); ``val/accuracy`` -> (val/accuracy, max); ``max:NAME`` and
    ``min:NAME`` choose the direction. Only validation metrics: choosing on the test set would
    report a best-of-k test figure as if it were held out."""
    mode, name = spec.split(":", 1) if spec.startswith(("min:", "max:")) else ("", spec)
    if name.startswith("test/") or "/test/" in name:
        raise ReportError(f"--select {spec}: selection never looks at test metrics (choosing the setting on the "
                          "test set overstates its test score); select on a validation metric, e.g. val/loss")
    if not name.startswith("val/"):
        raise ReportError(f"--select {spec}: choose a validation metric (val/...), e.g. val/loss or max:val/accuracy")
    return name, mode or ("min" if _LOWER_IS_BETTER.search(name.rsplit("/", 1)[-1]) else "max")


def _matches(key: str, short: str) -> bool:
    """``tuner.init_args.lr`` matches ``lr`` (a key's last parts, as the setting labels name it)."""
    return key == short or key.endswith("." + short)


def selection_groups(points: pd.DataFrame, over: Sequence[str] = ()) -> pd.Series:
    """What one choice is made among: the method, or with ``over`` (short key names such as ``lr``)
    the method and every setting but those keys (one learning rate chosen per LoRA rank)."""
    if not over:
        return points["method"]

    def rest(i: Any) -> str:
        config = points.at[i, "config"] if isinstance(points.at[i, "config"], dict) else {}
        kept = {k: v for k, v in config.items() if not any(_matches(k, o) for o in over)}
        return points.at[i, "method"] + " " + json.dumps(kept, sort_keys=True, default=str)

    return pd.Series({i: rest(i) for i in points.index})


def select_points(points: pd.DataFrame, spec: str, over: Sequence[str] = ()) -> tuple[pd.DataFrame, list[str]]:
    """Per method (with ``over``: per method and setting but the ``over`` keys, see
    :func:`selection_groups`), the grid point with the best seed-mean of the validation metric ``spec``
    (see :func:`parse_select`); returns the chosen points and a line per choice saying which was chosen."""
    name, mode = parse_select(spec)
    if over:
        known = {k for c in points["config"] if isinstance(c, dict) for k in c}
        missing = [o for o in over if not any(_matches(k, o) for k in known)]
        if missing:
            raise ReportError(f"--select-over {','.join(missing)}: no setting of these records is named so "
                              "(e.g. lr for tuner.init_args.lr)")
    if name not in points:
        have = sorted(c for c in points if c.startswith("val/") and not c.endswith(SEED_STD))
        raise ReportError(f"--select {spec}: no record has {name}" + (f" (validation metrics: {', '.join(have)})" if have else ""))
    keep, said = [], []
    for _, group in points.groupby(selection_groups(points, over), sort=False):
        method = group["method"].iloc[0]
        values = group[name].dropna()
        if values.empty:
            keep += list(group.index)
            said.append(f"{method}: no {name}, all {len(group)} point(s) shown" if len(group) > 1 else f"{method}: no {name}")
            continue
        best = values.idxmin() if mode == "min" else values.idxmax()
        keep.append(best)
        which = group.at[best, "setting"] or "its only setting"
        if over:  # "sft+lora r=4: lr=0.003": the settings not chosen among name the group
            parts = str(group.at[best, "setting"]).split(", ") if group.at[best, "setting"] else []
            chosen = [q for q in parts if any(q.startswith(o + "=") for o in over)]
            fixed = [q for q in parts if q not in chosen]
            method = " ".join([method, ", ".join(fixed)]) if fixed else method
            which = ", ".join(chosen) or "its only setting"
        said.append(f"{method}: {which} ({name} {values[best]:.4g}; best of {len(values)} point(s) with it, "
                    f"{len(group)} in all)")
    return points.loc[sorted(keep)], said


# ---------------------------------------------------------------------------------- reference
def matches_reference(points: pd.DataFrame, reference: str) -> pd.Series:
    """Fit points whose label is ``reference`` or whose tuner part is (``full`` matches ``sft+full``), or
    whose sweep name is."""
    return (points["subcommand"] == "fit") & ((points["label"] == reference) | (points["tuner"] == reference)
                                              | (points["run"] == reference))


def pick_reference(points: pd.DataFrame, i: Any, reference: str) -> Optional[Any]:
    """The reference point for point ``i``: of the matching fit points, one with ``i``'s objective,
    named ``reference`` in the sweep (a run ``name:``; ``full`` before ``galore`` among ``sft+full``
    points), labelled exactly ``reference``, with no more in its label (``sft+lora`` before
    ``sft+lora+nf4``), trained on the same backbone/data/trainer settings, first seen — in that order of
    preference."""
    cands = points.index[matches_reference(points, reference)]
    if not len(cands):
        return None
    row = points.loc[i]

    def score(j: Any) -> tuple:
        ref = points.loc[j]
        same_data = all(ref["common"].get(k) == v for k, v in row["common"].items())
        return (ref["objective"] == row["objective"], ref["run"] == reference, ref["label"] == reference,
                -ref["label"].count("+"), same_data)

    return max(cands, key=lambda j: (score(j), -list(points.index).index(j)))


def _ratio(a: float, b: float) -> float:
    return a / b if a and b and not (math.isnan(a) or math.isnan(b)) else math.nan


def compare(points: pd.DataFrame, reference: str = "full", runs: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """Add ``is_reference``, ``mem_rel`` and ``speed_rel`` (fit points against their reference),
    ``t``, ``p`` (Welch's t-test of exact match over seeds against the reference) and, from the runs'
    predictions files, the paired comparison on the rows both answered (:mod:`.comparison`)."""
    points = points.copy()
    refs = {i: pick_reference(points, i, reference) for i in points.index}
    points["is_reference"] = [refs[i] == i for i in points.index]
    for key, rel in (("device_mem_mb", "mem_rel"), ("tokens_per_s", "speed_rel")):
        points[rel] = [(_ratio(points.at[i, key], points.at[r, key]) if r is not None and points.at[i, "subcommand"] == "fit"
                        else math.nan) for i, r in refs.items()]
    tests = [welch_t_test(points.at[i, "acc_values"], points.at[r, "acc_values"]) if r is not None and r != i else None
             for i, r in refs.items()]
    points["t"] = [t[0] if t else math.nan for t in tests]
    points["p"] = [t[1] if t else math.nan for t in tests]
    return paired_columns(points, runs, refs)


def summarise(runs: pd.DataFrame, reference: str = "full", select: Optional[str] = None,
              select_over: Sequence[str] = ()) -> tuple[pd.DataFrame, list[str]]:
    """The report's points (raw numbers), and what ``select`` chose (among ``select_over`` values)."""
    points = group_points(runs)
    said: list[str] = []
    if select:
        points, said = select_points(points, select, select_over)
    return compare(points.reset_index(drop=True), reference, runs), said


# ---------------------------------------------------------------------------------- tests
def welch_t_test(a: list[float], b: list[float]) -> Optional[tuple[float, float]]:
    """Welch's two-sided t-test (unequal variances), ``scipy.stats.ttest_ind(a, b, equal_var=False)``:
    (t, p), or None with fewer than 2 values a side. With no variance on either side the test is
    undefined (scipy: nan); the difference is then exact: p = 1 for equal means, 0 otherwise."""
    a = [float(v) for v in a if v is not None and not math.isnan(v)]
    b = [float(v) for v in b if v is not None and not math.isnan(v)]
    if len(a) < 2 or len(b) < 2:
        return None
    if np.var(a, ddof=1) == 0 and np.var(b, ddof=1) == 0:
        ma, mb = np.mean(a), np.mean(b)
        return (0.0, 1.0) if ma == mb else (math.copysign(math.inf, ma - mb), 0.0)
    from scipy import stats

    res = stats.ttest_ind(a, b, equal_var=False)
    return float(res.statistic), float(res.pvalue)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats (less or equal memory and higher or equal
    accuracy, one of them strictly), sorted by memory."""
    front = []
    for i, (m, a) in enumerate(points):
        if not any((m2 <= m and a2 >= a) and (m2 < m or a2 > a) for j, (m2, a2) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i])
