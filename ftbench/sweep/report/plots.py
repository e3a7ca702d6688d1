"""PNG plots from the points frame (matplotlib, Agg; imported only when plots are made).

* ``accuracy_vs_memory.png``: exact match against peak memory per fit point, the Pareto front marked;
  error bars: the 95 % interval of exact match over the test rows (Wilson's, :mod:`.comparison`) where
  the predictions files give one, else ± the std over seeds;
* ``throughput.png``: trained tokens/s per fit point;
* ``loss_curves.png``: val (solid) and train (dotted) loss per logged step, mean over seeds.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import pandas as pd

from ftbench.fileio import write_bytes_atomic
from ftbench.sweep.report.stats import SEED_STD, pareto_front

PLOTS = ("accuracy_vs_memory.png", "throughput.png", "loss_curves.png")


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    write_bytes_atomic(path, buf.getvalue())


def _name(row: pd.Series) -> str:
    return row["method"] + (f" ({row['setting']})" if row["setting"] else "")


def _std(v: Any) -> float:
    return 0.0 if pd.isna(v) else float(v)


def accuracy_error(row: pd.Series) -> tuple[float, float]:
    """(below, above) the point's exact match, in points: its 95 % interval over the test rows when the
    interval is of exact match, else ± its std over seeds."""
    low, high = row.get("score_ci_low"), row.get("score_ci_high")
    if row.get("paired_metric") == "accuracy" and not pd.isna(low) and not pd.isna(high):
        return 100 * max(0.0, row["accuracy"] - low), 100 * max(0.0, high - row["accuracy"])
    std = 100 * _std(row["accuracy" + SEED_STD])
    return std, std


def curves(points: pd.DataFrame, runs: pd.DataFrame) -> list[tuple[str, str, list[int], list[float]]]:
    """(point name, metric, steps, mean over the point's runs at each step) for val/loss and train/loss."""
    out = []
    for _, row in points.iterrows():
        logged = [m for curve in runs.loc[runs["point"] == row["point"], "curve"] for m in curve if isinstance(m, dict)]
        if not logged:
            continue
        frame = pd.DataFrame(logged)
        for key in ("val/loss", "train/loss"):
            if key not in frame or "step" not in frame:
                continue
            values = pd.to_numeric(frame[key], errors="coerce").replace([math.inf, -math.inf], math.nan)
            by_step = values[frame["step"].notna() & values.notna()].groupby(frame["step"].astype("Int64")).mean()
            if len(by_step):
                out.append((_name(row), key, [int(s) for s in by_step.index], by_step.tolist()))
    return out


def make_plots(points: pd.DataFrame, runs: pd.DataFrame, out: Path, prefix: str = "") -> list[Path]:
    """Write the PNG plots that have data (named ``prefix`` + :data:`PLOTS`); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fit = points[points["subcommand"] == "fit"]
    # accuracy vs peak memory, the Pareto front marked
    pts = fit[fit["accuracy"].notna() & fit["device_mem_mb"].notna()]
    if len(pts):
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        xy = list(zip(pts["device_mem_mb"], 100 * pts["accuracy"]))
        front = pareto_front(xy)
        for i, (_, r) in enumerate(pts.iterrows()):
            below, above = accuracy_error(r)
            ax.errorbar(xy[i][0], xy[i][1], xerr=_std(r["device_mem_mb" + SEED_STD]), yerr=[[below], [above]],
                        fmt="o", ms=9 if i in front else 6, mfc="none" if i not in front else None, capsize=3,
                        label=_name(r))
        ax.plot([xy[i][0] for i in front], [xy[i][1] for i in front], "k--", lw=1, label="Pareto front")
        base = points[points["tuner"].isin(["baseline", "none"]) & points["accuracy"].notna()]  # no training
        if len(base):
            ax.axhline(100 * base["accuracy"].iloc[0], color="grey", ls=":", lw=1, label="baseline (no training)")
        predicted = pts["pred_peak_mb"].notna() & pts["device_mem_mb"].eq(pts["pred_peak_mb"])
        ax.set_xlabel("predicted device peak (MB, memory breakdown)" if predicted.all() else
                      "peak memory (MiB): CUDA allocated peak, or the predicted device peak on CPU runs" if predicted.any()
                      else "peak memory (MiB)")
        ax.set_ylabel("exact match (%)")
        with_ci = (pts["paired_metric"] == "accuracy") & pts["score_ci_low"].notna() if "paired_metric" in pts else pts["n"] < 0
        bars = ("95% interval over the test rows" if with_ci.all() else
                "95% interval over the test rows, else ± std over seeds" if with_ci.any() else "± std over seeds")
        ax.set_title(f"Accuracy vs peak memory (filled: Pareto front)\nbars: {bars}", fontsize=10)
        ax.legend(fontsize=7)
        written.append(out / f"{prefix}accuracy_vs_memory.png")
        _save(fig, written[-1])
        plt.close(fig)
    # throughput per point
    tp = fit[fit["tokens_per_s"].notna()]
    if len(tp):
        fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(tp) + 2), 4.0))
        ax.bar(range(len(tp)), tp["tokens_per_s"], yerr=tp["tokens_per_s" + SEED_STD].fillna(0), capsize=3)
        ax.set_xticks(range(len(tp)), [_name(r) for _, r in tp.iterrows()], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("trained tokens / s")
        ax.set_title("Training throughput")
        written.append(out / f"{prefix}throughput.png")
        _save(fig, written[-1])
        plt.close(fig)
    # loss curves: mean over seeds at each logged step
    lines = curves(points, runs)
    if lines:
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        colors: dict[str, Any] = {}
        for name, key, steps, vals in lines:
            color = colors.setdefault(name, f"C{len(colors) % 10}")
            ax.plot(steps, vals, color=color, ls="-" if key == "val/loss" else ":", marker="o" if key == "val/loss" else None,
                    ms=3, label=f"{name} {key}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.set_title("Loss curves (solid: val, dotted: train; mean over seeds)")
        ax.legend(fontsize=7)
        written.append(out / f"{prefix}loss_curves.png")
        _save(fig, written[-1])
        plt.close(fig)
    return written
