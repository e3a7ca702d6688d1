"""The report's section on a sweep's searches (:mod:`ftbench.sweep.search`), from the records alone.

Every trial's record carries ``run_info.search`` (study, trial number, metric and direction, the
values and their distributions), so a study is the records that name it, whatever database the
sweep used: per study, the trials by status, the best completed trial by the validation metric (the
metric at the end of training, the value the study was told) with its values and its test figures
(chosen on validation, reported on test, as ``--select`` does), and two PNGs from Optuna's own
matplotlib plots of a study rebuilt in memory from the records
(:func:`optuna.visualization.matplotlib.plot_optimization_history`,
:func:`~optuna.visualization.matplotlib.plot_param_importances`; importances need two completed
trials with different values).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, Optional


def _trials(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    studies: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        search = rec["run_info"].get("search")
        if isinstance(search, dict) and isinstance(search.get("study"), str):
            studies.setdefault(search["study"], []).append(rec)
    for trials in studies.values():
        trials.sort(key=lambda r: r["run_info"]["search"].get("trial", 0))
    return studies


def _final(rec: dict[str, Any], metric: str) -> Optional[float]:
    value = (rec["train_info"].get("final") or {}).get(metric)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def best_trial(trials: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The completed trial with the best metric (by the study's direction); the lowest trial number on a tie."""
    search = trials[0]["run_info"]["search"]
    done = [r for r in trials if r["train_info"].get("status") == "completed" and _final(r, search["metric"]) is not None]
    if not done:
        return None
    sign = 1 if search.get("direction", "minimize") == "minimize" else -1
    return min(done, key=lambda r: (sign * _final(r, search["metric"]), r["run_info"]["search"].get("trial", 0)))


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _short(name: str) -> str:
    """``tuner.init_args.peft_config.init_args.r`` -> ``r`` (the report's setting labels name keys so)."""
    return name.rsplit(".", 1)[-1]


def study_table(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per study: method, study name, trials by status, the best trial, its values, its
    validation metric and its test figures (``test/NAME`` of its record's ``final``)."""
    rows = []
    for name, trials in _trials(records).items():
        search = trials[0]["run_info"]["search"]
        status = [r["train_info"].get("status") for r in trials]
        best = best_trial(trials)
        row = {"method": trials[0]["train_info"].get("method", "?"), "study": name, "trials": len(trials),
               "completed": status.count("completed"), "pruned": status.count("pruned"),
               "failed": len(status) - status.count("completed") - status.count("pruned"),
               "metric": search["metric"], "best": None, "values": {}, "value": None, "test": {}}
        if best is not None:
            row.update(best=best["run_info"]["search"].get("trial"), run_id=best["run_info"].get("run_id"),
                       values=best["run_info"]["search"].get("params") or {}, value=_final(best, search["metric"]),
                       test={k: v for k, v in (best["train_info"].get("final") or {}).items()
                             if re.fullmatch(r"test/[^/]+", k) and isinstance(v, (int, float))})
        rows.append(row)
    return rows


def rebuilt_study(trials: list[dict[str, Any]]):
    """An in-memory Optuna study with the records' trials (completed with their value, pruned with
    their validation curve), for Optuna's plots."""
    import optuna
    from optuna.distributions import json_to_distribution
    from optuna.trial import TrialState, create_trial

    search = trials[0]["run_info"]["search"]
    metric = search["metric"]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction=search.get("direction", "minimize"))
    for rec in trials:
        s = rec["run_info"]["search"]
        status = rec["train_info"].get("status")
        curve = {int(m["step"]): float(m[metric]) for m in rec["train_info"].get("metrics") or []
                 if isinstance(m.get(metric), (int, float)) and isinstance(m.get("step"), int)}
        dists = {k: json_to_distribution(v) for k, v in (s.get("space") or {}).items()}
        params = {k: v for k, v in (s.get("params") or {}).items() if k in dists}
        if status == "completed" and _final(rec, metric) is not None:
            study.add_trial(create_trial(params=params, distributions=dists, value=_final(rec, metric),
                                         intermediate_values=curve))
        elif status == "pruned":
            study.add_trial(create_trial(params=params, distributions=dists, state=TrialState.PRUNED,
                                         intermediate_values=curve))
    return study


def _plots(study, folder: Path, stem: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.exceptions import ExperimentalWarning
    from optuna.visualization import matplotlib as ovm

    written = []
    completed = [t for t in study.trials if t.value is not None]
    plots = [("history", ovm.plot_optimization_history)]
    if len({t.value for t in completed}) >= 2 and any(len({repr(t.params.get(k)) for t in completed}) >= 2
                                                      for k in completed[0].params):
        plots.append(("importances", ovm.plot_param_importances))
    for kind, plot in plots:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            ax = plot(study)
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.set_size_inches(7, 4.5)
        fig.tight_layout()
        path = folder / f"{stem}-{kind}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def search_section(records: list[dict[str, Any]], folder: Path, prefix: str = "", plots: bool = True) -> tuple[str, list[Path]]:
    """The markdown section on the searches among ``records`` ('' when there are none) and the PNGs written."""
    rows = study_table(records)
    if not rows:
        return "", []
    lines = ["### Searches", "",
             "Per study (a grid point searched by Optuna): its trials by status, the best completed trial by the "
             "validation metric at the end of training, its values and its test figures (chosen on validation, "
             "reported on test).", "",
             "| method | trials | completed | pruned | failed | best trial | values | metric | test |",
             "|---|---:|---:|---:|---:|---:|---|---:|---|"]
    written: list[Path] = []
    studies = _trials(records)
    try:
        import optuna  # noqa: F401
    except ImportError:  # the records read without it; the plots are Optuna's
        plots = False
        lines[2] += " (Optuna's plots need the search extra: pip install 'ftbench[search]'.)"
    for i, row in enumerate(rows, 1):
        values = ", ".join(f"{_short(k)}={_fmt(v)}" for k, v in row["values"].items()) or "–"
        test = ", ".join(f"{k} {_fmt(v)}" for k, v in sorted(row["test"].items())) or "–"
        best = f"{row['best']} ({row['run_id']})" if row["best"] is not None else "–"
        value = f"{row['metric']} {_fmt(row['value'])}" if row["value"] is not None else f"{row['metric']} –"
        lines.append(f"| {row['method']} | {row['trials']} | {row['completed']} | {row['pruned']} | {row['failed']} | "
                     f"{best} | {values} | {value} | {test} |")
        if plots:
            method = re.sub(r"[^\w.-]+", "_", row["method"])
            stem = f"{prefix}search{i}-{method}"
            written += _plots(rebuilt_study(studies[row["study"]]), folder, stem)
    lines += ["", "Studies: " + "; ".join(f"{r['method']}: `{r['study']}`" for r in rows) + "."]
    return "\n".join(lines), written
