"""Run records -> one pandas DataFrame, one row per run.

A record (``ftbench.bench.record``) is ``{"run_info", "train_info", "meta_info"}``. Besides the identity
columns (:data:`IDENTITY`), every number under ``train_info`` becomes a column, found in the records,
not listed here:

* ``train_info.final`` by the metric's own name: ``val/loss``, ``test/accuracy``,
  ``test/arithmetic/accuracy``, ``val/rewards/accuracies``, ``val/reward`` ...;
* the sections in :data:`SECTIONS` under a dotted prefix: ``throughput.trained_tokens_per_s``,
  ``memory.peak_bytes``, ``params.trainable``, ``memory_breakdown.optimizer_state``,
  ``initial.val/general/loss`` (the metrics before training);
* numbers at the top of ``train_info``: ``fit_seconds``, ``test_seconds``, ``global_steps``;
* the training metrics of the last logged step (``train_info.metrics[-1]``) that ``final`` lacks, by
  their own names: GRPO's ``train/reward``, ``train/kl``, ``train/entropy`` ... (an online-RL run's
  numbers are its training batches').

The data set's answer metrics (``test/rouge_l``, ``test/<task>/chrf``, ``test/mc_accuracy``) and
lm-evaluation-harness results (``lm_eval/<task>/acc``) are ``final`` entries like any other.

On top of those, :data:`DERIVED` are the quantities the default table shows (peak memory in MiB, wall
time, perplexity, exact match, forgetting), each computed from the columns above in one place.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pandas as pd

from ftbench.naming import NOT_SETTINGS, SEED, grid_point

#: the suffix of a column holding the std over seeds of the column it extends (``accuracy_seed_std``)
SEED_STD = "_seed_std"

#: train_info sections whose numbers are columns (``section.key``); ``final`` gives bare metric names
SECTIONS = ("throughput", "memory", "test_memory", "params", "memory_breakdown", "initial", "step_time_split",
            "host_syncs")
#: per-run columns that are not metrics
IDENTITY = ("run_id", "run", "method", "label", "objective", "tuner", "subcommand", "seed", "status", "created",
            "path", "point", "setting", "curve", "predictions")
#: backbone storage names that end an old-style label (``lora+nf4``); see ftbench.backbone.Quantization
QUANTIZATIONS = ("nf4", "fp4", "int8")
#: yes/no record entries kept as 1.0/0.0 columns (their mean over seeds: the share of runs where it held).
#: ``throughput.contended``: the run did not get the CPU/GPU it asked for (ftbench.bench.measure.contention)
#: ``diverged``: the final training loss ended far above the first (ftbench.bench.record.diverged)
FLAGS = ("throughput.contended", "diverged")


class ReportError(Exception):
    """A report that cannot be made: no records, an unknown column, a selection on test metrics."""


class RecordWarning(UserWarning):
    """A file in a results directory that should be a run record and cannot be read."""


# ---------------------------------------------------------------------------------- reading
def load_records(directory: str | Path, problems: Optional[list[tuple[str, str]]] = None) -> list[dict[str, Any]]:
    """Every ``*.json`` run record in ``directory`` (not recursive), in the order of the sweep that made
    them (its ``sweep.json``: the sweep file's order, so a table's rows follow it however often runs were
    redone), then by creation time.

    Other JSON (``sweep.json``) is passed over. A file that is not valid JSON, or a JSON object with a
    ``run_info``/``train_info`` that is not a record, is skipped with a :class:`RecordWarning` naming
    it; with ``problems`` given, ``(file name, reason)`` is appended there instead."""
    records = []
    for p in sorted(Path(directory).glob("*.json")):
        try:
            rec = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as err:
            _problem(p, f"not valid JSON ({err})", problems)
            continue
        if not isinstance(rec, dict) or not ({"run_info", "train_info"} & set(rec)):
            continue
        if not (isinstance(rec.get("run_info"), dict) and isinstance(rec.get("train_info"), dict)):
            _problem(p, "run_info or train_info missing or not an object", problems)
            continue
        wrong = shape_problem(rec)
        if wrong:
            _problem(p, wrong, problems)
            continue
        rec["_path"] = str(p)
        records.append(rec)
    order = _sweep_order(Path(directory))
    return sorted(records, key=lambda r: (order.get(Path(r["_path"]).stem, len(order)),
                                          str(r["run_info"].get("created", "")), r["_path"]))


def sweep_runs(directory: Path) -> list[dict[str, Any]]:
    """The runs the directory's ``sweep.json`` lists, in the sweep file's order (none without one, or if
    it cannot be read)."""
    try:
        runs = json.loads((directory / "sweep.json").read_text()).get("runs") or []
    except (OSError, ValueError, AttributeError):
        return []
    return [r for r in runs if isinstance(r, dict) and r.get("run_id")]


def _sweep_order(directory: Path) -> dict[str, int]:
    """Run id -> its position in the directory's sweep."""
    return {str(r["run_id"]): i for i, r in enumerate(sweep_runs(directory))}


#: the record entries the report reads and the JSON types each may have (null is always allowed)
_SHAPES = (("run_info", "config", dict), ("run_info", "run_id", str), ("run_info", "subcommand", str),
           ("run_info", "created", str), ("run_info", "seed", (int, float)), ("train_info", "status", str),
           ("train_info", "method", str), ("train_info", "final", dict), ("train_info", "metrics", list),
           ("train_info", "predictions", dict), *(("train_info", s, dict) for s in SECTIONS))
_NAMES = {dict: "an object", list: "a list", str: "a string", (int, float): "a number"}


def shape_problem(rec: dict[str, Any]) -> Optional[str]:
    """What makes a record unreadable though it is valid JSON (an entry of another type than a record
    gives it, e.g. ``train_info.final: [1, 2]``), or None."""
    for part, key, kind in _SHAPES:
        value = rec[part].get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            return f"{part}.{key} is {type(value).__name__}, not {_NAMES[kind]}"
    for i, row in enumerate(rec["train_info"].get("metrics") or []):
        step = row.get("step") if isinstance(row, dict) else None
        if not isinstance(row, dict) or not (step is None or (isinstance(step, (int, float)) and not isinstance(step, bool))):
            return f"train_info.metrics[{i}] is not an object with a numeric step"
    return None


def _problem(path: Path, reason: str, problems: Optional[list[tuple[str, str]]]) -> None:
    if problems is None:
        warnings.warn(f"{path}: {reason}; skipped", RecordWarning, stacklevel=3)
    else:
        problems.append((str(path), reason))


# ---------------------------------------------------------------------------------- labels
def method_of(rec: dict[str, Any]) -> str:
    """The record's method label (``sft+lora``, ``dpo+full``; old records ``lora``, ``lora+nf4``)."""
    label = rec["train_info"].get("method")
    if not label:
        cp = ((rec["run_info"].get("config") or {}).get("model") or {})
        cp = cp.get("class_path") if isinstance(cp, dict) else None
        label = str(cp).rsplit(".", 1)[-1].lower() if cp else "?"
    return str(label)


def label_parts(label: str) -> tuple[Optional[str], str]:
    """(objective, tuner) of a label: ``sft+lora+nf4`` -> (sft, lora); old ``lora+nf4`` -> (None, lora)."""
    parts = label.split("+")
    if len(parts) >= 2 and parts[1] not in QUANTIZATIONS:
        return parts[0], parts[1]
    return None, parts[0]


def setting_of(rec: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The record's resolved config as flat dotted keys, less the seed and what is not a setting
    (:data:`ftbench.naming.NOT_SETTINGS`): what the setting labels compare (every key, defaults too)."""
    cfg = rec["run_info"].get("config")
    if not isinstance(cfg, dict):
        return None
    flat = pd.json_normalize(cfg, sep=".").to_dict("records")[0] if cfg else {}
    return {k: v for k, v in sorted(flat.items())
            if "__path__" not in k and not any(k == e or k.startswith(e + ".") for e in (SEED, *NOT_SETTINGS))}


def point_of(rec: dict[str, Any]) -> Any:
    """What makes the record's grid point besides its method and subcommand: its settings less the seed
    (``run_info.settings``, the normal form its run id digests: :mod:`ftbench.naming`). A record written
    before records kept their settings has its resolved config less what is not a setting (records of
    one ftbench version group alike either way); one with neither, its run id."""
    settings = rec["run_info"].get("settings")
    if isinstance(settings, dict):
        return grid_point(settings)
    setting = setting_of(rec)
    return setting if setting is not None else rec["run_info"].get("run_id")


def predictions_file(rec: dict[str, Any]) -> Optional[str]:
    """The record's predictions file (``train_info.predictions.path``, relative to the record's folder),
    when the record names one; None otherwise."""
    pred = rec["train_info"].get("predictions")
    name = pred.get("path") if isinstance(pred, dict) else None
    if not isinstance(name, str) or not name:
        return None
    return str(Path(rec.get("_path") or ".").parent / name)


# ---------------------------------------------------------------------------------- the frame
def _number(v: Any) -> float:
    """A finite float or NaN (records keep non-finite numbers as strings such as 'nan'; bools are not numbers)."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.number)):
        return math.nan
    v = float(v)
    return v if math.isfinite(v) else math.nan


def _flag(v: Any) -> float:
    return float(v) if isinstance(v, (bool, np.bool_)) else math.nan


def _with_last_train_metrics(info: dict[str, Any]) -> dict[str, Any]:
    """``info`` with the ``train/`` metrics of its last logged curve row added to ``final``."""
    curve = info.get("metrics")
    last = curve[-1] if isinstance(curve, list) and curve and isinstance(curve[-1], dict) else {}
    final = info.get("final") if isinstance(info.get("final"), dict) else {}
    extra = {k: v for k, v in last.items() if k.startswith("train/") and k not in final}
    return {**info, "final": {**final, **extra}} if extra else info


def metrics_frame(infos: list[dict[str, Any]]) -> pd.DataFrame:
    """The numbers of each ``train_info`` as columns (see the module docstring), and :data:`FLAGS` as
    1.0/0.0; one row per record."""
    infos = [_with_last_train_metrics(info) for info in infos]
    flat = pd.json_normalize(infos, sep=".") if infos else pd.DataFrame()
    keep = {}
    for col in flat.columns:
        if col.startswith("final."):
            name = col[len("final."):]
        elif "." not in col or col.split(".", 1)[0] in SECTIONS:
            name = col  # a top-level number (fit_seconds) or section.key
        else:
            continue
        values = flat[col].map(_flag if col in FLAGS else _number)
        if values.notna().any():
            keep[name] = values.astype(float)
    return pd.DataFrame(keep, index=flat.index)


def _col(df: pd.DataFrame, name: str) -> pd.Series:
    return df[name] if name in df else pd.Series(np.nan, index=df.index, dtype=float)


def _peak_mb(df: pd.DataFrame) -> pd.Series:
    peak = _col(df, "memory.peak_bytes").combine_first(_col(df, "test_memory.peak_bytes"))
    return peak.where(peak > 0) / 2**20  # training phase; the test phase for test-only runs


def _breakdown_mb(part: str) -> Callable[[pd.DataFrame], pd.Series]:
    def column(df: pd.DataFrame) -> pd.Series:
        value = _col(df, f"memory_breakdown.{part}.bytes")
        if part == "activations":  # what the step keeps alive besides what autograd saves
            value = value + _col(df, "memory_breakdown.activations.other_live_bytes").fillna(0)
        return value / 2**20
    return column


def _device_mem_mb(df: pd.DataFrame) -> pd.Series:
    """The memory a run stands for on its device: CUDA's allocated peak on a GPU; on a CPU the predicted
    device peak of the memory breakdown (the process's resident peak also holds what loading and Python
    left behind), else that resident peak for records without a breakdown."""
    cuda = _col(df, "memory.cuda_allocated_peak_bytes")
    predicted = _col(df, "memory_breakdown.predicted_peak_bytes")
    return (cuda.where(cuda > 0) / 2**20).combine_first(predicted / 2**20).combine_first(_peak_mb(df))


def _wall(df: pd.DataFrame) -> pd.Series:
    wall = _col(df, "fit_seconds").fillna(0) + _col(df, "test_seconds").fillna(0)
    return wall.where(wall > 0)


def _ppl(df: pd.DataFrame) -> pd.Series:
    return _col(df, "val/perplexity").combine_first(np.exp(_col(df, "val/loss").clip(upper=50.0)))


#: the default table's quantities, each from the discovered columns
DERIVED: dict[str, Callable[[pd.DataFrame], pd.Series]] = {
    "trainable": lambda df: _col(df, "params.trainable"),
    "trainable_pct": lambda df: _col(df, "params.trainable_pct"),
    "total": lambda df: _col(df, "params.total"),
    "peak_mem_mb": _peak_mb,
    "weights_mb": _breakdown_mb("weights"),
    "grads_mb": _breakdown_mb("gradients"),
    "optimizer_mb": _breakdown_mb("optimizer"),
    "activations_mb": _breakdown_mb("activations"),
    "pred_peak_mb": lambda df: _col(df, "memory_breakdown.predicted_peak_bytes") / 2**20,
    "device_mem_mb": _device_mem_mb,
    "tokens_per_s": lambda df: _col(df, "throughput.trained_tokens_per_s"),
    "wall_s": _wall,
    "val_loss": lambda df: _col(df, "val/loss"),
    "val_ppl": _ppl,
    "test_loss": lambda df: _col(df, "test/loss"),
    # held-out exact match: test only (a run without test rows shows none, rather than its val figure)
    "accuracy": lambda df: _col(df, "test/accuracy"),
    # forgetting: the general-text loss after training minus before (positive = forgot)
    "forgetting": lambda df: _col(df, "val/general/loss") - _col(df, "initial.val/general/loss"),
}


def runs_frame(records: list[dict[str, Any]], names: Optional[dict[str, str]] = None) -> pd.DataFrame:
    """One row per run: :data:`IDENTITY`, then :data:`DERIVED`, then every discovered metric column.
    ``names``: run id -> the name its sweep gave it (``runs: - name: sft``), the ``run`` column."""
    names = names or {}
    rows = []
    for rec in records:
        run, info = rec["run_info"], rec["train_info"]
        label = method_of(rec)
        objective, tuner = label_parts(label)
        sub = run.get("subcommand")
        method = label if sub in ("fit", None) or label == "baseline" else f"{label} ({sub})"
        setting = setting_of(rec)
        point = json.dumps([method, sub, point_of(rec)], sort_keys=True, default=str)
        rows.append({"run_id": run.get("run_id"), "run": names.get(str(run.get("run_id")), ""), "method": method, "label": label, "objective": objective,
                     "tuner": tuner, "subcommand": sub, "seed": run.get("seed"), "status": info.get("status"),
                     "created": run.get("created"), "path": rec.get("_path"), "point": point, "setting": setting,
                     "curve": info.get("metrics") or [], "predictions": predictions_file(rec)})
    check_one_data_per_point(records, [r["point"] for r in rows])
    check_no_random_init_accuracy(records)
    ident = pd.DataFrame(rows, columns=list(IDENTITY))
    metrics = metrics_frame([rec["train_info"] for rec in records])
    derived = pd.DataFrame({k: f(metrics) for k, f in DERIVED.items()}, index=metrics.index)
    # a reward model's test/accuracy is its pairwise accuracy (TRL's name), not exact match: the
    # column of that name still shows it, the exact-match column does not
    derived.loc[ident["objective"] == "reward", "accuracy"] = math.nan
    return pd.concat([ident, derived, metrics], axis=1)


def check_one_data_per_point(records: list[dict[str, Any]], points: list[str]) -> None:
    """Runs of one grid point that read a data file in two versions (``train_info.data_fingerprints``:
    size and hash) are not seeds of one point: a :class:`ReportError` naming both runs and the file."""
    seen: dict[tuple[str, str], tuple[str, str]] = {}  # (point, source) -> (fingerprint, run id)
    for rec, point in zip(records, points):
        prints = rec["train_info"].get("data_fingerprints")
        if not isinstance(prints, dict):
            continue
        run = str(rec["run_info"].get("run_id") or rec.get("_path"))
        for source, value in sorted(prints.items()):
            first = seen.setdefault((point, source), (str(value), run))
            if first[0] != str(value):
                raise ReportError(f"runs {first[1]} and {run} are one grid point but read {source} in two versions "
                                  f"({first[0]} and {value}: bytes:sha256); rerun one of them on the same data, or "
                                  "report them from separate folders")


#: metric names that measure what a model answers (a test stage, answer metrics, lm-eval, accuracies)
_ACCURACY = re.compile(r"^(test|lm_eval)/|accurac|exact_match|rouge|chrf|bleu")


def random_init(rec: dict[str, Any]) -> bool:
    """Whether the record's run trained random weights (``backbone.random_init: true``)."""
    settings = rec["run_info"].get("settings")
    backbone = rec["train_info"].get("backbone")
    return bool((isinstance(settings, dict) and isinstance(settings.get("backbone"), dict)
                 and settings["backbone"].get("random_init"))
                or (isinstance(backbone, dict) and backbone.get("random_init")))


def check_no_random_init_accuracy(records: list[dict[str, Any]]) -> None:
    """A run of random weights has no accuracy a study may report (``ftbench fit`` refuses to measure
    one, :func:`ftbench.runcli.random_init_refusal`): a record of one that has accuracy metrics anyway
    is a :class:`ReportError` naming the run and the metric."""
    for rec in records:
        final = rec["train_info"].get("final") if isinstance(rec["train_info"].get("final"), dict) else {}
        found = sorted(k for k in final if _ACCURACY.search(str(k)))
        if found and random_init(rec):
            run = rec["run_info"].get("run_id") or rec.get("_path")
            raise ReportError(f"run {run} trained random weights (backbone.random_init: true) but records "
                              f"{found[0]}: a random model's accuracy measures nothing, so no study reports it; "
                              "report its memory and speed from a run without accuracy metrics")


def metric_columns(runs: pd.DataFrame) -> list[str]:
    """The numeric columns of a runs frame: derived first, then the discovered ones in record order."""
    return [c for c in runs.columns if c not in IDENTITY]
