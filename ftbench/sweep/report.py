"""Tables and plots from run records. Every figure comes from a record; nothing is typed by hand.

``report(RESULTS_DIR)`` groups the records into grid points (runs whose resolved config is the same
but for the seed), averages over seeds and writes:

* ``report.md`` — a markdown table, one row per grid point: mean ± sample std (n-1) over the seeds
  that completed, n, trainable parameters (and % of total), peak memory, trained tokens/s, wall time,
  final val loss / perplexity, exact-match accuracy (and per task), forgetting (change of
  ``val/general/loss`` from before to after training), memory and speed relative to a reference
  method (default ``full``), and a Welch's t-test of accuracy against the reference when both have
  >= 2 seeds;
* ``report.csv`` — the same rows with raw numbers (means and stds in their own columns);
* ``accuracy_vs_memory.png`` (Pareto front marked), ``throughput.png``, ``loss_curves.png``.

Nothing here imports torch; matplotlib (Agg) only when plots are made.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Optional

from ftbench.naming import flatten as _flatten
from ftbench.fileio import write_bytes_atomic, write_text_atomic

COLUMNS = [
    ("method", "method"),
    ("status", "status"),
    ("trainable", "trainable params"),
    ("trainable_pct", "trainable %"),
    ("peak_mem_mb", "peak mem (MB)"),
    ("tokens_per_s", "trained tok/s"),
    ("wall_s", "wall (s)"),
    ("val_loss", "val loss"),
    ("test_loss", "test loss"),
    ("accuracy", "exact match"),
]
#: numbers averaged over seeds
NUMERIC = ("trainable", "trainable_pct", "total", "peak_mem_mb", "tokens_per_s", "wall_s", "val_loss",
           "val_ppl", "test_loss", "accuracy", "forgetting")
#: config keys that do not make a different grid point (besides the seed)
_NOT_A_SETTING = ("seed_everything", "out", "run_id", "config", "save_weights", "print_config", "trainer.logger",
                  "trainer.enable_progress_bar", "trainer.default_root_dir", "trainer.callbacks",
                  "model.init_args.backbone", "data.init_args.backbone")
PLOTS = ("accuracy_vs_memory.png", "throughput.png", "loss_curves.png")


# ---------------------------------------------------------------------------------- records
def load_records(directory: str | Path) -> list[dict[str, Any]]:
    """Every ``*.json`` run record in ``directory`` (not recursive), sorted by creation time."""
    records = []
    for p in sorted(Path(directory).glob("*.json")):
        try:
            rec = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and isinstance(rec.get("train_info"), dict) and isinstance(rec.get("run_info"), dict):
            rec["_path"] = str(p)
            records.append(rec)
    return sorted(records, key=lambda r: (str(r["run_info"].get("created", "")), r["_path"]))


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _num(v: Any) -> Optional[float]:
    """A finite float, or None (records keep non-finite numbers as strings such as 'nan')."""
    if isinstance(v, bool) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def row_of(rec: dict[str, Any]) -> dict[str, Any]:
    """One row (raw numbers) from one record."""
    info = rec["train_info"]
    final = info.get("final") or {}
    initial = info.get("initial") or {}
    mem = info.get("memory") or info.get("test_memory") or {}
    subcommand = rec["run_info"].get("subcommand")
    method = info.get("method") or _method_from_config(rec) or "?"
    if subcommand not in ("fit", None) and method != "baseline":
        method = f"{method} ({subcommand})"
    wall = (_num(info.get("fit_seconds")) or 0) + (_num(info.get("test_seconds")) or 0)
    params = info.get("params") or {}
    val_loss = _num(final.get("val/loss"))
    ppl = _num(final.get("val/perplexity"))
    if ppl is None and val_loss is not None:
        ppl = math.exp(min(val_loss, 50.0))
    g0, g1 = _num(initial.get("val/general/loss")), _num(final.get("val/general/loss"))
    return {
        "run_id": rec["run_info"].get("run_id"),
        "method": method,
        "base_method": info.get("method") or method,
        "subcommand": subcommand,
        "seed": rec["run_info"].get("seed"),
        "status": info.get("status"),
        "trainable": _num(params.get("trainable")),
        "trainable_pct": _num(params.get("trainable_pct")),
        "total": _num(params.get("total")),
        "peak_mem_mb": _num(mem.get("peak_bytes")) / 2**20 if _num(mem.get("peak_bytes")) else None,
        "tokens_per_s": _num(_get(info, "throughput", "trained_tokens_per_s")),
        "wall_s": wall or None,
        "val_loss": val_loss,
        "val_ppl": ppl,
        "test_loss": _num(final.get("test/loss")),
        "accuracy": _num(final.get("test/accuracy", final.get("val/accuracy"))),
        "forgetting": g1 - g0 if g0 is not None and g1 is not None else None,
        "tasks": {k.split("/")[1]: _num(v) for k, v in final.items()
                  if k.startswith("test/") and k.endswith("/accuracy") and k.count("/") == 2},
    }


def _method_from_config(rec: dict[str, Any]) -> Optional[str]:
    cp = _get(rec, "run_info", "config", "model", "class_path")
    return str(cp).rsplit(".", 1)[-1].lower() if cp else None




def setting_of(rec: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The record's resolved config as flat dotted keys, less the seed and what does not change a run."""
    cfg = _get(rec, "run_info", "config")
    if not isinstance(cfg, dict):
        return None
    flat = _flatten(cfg)
    return {k: v for k, v in flat.items()
            if k and "__path__" not in k and not any(k == e or k.startswith(e + ".") for e in _NOT_A_SETTING)}


# ---------------------------------------------------------------------------------- statistics
def mean_std(values: list[float]) -> tuple[Optional[float], Optional[float]]:
    """Mean and sample standard deviation (n-1; None for one value)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (Numerical Recipes 6.4)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betai(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(1.0 - x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbeta) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbeta) * _betacf(b, a, 1.0 - x) / b


def t_sf2(t: float, df: float) -> float:
    """Two-sided p-value of Student's t with ``df`` (non-integer) degrees of freedom."""
    return _betai(df / 2.0, 0.5, df / (df + t * t))


def welch_t_test(a: list[float], b: list[float], use_scipy: bool = True) -> Optional[tuple[float, float]]:
    """Welch's two-sided t-test (unequal variances): (t, p), or None with fewer than 2 values a side.

    With no variance on either side the test is undefined; the difference is then exact:
    p = 1 when the means are equal and p = 0 when they differ. scipy's ``ttest_ind(equal_var=False)``
    when installed, else the same test in plain math (the two agree to 1e-10; tests check it).
    """
    a, b = [v for v in a if v is not None], [v for v in b if v is not None]
    if len(a) < 2 or len(b) < 2:
        return None
    ma, va = mean_std(a)
    mb, vb = mean_std(b)
    se2 = va ** 2 / len(a) + vb ** 2 / len(b)
    if se2 == 0:
        return (0.0, 1.0) if ma == mb else (math.copysign(math.inf, ma - mb), 0.0)
    if use_scipy:
        try:
            from scipy import stats

            res = stats.ttest_ind(a, b, equal_var=False)
            return float(res.statistic), float(res.pvalue)
        except ImportError:
            pass
    t = (ma - mb) / math.sqrt(se2)
    df = se2 ** 2 / ((va ** 2 / len(a)) ** 2 / (len(a) - 1) + (vb ** 2 / len(b)) ** 2 / (len(b) - 1))
    return t, t_sf2(t, df)


# ---------------------------------------------------------------------------------- grouping
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


def group_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per grid point: its runs (seeds), the setting that sets it apart, in first-seen order."""
    groups: dict[str, dict[str, Any]] = {}
    for rec in records:
        row = row_of(rec)
        setting = setting_of(rec)
        key = json.dumps([row["method"], row["subcommand"], setting if setting is not None else row["run_id"]],
                         sort_keys=True, default=str)
        g = groups.setdefault(key, {"method": row["method"], "base_method": row["base_method"],
                                    "subcommand": row["subcommand"], "setting": setting, "runs": [], "records": []})
        g["runs"].append(row)
        g["records"].append(rec)
    out = list(groups.values())
    # what sets a point apart: keys that vary across the points of one method
    configs = [g["setting"] for g in out if g["setting"] is not None]
    common = set.intersection(*(set(c) for c in configs)) if configs else set()
    vary_all = {k for k in common if len({json.dumps(c[k], sort_keys=True, default=str) for c in configs}) > 1}
    chosen: dict[int, list[str]] = {}
    for i, g in enumerate(out):
        if g["setting"] is None:
            chosen[i] = []
            continue
        same = [h["setting"] for h in out if h["method"] == g["method"] and h["setting"] is not None]
        inner = set.intersection(*(set(c) for c in same))
        vary = {k for k in inner if len({json.dumps(c[k], sort_keys=True, default=str) for c in same}) > 1}
        # keys that only differ between methods come with the method (its config file): the method
        # column says it; a key shows when it differs between points of the same method
        chosen[i] = sorted(k for k in vary if k in g["setting"] and k != "model.class_path")
    names = _short_keys(sorted({k for ks in chosen.values() for k in ks}))
    for i, g in enumerate(out):
        g["vary_keys"] = chosen[i]
        g["label"] = ", ".join(f"{names[k]}={_short_value(g['setting'][k])}" for k in chosen[i])
        g["common_vary"] = {k: g["setting"][k] for k in vary_all if g["setting"] and k in g["setting"] and not k.startswith("model.")}
    return out


def _summarise(g: dict[str, Any]) -> dict[str, Any]:
    runs = g["runs"]
    done = [r for r in runs if r["status"] == "completed"]
    row: dict[str, Any] = {"method": g["method"], "setting": g["label"], "subcommand": g["subcommand"],
                           "n": len(done), "runs": len(runs), "run_ids": [r["run_id"] for r in runs],
                           "seeds": [r["seed"] for r in done]}
    counts: dict[str, int] = {}
    for r in runs:
        counts[str(r["status"])] = counts.get(str(r["status"]), 0) + 1
    row["status"] = (next(iter(counts)) if len(counts) == 1
                     else ", ".join(f"{c} {s}" for s, c in sorted(counts.items(), key=lambda kv: -kv[1])))
    for key in NUMERIC:
        m, s = mean_std([r[key] for r in done])
        row[key], row[key + "_std"] = m, s
    row["acc_values"] = [r["accuracy"] for r in done if r["accuracy"] is not None]
    tasks = sorted({t for r in done for t in r["tasks"]})
    row["tasks"] = {t: mean_std([r["tasks"].get(t) for r in done]) for t in tasks}
    return row


def _pick_reference(g: dict[str, Any], groups: list[dict[str, Any]], reference: str) -> Optional[int]:
    """The reference point for ``g``: a ``reference``-method fit that shares g's backbone/data/trainer
    settings where such a point exists, else the first ``reference``-method fit."""
    cands = [i for i, h in enumerate(groups) if h["base_method"] == reference and h["subcommand"] == "fit"]
    if not cands:
        return None
    for i in cands:
        if all(groups[i]["common_vary"].get(k) == v for k, v in g["common_vary"].items()):
            return i
    return cands[0]


def summarise(records: list[dict[str, Any]], reference: str = "full",
              groups: Optional[list[dict[str, Any]]] = None) -> list[dict[str, Any]]:
    """The report's rows (raw numbers), one per grid point."""
    groups = group_rows(records) if groups is None else groups
    rows = [_summarise(g) for g in groups]
    for g, row in zip(groups, rows):
        ref_i = _pick_reference(g, groups, reference)
        ref = rows[ref_i] if ref_i is not None else None
        row["is_reference"] = ref is row
        fit = g["subcommand"] == "fit"
        row["mem_rel"] = row["peak_mem_mb"] / ref["peak_mem_mb"] if fit and ref and row["peak_mem_mb"] and ref["peak_mem_mb"] else None
        row["speed_rel"] = row["tokens_per_s"] / ref["tokens_per_s"] if fit and ref and row["tokens_per_s"] and ref["tokens_per_s"] else None
        test = welch_t_test(row["acc_values"], ref["acc_values"]) if ref is not None and ref is not row else None
        row["t"], row["p"] = (test if test else (None, None))
    return rows


# ---------------------------------------------------------------------------------- formatting
def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "–"
    if key in ("trainable", "total"):
        return f"{value:,.0f}"
    if key == "trainable_pct":
        return f"{value:.2f}"
    if key in ("peak_mem_mb", "tokens_per_s"):
        return f"{value:,.0f}"
    if key == "wall_s":
        return f"{value:.0f}"
    if key in ("val_loss", "test_loss"):
        return f"{value:.3f}"
    if key == "val_ppl":
        return f"{value:.2f}"
    if key in ("accuracy", "task"):
        return f"{100 * value:.1f}%"
    if key == "forgetting":
        return f"{value:+.3f}"
    if key in ("mem_rel", "speed_rel"):
        return f"{value:.2f}×"
    if key == "p":
        return f"{value:.3f}" + (" *" if value < 0.05 else "")
    return str(value)


def _pm(key: str, mean: Any, std: Any) -> str:
    if mean is None:
        return "–"
    if std is None:
        return _fmt(key, mean)
    if key in ("accuracy", "task"):
        return f"{100 * mean:.1f} ± {100 * std:.1f}%"
    return f"{_fmt(key, mean)} ± {_fmt(key, std).lstrip('+')}"


def table_columns(rows: list[dict[str, Any]], reference: str = "full") -> list[tuple[str, str]]:
    """(key, title) of the columns that have something to show for these rows."""
    cols = [("method", "method")]
    if any(r["setting"] for r in rows):
        cols.append(("setting", "setting"))
    cols += [("n", "n"), ("status", "status"), ("trainable", "trainable params"), ("trainable_pct", "trainable %"),
             ("peak_mem_mb", "peak mem (MB)"), ("mem_rel", f"mem vs {reference}"),
             ("tokens_per_s", "trained tok/s"), ("speed_rel", f"speed vs {reference}"), ("wall_s", "wall (s)"),
             ("val_loss", "val loss"), ("val_ppl", "val ppl"), ("test_loss", "test loss"), ("accuracy", "exact match")]
    tasks = sorted({t for r in rows for t in r["tasks"]})
    cols += [(f"task:{t}", f"EM {t}") for t in tasks]
    if any(r["forgetting"] is not None for r in rows):
        cols.append(("forgetting", "forgetting (Δ general loss)"))
    if any(r["p"] is not None for r in rows):
        cols.append(("p", f"p vs {reference} (Welch)"))
    return cols


def _cell(row: dict[str, Any], key: str) -> str:
    if key.startswith("task:"):
        m, s = row["tasks"].get(key[5:], (None, None))
        return _pm("task", m, s)
    if key in ("method", "setting", "status"):
        return str(row[key]) if row[key] not in (None, "") else "–"
    if key == "n":
        return str(row["n"]) if row["n"] == row["runs"] else f"{row['n']}/{row['runs']}"
    if key in NUMERIC and key not in ("trainable", "trainable_pct", "total"):
        return _pm(key, row[key], row.get(key + "_std"))
    if key == "mem_rel" or key == "speed_rel":
        return _fmt(key, row[key]) if not row.get("is_reference") or row[key] is None else "1.00× (ref)"
    return _fmt(key, row.get(key))


def markdown_table(rows: list[dict[str, Any]], columns: Optional[list[tuple[str, str]]] = None, reference: str = "full") -> str:
    columns = columns or table_columns(rows, reference)
    head = "| " + " | ".join(title for _, title in columns) + " |"
    sep = "|" + "|".join("---" if k in ("method", "setting", "status") else "---:" for k, _ in columns) + "|"
    body = ["| " + " | ".join(_cell(r, k) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def notes(rows: list[dict[str, Any]], reference: str) -> str:
    lines = ["Mean ± sample std (n-1) over the seeds that completed (n). Peak memory: the training phase "
             "(test phase for test-only rows); trained tok/s excludes warm-up batches."]
    if not any(r.get("is_reference") for r in rows):
        lines.append(f"No '{reference}' fine-tuning run in these results: no relative columns (choose one with --reference).")
    if any(r["p"] is not None for r in rows):
        lines.append(f"p: Welch's two-sided t-test (unequal variances) of exact match over seeds against {reference}; "
                     "* p < 0.05. With no seed variance on either side p is 1 for equal means, 0 otherwise.")
    if any(r["forgetting"] is not None for r in rows):
        lines.append("Forgetting: val/general/loss after training minus before (positive = forgot).")
    return "\n".join(f"- {x}" for x in lines)


def csv_text(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    tasks = sorted({t for r in rows for t in r["tasks"]})
    keys = ["method", "setting", "subcommand", "status", "n", "runs"]
    for k in NUMERIC:
        keys += [k, k + "_std"]
    keys += ["mem_rel", "speed_rel", "t", "p"] + [f"accuracy_{t}" for t in tasks] + [f"accuracy_{t}_std" for t in tasks]
    keys += ["seeds", "run_ids"]
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        d = {k: r.get(k) for k in keys}
        for t in tasks:
            d[f"accuracy_{t}"], d[f"accuracy_{t}_std"] = r["tasks"].get(t, (None, None))
        for k in ("trainable", "total"):
            if isinstance(d[k], float) and d[k].is_integer():
                d[k] = int(d[k])
        d["seeds"] = ";".join(str(s) for s in r["seeds"])
        d["run_ids"] = ";".join(str(s) for s in r["run_ids"])
        w.writerow(d)
    return buf.getvalue()


def summary_line(rec: dict[str, Any]) -> str:
    r = row_of(rec)
    parts = [f"[ftbench] {r['run_id']}: {r['method']} {r['status']}"]
    for key, title in COLUMNS[2:]:
        if r.get(key) is not None:
            parts.append(f"{title}={_fmt(key, r[key])}")
    return " ".join(parts)


# ---------------------------------------------------------------------------------- plots
def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    write_bytes_atomic(path, buf.getvalue())


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats (less or equal memory and higher or equal
    accuracy, one of them strictly), sorted by memory."""
    front = []
    for i, (m, a) in enumerate(points):
        if not any((m2 <= m and a2 >= a) and (m2 < m or a2 > a) for j, (m2, a2) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i])


def _name(row: dict[str, Any]) -> str:
    return row["method"] + (f" ({row['setting']})" if row["setting"] else "")


def make_plots(rows: list[dict[str, Any]], groups: list[dict[str, Any]], out: Path) -> list[Path]:
    """Write the PNG plots that have data; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fit = [r for r in rows if r["subcommand"] == "fit"]
    # accuracy vs peak memory, the Pareto front marked
    pts = [r for r in fit if r["accuracy"] is not None and r["peak_mem_mb"] is not None]
    if pts:
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        xy = [(r["peak_mem_mb"], 100 * r["accuracy"]) for r in pts]
        front = pareto_front(xy)
        for i, r in enumerate(pts):
            ax.errorbar(xy[i][0], xy[i][1], xerr=r["peak_mem_mb_std"] or 0,
                        yerr=100 * (r["accuracy_std"] or 0), fmt="o", ms=9 if i in front else 6,
                        mfc="none" if i not in front else None, capsize=3, label=_name(r))
        ax.plot([xy[i][0] for i in front], [xy[i][1] for i in front], "k--", lw=1, label="Pareto front")
        base = [r for r in rows if r["method"] == "baseline" and r["accuracy"] is not None]
        if base:
            ax.axhline(100 * base[0]["accuracy"], color="grey", ls=":", lw=1, label="baseline (no training)")
        ax.set_xlabel("peak memory (MB)")
        ax.set_ylabel("exact match (%)")
        ax.set_title("Accuracy vs peak memory (filled: Pareto front)")
        ax.legend(fontsize=7)
        _save(fig, out / "accuracy_vs_memory.png")
        plt.close(fig)
        written.append(out / "accuracy_vs_memory.png")
    # throughput per method
    tp = [r for r in fit if r["tokens_per_s"] is not None]
    if tp:
        fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(tp) + 2), 4.0))
        ax.bar(range(len(tp)), [r["tokens_per_s"] for r in tp], yerr=[r["tokens_per_s_std"] or 0 for r in tp], capsize=3)
        ax.set_xticks(range(len(tp)), [_name(r) for r in tp], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("trained tokens / s")
        ax.set_title("Training throughput")
        _save(fig, out / "throughput.png")
        plt.close(fig)
        written.append(out / "throughput.png")
    # loss curves: mean over seeds at each logged step
    curves = []
    for g, r in zip(groups, rows):
        for key in ("val/loss", "train/loss"):
            by_step: dict[int, list[float]] = {}
            for rec in g["records"]:
                for m in rec["train_info"].get("metrics") or []:
                    v = _num(m.get(key)) if isinstance(m, dict) else None
                    if v is not None and m.get("step") is not None:
                        by_step.setdefault(int(m["step"]), []).append(v)
            if by_step:
                steps = sorted(by_step)
                curves.append((_name(r), key, steps, [sum(by_step[s]) / len(by_step[s]) for s in steps]))
    if curves:
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        colors: dict[str, Any] = {}
        for name, key, steps, vals in curves:
            color = colors.setdefault(name, f"C{len(colors) % 10}")
            ax.plot(steps, vals, color=color, ls="-" if key == "val/loss" else ":", marker="o" if key == "val/loss" else None,
                    ms=3, label=f"{name} {key}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.set_title("Loss curves (solid: val, dotted: train; mean over seeds)")
        ax.legend(fontsize=7)
        _save(fig, out / "loss_curves.png")
        plt.close(fig)
        written.append(out / "loss_curves.png")
    return written


# ---------------------------------------------------------------------------------- W&B
def log_to_wandb(rows: list[dict[str, Any]], columns: list[tuple[str, str]], plots: list[Path], directory: Path,
                 project: Optional[str] = None) -> str:
    """Log the table (a W&B Table) and the plots to a ``report`` run, grouped under the sweep's name.
    Offline unless an API key is set; returns where the run went."""
    if not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
        os.environ["WANDB_MODE"] = "offline"
    import wandb

    try:
        group = json.loads((directory / "sweep.json").read_text()).get("name")
    except (OSError, ValueError):
        group = None
    group = os.environ.get("WANDB_RUN_GROUP") or group or directory.resolve().name
    run = wandb.init(project=project or os.environ.get("WANDB_PROJECT", "ftbench"), group=group, job_type="report",
                     name=f"report-{group}", dir=str(directory), config={"results_dir": str(directory)}, reinit="finish_previous")
    table = wandb.Table(columns=[t for _, t in columns], data=[[_cell(r, k) for k, _ in columns] for r in rows])
    raw = [k for k in ("method", "setting", "n", *NUMERIC, "mem_rel", "speed_rel", "p")]
    numbers = wandb.Table(columns=raw, data=[[r.get(k) for k in raw] for r in rows])
    run.log({"report/table": table, "report/numbers": numbers, **{f"report/{p.stem}": wandb.Image(str(p)) for p in plots}})
    where = getattr(run, "dir", "") or ""
    run.finish()
    return where


# ---------------------------------------------------------------------------------- entry
def report(directory: str | Path, out: Optional[str | Path] = None, reference: str = "full", plots: bool = True,
           wandb: bool = False, wandb_project: Optional[str] = None) -> str:
    """Write ``report.md``, ``report.csv`` (and the plots) for the records in ``directory``; return
    the markdown table."""

    directory = Path(directory)
    records = load_records(directory)
    groups = group_rows(records)
    rows = summarise(records, reference, groups)
    columns = table_columns(rows, reference)
    table = markdown_table(rows, columns, reference)
    out = Path(out) if out else directory
    out.mkdir(parents=True, exist_ok=True)
    written = make_plots(rows, groups, out) if plots and rows else []
    text = table + "\n\n" + notes(rows, reference)
    if written:
        text += "\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in written)
    write_text_atomic(out / "report.md", text + "\n")
    write_text_atomic(out / "report.csv", csv_text(rows))
    if wandb:
        where = log_to_wandb(rows, columns, written, out, wandb_project)
        table += f"\n\n(W&B: logged the table and {len(written)} plot(s); run files in {where})"
    return table
