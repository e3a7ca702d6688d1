"""Each grid point's score on each test row, from its runs' predictions files, and the rows two points share.

A row is known by a hash of its task, prompt and reference (:func:`row_key`), never by its position:
two runs that wrote their rows in another order, or evaluated a subset, are still matched row by row;
a prompt asked twice in one split is told apart by its occurrence (``#2``). A point's score on a row
is its **primary metric** there — the data set's first metric (the evaluator writes a row's metrics
in the data set's order: ``metrics: [rouge_l, exact_match]`` makes ROUGE-L primary), exact match by
default — and for several seeds the mean over the seeds that all answered the row. The test rows are
used, or the validation rows when a run has no test rows; two points scored on different stages,
by different metrics, or with no row in common are not compared (:class:`PairingError`, which says
why). Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from ftbench.errors import FTBenchError
from ftbench.evaluation.predictions import read_predictions
from ftbench.sweep.report.paired import is_binary
from ftbench.sweep.report.records import ReportError

STAGE_NAMES = {"test": "test", "val": "validation"}


class PairingError(ReportError):
    """Two points whose rows cannot be paired: other splits, other metrics, no shared row."""


def row_key(row: dict[str, Any]) -> str:
    """A row's identity: the first 16 hex digits of the SHA-256 of its task, prompt and reference."""
    text = json.dumps([row.get("task"), row.get("prompt"), row.get("reference")], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def keyed(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Rows by :func:`row_key`; the second and later occurrences of one key get ``#2``, ``#3`` ..."""
    out: dict[str, dict[str, Any]] = {}
    seen: dict[str, int] = {}
    for row in rows:
        key = row_key(row)
        seen[key] = seen.get(key, 0) + 1
        out[key if seen[key] == 1 else f"{key}#{seen[key]}"] = row
    return out


def primary_metric(row: dict[str, Any]) -> Optional[str]:
    """The metric a row is judged by: its first (the data set's first metric; ``accuracy`` = exact match)."""
    metrics = row.get("metrics")
    return next(iter(metrics), None) if isinstance(metrics, dict) else None


def score(row: dict[str, Any], metric: Optional[str]) -> Optional[float]:
    """The row's value of ``metric`` (None when it has none or it is not a finite number)."""
    metrics = row.get("metrics") if isinstance(row.get("metrics"), dict) else {}
    value = metrics.get(metric) if metric else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def stage_rows(path: str) -> tuple[str, list[dict[str, Any]]]:
    """(stage, rows) of a predictions file: its test rows, else its validation rows; ("", []) when the
    file cannot be read."""
    try:
        rows = read_predictions(path)
    except (OSError, UnicodeDecodeError, FTBenchError):
        return "", []
    for stage in ("test", "val"):
        mine = [r for r in rows if isinstance(r, dict) and r.get("stage") == stage]
        if mine:
            return stage, mine
    return "", []


@dataclass
class RowScores:
    """One point's scores: ``scores[key]`` is the mean over ``seeds`` runs of ``metric`` on that row."""

    stage: str
    metric: str
    scores: dict[str, float]
    seeds: int
    proportion: bool               # every run scored every row 0 or 1
    rows: dict[str, dict[str, Any]]  # key -> the first run's row (prompt, reference, its prediction)


def point_scores(paths: Sequence[str]) -> Optional[RowScores]:
    """The scores of a point's runs (their predictions files), or None when no file has rows. Runs
    that evaluated another stage than the first run are left out; the rows kept are those every
    remaining run scored."""
    runs = [(stage, keyed(rows)) for stage, rows in map(stage_rows, paths) if rows]
    if not runs:
        return None
    stage = runs[0][0]
    runs = [rows for s, rows in runs if s == stage]
    metric = next((primary_metric(r) for r in runs[0].values() if primary_metric(r)), None)
    if metric is None:
        return None
    values = [{k: v for k, r in rows.items() if (v := score(r, metric)) is not None} for rows in runs]
    shared = [k for k in values[0] if all(k in v for v in values[1:])]
    return RowScores(stage=stage, metric=metric, scores={k: sum(v[k] for v in values) / len(values) for k in shared},
                     seeds=len(values), proportion=all(is_binary([v[k] for k in shared]) for v in values),
                     rows={k: runs[0][k] for k in shared})


def shared_rows(a: RowScores, b: RowScores, name_a: str, name_b: str) -> list[str]:
    """The keys of the rows both points scored (in ``a``'s order), or :class:`PairingError` saying
    why there are none to compare."""
    if a.stage != b.stage:
        raise PairingError(f"{name_a} vs {name_b}: not compared: {name_a} has {STAGE_NAMES.get(a.stage, a.stage)} rows "
                           f"and {name_b} {STAGE_NAMES.get(b.stage, b.stage)} rows (different splits)")
    if a.metric != b.metric:
        raise PairingError(f"{name_a} vs {name_b}: not compared: {name_a}'s rows are scored by {a.metric} and "
                           f"{name_b}'s by {b.metric}")
    keys = [k for k in a.scores if k in b.scores]
    if not keys:
        raise PairingError(f"{name_a} vs {name_b}: not compared: none of {name_a}'s {len(a.scores)} "
                           f"{STAGE_NAMES.get(a.stage, a.stage)} rows is one of {name_b}'s {len(b.scores)} "
                           "(rows are matched by task, prompt and reference: different splits or data)")
    return keys
