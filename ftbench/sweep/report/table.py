"""Markdown and CSV from the points frame, and which columns to show.

A column is a key of the points frame (``accuracy``, ``val/loss``, ``memory_breakdown.activations``)
with a title and a kind that says how to print it. The kind of a discovered column follows from its
name (:func:`kind_of`): a metric added to the records prints sensibly with no code change.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import pandas as pd

from ftbench.sweep.report.paired import NO_EVIDENCE
from ftbench.sweep.report.records import DERIVED, SEED_STD, runs_frame

#: kinds printed without ± std (parameter counts are the same for every seed)
_NO_STD = ("params", "params_pct", "ratio", "p", "text", "n")
#: (title, kind) of the columns that are not named after a record entry
KNOWN = {
    "run": ("run", "text"), "method": ("method", "text"), "setting": ("setting", "text"), "n": ("n", "n"), "status": ("status", "text"),
    "trainable": ("trainable params", "params"), "trainable_pct": ("trainable %", "params_pct"),
    "total": ("total params", "params"), "peak_mem_mb": ("peak mem (MiB)", "count"),
    "weights_mb": ("weights (MiB)", "count"), "grads_mb": ("grads (MiB)", "count"),
    "optimizer_mb": ("optimizer (MiB)", "count"), "activations_mb": ("activations (MiB)", "count"),
    "pred_peak_mb": ("predicted peak (MiB)", "count"), "device_mem_mb": ("device mem (MiB)", "count"),
    "mem_rel": ("mem vs {ref}", "ratio"), "tokens_per_s": ("trained tok/s", "count"),
    "speed_rel": ("speed vs {ref}", "ratio"), "wall_s": ("wall (s)", "int"), "val_loss": ("val loss", "loss"),
    "val_ppl": ("val ppl", "ppl"), "test_loss": ("test loss", "loss"), "accuracy": ("exact match", "percent"),
    "forgetting": ("forgetting (Δ general loss)", "delta"), "p": ("p vs {ref} (Welch)", "p"), "t": ("t vs {ref}", "num"),
    # the paired comparison on the test rows (ftbench.sweep.report.comparison)
    "score_ci": ("95% CI", "interval"), "paired_rows": ("paired rows", "int"), "diff": ("Δ vs {ref} [95% CI]", "diff"),
    "p_paired": ("p vs {ref} (paired)", "p"), "p_holm": ("Holm p", "p"), "verdict": ("verdict", "verdict"),
    "mdd": ("MDD", "num"), "paired_test": ("paired test", "text"),
}
#: the paired comparison's columns in the default table, where there is one
PAIRED = ("score_ci", "diff", "p_paired", "p_holm", "verdict")
#: the memory breakdown's columns, shown when records have one (ftbench.bench.memory)
BREAKDOWN = ("weights_mb", "grads_mb", "optimizer_mb", "activations_mb", "pred_peak_mb")
#: what the memory columns mean (under a table that shows the breakdown)
MEMORY_NOTE = ("Memory: weights, grads, optimizer and activations are the memory breakdown of one training step, "
               "measured from the tensors (device-independent); predicted peak = their sum + the largest transient. "
               "peak mem = the measured peak: CUDA's allocated peak on a GPU, the process's resident (host) peak on a "
               "CPU, which also holds what loading left behind. mem vs = the predicted peak on CPU runs, CUDA's "
               "allocated peak on GPU runs.")
#: what a summary line shows (after the run id, method and status)
SUMMARY = ("trainable", "trainable_pct", "pred_peak_mb", "peak_mem_mb", "tokens_per_s", "wall_s", "val_loss",
           "test_loss", "accuracy")
#: the mark on the speed cells of a point with a contended run, and what it means (under the table)
CONTENDED = "†"
CONTENDED_NOTE = (f"{CONTENDED} Speed from a run that did not get the CPU/GPU it asked for (for several seeds: at least "
                  "one; the record's `throughput.contended` and `contended_reasons`: load average above the usable "
                  "CPUs, the main thread waiting for a CPU, CPU utilisation below 0.8 of its torch threads, or another "
                  "process on the GPU). A ratio against a marked reference is as doubtful. Clean timings: README, "
                  "\"What is measured, and how\".")
#: scores in [0, 1] printed as percentages: answer metrics (ftbench.evaluation) and lm-eval's (acc, acc_norm, ...)
ANSWER_SCORES = ("exact_match", "rouge_l", "chrf", "bleu", "acc", "acc_norm", "f1", "mcc")
#: the data set's answer metrics the default table shows when records have them (after exact match)
DEFAULT_ANSWER_METRICS = ("test/label_accuracy", "test/mc_accuracy", "test/mc_accuracy_norm", "test/rouge_l",
                          "test/chrf", "test/bleu")
#: points-frame columns that are not for a table
_INTERNAL = ("point", "config", "label", "objective", "tuner", "subcommand", "runs", "seeds", "run_ids", "common", "acc_values",
             "is_reference", "paired_metric", "paired_stage", "paired_note", "score_ci_low", "score_ci_high",
             "score_ci_proportion", "diff_ci_low", "diff_ci_high")


@dataclass(frozen=True)
class Column:
    key: str
    title: str
    kind: str


def kind_of(key: str) -> str:
    """How to print a column, from its name."""
    if key in KNOWN:
        return KNOWN[key][1]
    last = key.rsplit("/", 1)[-1].rsplit(".", 1)[-1]
    if key.startswith("params."):
        return "params_pct" if last.endswith("pct") else "params"
    if key.startswith("memory_breakdown.") or last.endswith("bytes"):
        return "mb"
    if "accurac" in last or last.split(",", 1)[0] in ANSWER_SCORES:
        return "percent"
    if "perplexity" in last:
        return "ppl"
    if "loss" in last:
        return "loss"
    return "num"


def _task(key: str) -> Optional[str]:
    """``test/arithmetic/accuracy`` -> ``arithmetic`` (a task's exact match)."""
    parts = key.split("/")
    return parts[1] if len(parts) == 3 and parts[0] == "test" and parts[2] == "accuracy" else None


def column(key: str, reference: str = "full") -> Column:
    kind = kind_of(key)
    if key in KNOWN:
        title = KNOWN[key][0].format(ref=reference)
    elif _task(key):
        title = f"EM {_task(key)}"
    else:
        title = key + (" (MiB)" if kind == "mb" else "")
    return Column(key, title, kind)


# ---------------------------------------------------------------------------------- column choice
def available(points: pd.DataFrame) -> list[str]:
    """Every key a table can show for these points."""
    metrics = [c for c in points.columns if c not in _INTERNAL and c not in ("run", "method", "setting", "n", "status")
               and not (c.endswith(SEED_STD) and c[: -len(SEED_STD)] in points.columns)]
    virtual = ["score_ci"] if "score_ci_low" in points.columns else []
    return ["run", "method", "setting", "n", "status", *metrics, *virtual]


def _has(points: pd.DataFrame, key: str) -> bool:
    column_ = "score_ci_low" if key == "score_ci" else key
    return column_ in points.columns and points[column_].notna().any()


def default_keys(points: pd.DataFrame) -> list[str]:
    """Today's table: identity, parameters, memory and speed (relative to the reference), wall time,
    losses, exact match and per task, the data set's other answer metrics and lm-eval's numbers where
    records have them, forgetting and Welch's p where there are any."""
    keys = (["run"] if points["run"].astype(bool).any() else []) + ["method"]
    keys += ["setting"] if points["setting"].astype(bool).any() else []
    keys += ["n", "status", "trainable", "trainable_pct"]
    keys += [k for k in BREAKDOWN if k in points.columns and points[k].notna().any()]
    keys += ["peak_mem_mb", "mem_rel", "tokens_per_s", "speed_rel", "wall_s", "val_loss", "val_ppl", "test_loss",
             "accuracy"]
    keys += ["score_ci"] if _has(points, "score_ci") else []
    keys += sorted((c for c in points.columns if _task(c)), key=_task)
    keys += [k for k in DEFAULT_ANSWER_METRICS if k in points.columns and points[k].notna().any()]
    keys += [c for c in points.columns if _lm_eval(c) and points[c].notna().any()]
    keys += [k for k in ("forgetting", "p") if points[k].notna().any()]
    keys += [k for k in PAIRED if k != "score_ci" and _has(points, k)]
    return keys


def _lm_eval(key: str) -> bool:
    """An lm-evaluation-harness headline number (``lm_eval/<task>/<metric>``), not its std over seeds."""
    parts = key.split("/")
    return len(parts) == 3 and parts[0] == "lm_eval" and not key.endswith(SEED_STD)


def _named(have: list[str], item: str, reference: str) -> list[str]:
    """The keys ``item`` names: by key or glob pattern (``test/*/accuracy``), or by the title the table
    shows (``exact match``, ``mem vs full``; case and surrounding spaces aside)."""
    found = [k for k in have if fnmatch.fnmatchcase(k, item)]
    if found:
        return found
    title = " ".join(item.split()).casefold()
    return [k for k in have if column(k, reference).title.casefold() == title]


def choose_keys(points: pd.DataFrame, spec: Optional[list[str]] = None, reference: str = "full") -> list[str]:
    """The default keys, or those ``spec`` names (names, glob patterns or the titles the table shows;
    ``default`` for the default set), led by ``method`` (and ``setting`` where points differ) unless
    ``spec`` places them or names ``run`` (the sweep's name for a run says which it is)."""
    if not spec:
        return default_keys(points)
    have, keys = available(points), []
    for item in spec:
        found = default_keys(points) if item == "default" else _named(have, item, reference)
        keys += [k for k in found if k not in keys]
    if "run" in keys:
        return keys
    lead = [k for k in ("method", "setting") if k not in keys and (k == "method" or points["setting"].astype(bool).any())]
    return lead + keys


def unmatched(points_list: list[pd.DataFrame], spec: list[str], reference: str = "full") -> list[str]:
    """The items of ``spec`` that name no column of any of these studies (by key, pattern or title)."""
    have = list(dict.fromkeys(k for points in points_list for k in available(points)))
    return [s for s in spec if s != "default" and not _named(have, s, reference)]


# ---------------------------------------------------------------------------------- cells
def fmt(kind: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if kind in ("params", "count"):
        return f"{value:,.0f}"
    if kind == "params_pct":
        return f"{value:.2f}"
    if kind == "int":
        return f"{value:.0f}"
    if kind == "loss":
        return f"{value:.3f}"
    if kind == "ppl":
        return f"{value:.2f}"
    if kind == "percent":
        return f"{100 * value:.1f}%"
    if kind == "delta":
        return f"{value:+.3f}"
    if kind == "ratio":
        return f"{value:.2f}×"
    if kind == "p":
        return f"{value:.3f}" + (" *" if value < 0.05 else "")
    if kind == "mb":
        return f"{value / 2**20:,.0f}"
    if kind == "num":
        return f"{value:.4g}"
    return str(value)


def _missing(v: Any) -> bool:
    return v is None or v == "" or (isinstance(v, float) and math.isnan(v))


def is_speed(key: str) -> bool:
    """Columns that contention makes doubtful: tokens/s, the speed ratio, wall time, the throughput
    section's rates and times, and the online-RL step split."""
    return key in ("tokens_per_s", "speed_rel", "wall_s") or (
        key.startswith(("throughput.", "step_time_split.")) and key.endswith(("_per_s", "_s")))


def contended(row: pd.Series) -> bool:
    """Whether any of the point's runs recorded ``throughput.contended``."""
    value = row.get("throughput.contended")
    return not _missing(value) and value > 0


def cell(row: pd.Series, col: Column) -> str:
    text = _cell(row, col)
    if col.key == "status" and not _missing(row.get("diverged")) and row.get("diverged") > 0:
        text += " (diverged)"  # the record's train_info.diverged, for any of the point's runs
    return text + f" {CONTENDED}" if text != "–" and is_speed(col.key) and contended(row) else text


def _cell(row: pd.Series, col: Column) -> str:
    value = row.get(col.key)
    if col.kind in ("interval", "diff", "verdict"):
        return _paired_cell(row, col)
    if col.kind == "text":
        return "–" if _missing(value) else str(value)
    if col.kind == "n":
        return str(row["n"]) if row["n"] == row["runs"] else f"{row['n']}/{row['runs']}"
    if col.kind == "ratio" and row.get("is_reference") and not _missing(value):
        return "1.00× (ref)"
    std = row.get(col.key + SEED_STD)
    if _missing(value) or col.kind in _NO_STD or _missing(std):
        return fmt(col.kind, value)
    if col.kind == "percent":
        return f"{100 * value:.1f} ± {100 * std:.1f}%"
    return f"{fmt(col.kind, value)} ± {fmt(col.kind, std).lstrip('+')}"


def _paired_cell(row: pd.Series, col: Column) -> str:
    """The paired comparison's cells: a point's interval (``44.3–63.4%``... as ``[44.3, 63.4]%``), the
    difference to the reference with its interval (``-9.0 [-18.0, +0.0]``, points for a percentage),
    the verdict (``no evidence (MDD 13.2)``)."""

    metric = row.get("paired_metric")
    if col.kind == "interval":
        return interval_text(row.get("score_ci_low"), row.get("score_ci_high"), metric)
    if col.kind == "diff":
        if _missing(row.get("diff")):
            return "–"
        return f"{number(row['diff'], metric, sign=True)} {interval_text(row.get('diff_ci_low'), row.get('diff_ci_high'), metric, sign=True)}"
    if row.get("is_reference") and not _missing(row.get("score_ci_low")):
        return "(ref)"
    same = row.get("diff_ci_low") == 0 and row.get("diff_ci_high") == 0 and row.get("diff") == 0
    return verdict_text(row.get("verdict"), row.get("mdd"), metric, bool(same))


def metric_title(metric: str) -> str:
    return column(metric).title


def is_percent(metric: str) -> bool:
    return kind_of(metric) == "percent"


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


def markdown_table(points: pd.DataFrame, keys: Optional[list[str]] = None, reference: str = "full",
                   after: Sequence[Optional[str]] = ()) -> str:
    """The points as a markdown table of ``keys``, its notes under it, then ``after`` (the paired columns' note)."""
    cols = [column(k, reference) for k in (keys or default_keys(points))]
    head = "| " + " | ".join(c.title for c in cols) + " |"
    sep = "|" + "|".join("---" if c.kind in ("text", "verdict") else "---:" for c in cols) + "|"
    body = ["| " + " | ".join(cell(row, c) for c in cols) + " |" for _, row in points.iterrows()]
    marked = any(CONTENDED in line for line in body)
    notes = [MEMORY_NOTE] if any(c.key in BREAKDOWN for c in cols) else []
    notes += [CONTENDED_NOTE] if marked else []
    notes += [n for n in after if n]
    return "\n".join([head, sep, *body]) + "".join(f"\n\n{n}" for n in notes)


def csv_text(points: pd.DataFrame) -> str:
    """Raw numbers: identity, the derived columns, the comparison, every discovered metric (each mean
    with its std), the seeds and run ids. Columns of whole numbers are written as integers."""
    named = int(points["run"].astype(bool).any())
    keys = ["run"] * named + ["method", "setting", "subcommand", "status", "n", "runs"]
    for k in DERIVED:
        keys += [k, k + SEED_STD]
    keys += ["mem_rel", "speed_rel", "t", "p"]
    keys += ["paired_metric", "paired_stage", "paired_rows", "score_ci_low", "score_ci_high", "diff", "diff_ci_low",
             "diff_ci_high", "paired_test", "p_paired", "p_holm", "mdd", "verdict"]
    for k in available(points)[5:]:
        if k not in keys and k not in KNOWN:
            keys += [k, k + SEED_STD]
    out = points[[k for k in keys if k in points.columns]].copy()
    out["setting"] = out["setting"].fillna("")
    for k in out.columns[6 + named:]:
        values = out[k].dropna()
        if len(values) and pd.api.types.is_numeric_dtype(values) and (values == values.round()).all() and values.abs().max() < 2**53:
            out[k] = out[k].astype("Int64")
    out["seeds"] = points["seeds"].map(lambda v: ";".join(str(s) for s in v))
    out["run_ids"] = points["run_ids"].map(lambda v: ";".join(str(s) for s in v))
    return out.to_csv(index=False, lineterminator="\n")


def summary_line(rec: dict[str, Any]) -> str:
    """One line for the end of a run: ``[ftbench] RUN_ID: METHOD STATUS trainable params=... ...``."""
    row = runs_frame([rec]).iloc[0]
    parts = [f"[ftbench] {row['run_id']}: {row['method']} {row['status']}"
             + (" (diverged)" if not _missing(row.get("diverged")) and row.get("diverged") > 0 else "")]
    for key in SUMMARY:
        c = column(key)
        if not _missing(row[key]):
            mark = CONTENDED if is_speed(key) and contended(row) else ""
            parts.append(f"{c.title}={fmt(c.kind, row[key])}{mark}")
    return " ".join(parts)

