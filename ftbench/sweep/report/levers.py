"""The speed-levers table: each fit point's trained tokens/s and predicted peak against the plain run of
its own method (same method, same settings but the levers; float32, not compiled, no fused kernels).

The levers are settings (:mod:`ftbench.levers`): ``trainer.precision``, ``backbone.compile`` (with its mode
and backend), ``backbone.liger_kernel`` and ``data.packing`` (padding-free packing, :mod:`ftbench.data.packing`). The main table's ``--reference`` compares methods with one
another (LoRA against full); this one compares each method with itself, lever by lever, through the same
ratio (:func:`ftbench.sweep.report.stats._ratio`). It appears where the points differ by a lever.
"""

from __future__ import annotations

import json
import math
from typing import Any, Optional

import pandas as pd

from ftbench.sweep.report.stats import _ratio

#: the lever settings (flat dotted keys of a record's config) and their plain values
LEVERS: dict[str, tuple[Any, ...]] = {
    "trainer.precision": (None, "32-true", "32", 32, "fp32"),
    "backbone.compile": (None, False),
    "backbone.liger_kernel": (None, False),
    "data.packing": (None, False),
}
#: settings that only qualify a lever (``compile_mode`` says nothing without ``compile``)
QUALIFIERS = ("backbone.compile_mode", "backbone.compile_backend")


def lever_name(setting: Optional[dict[str, Any]]) -> str:
    """``fp32`` for the plain run, else its levers: ``bf16-mixed``, ``compile``, ``compile (aot_eager)``,
    ``liger``, joined by `` + ``."""
    setting = setting or {}
    parts = []
    precision = setting.get("trainer.precision")
    if precision not in LEVERS["trainer.precision"]:
        parts.append(str(precision))
    if setting.get("backbone.compile") not in LEVERS["backbone.compile"]:
        how = [str(v) for v in (setting.get("backbone.compile_mode"),
                                setting.get("backbone.compile_backend")) if v not in (None, "inductor")]
        parts.append("compile" + (f" ({', '.join(how)})" if how else ""))
    if setting.get("backbone.liger_kernel") not in LEVERS["backbone.liger_kernel"]:
        parts.append("liger")
    if setting.get("data.packing") not in LEVERS["data.packing"]:
        parts.append("packing")
    return " + ".join(parts) or "fp32"


def _rest(setting: Optional[dict[str, Any]]) -> str:
    """The settings less the levers: what a lever point shares with its plain run."""
    rest = {k: v for k, v in (setting or {}).items() if k not in LEVERS and k not in QUALIFIERS}
    return json.dumps(rest, sort_keys=True, default=str)


def lever_rows(points: pd.DataFrame) -> pd.DataFrame:
    """One row per fit point that has a plain run of its method: method, lever, tokens/s, predicted peak
    (MiB), and both relative to the plain run (``speed_vs_plain``, ``peak_vs_plain``)."""
    fit = points[points["subcommand"] == "fit"]
    names = {i: lever_name(fit.at[i, "config"]) for i in fit.index}
    if len(set(names.values())) < 2:
        return pd.DataFrame()
    rest = {i: _rest(fit.at[i, "config"]) for i in fit.index}
    plain = {(fit.at[i, "method"], rest[i]): i for i in fit.index if names[i] == "fp32"}
    rows = []
    for i in fit.index:
        ref = plain.get((fit.at[i, "method"], rest[i]))
        if ref is None:
            continue
        speed, peak = fit.at[i, "tokens_per_s"], fit.get("pred_peak_mb", pd.Series(dtype=float)).get(i, math.nan)
        ref_speed = fit.at[ref, "tokens_per_s"]
        ref_peak = fit.get("pred_peak_mb", pd.Series(dtype=float)).get(ref, math.nan)
        rows.append({"method": fit.at[i, "method"], "lever": names[i], "tokens_per_s": speed,
                     "speed_vs_plain": _ratio(speed, ref_speed), "pred_peak_mb": peak,
                     "peak_vs_plain": _ratio(peak, ref_peak)})
    return pd.DataFrame(rows)


def levers_table(points: pd.DataFrame) -> Optional[str]:
    """The markdown table (None where the points differ by no lever)."""
    rows = lever_rows(points)
    if rows.empty:
        return None

    def num(v: Any, f: str) -> str:
        return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, f)

    lines = ["| method | lever | trained tok/s | speed vs fp32 | predicted peak (MiB) | peak vs fp32 |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows.itertuples():
        lines.append(f"| {r.method} | {r.lever} | {num(r.tokens_per_s, ',.0f')} | {num(r.speed_vs_plain, '.2f')}x | "
                     f"{num(r.pred_peak_mb, ',.1f')} | {num(r.peak_vs_plain, '.2f')}x |")
    return ("### Speed levers\n\nEach point against the plain run of its own method (float32, not compiled, no "
            "fused kernels; the other settings the same). Tokens/s leave out warm-up and every batch in which "
            "torch compiled (the compile time is the record's throughput.compile_seconds).\n\n" + "\n".join(lines))
