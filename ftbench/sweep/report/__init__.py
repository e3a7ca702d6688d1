"""Tables and plots from run records. Every figure comes from a record; nothing is typed by hand.

``report(RESULTS_DIR)`` reads the records into one pandas frame (:mod:`.records`: one row per run,
a column per number in the records), groups the runs into grid points (same resolved config but for
the seed) and averages over seeds (:mod:`.stats`), and writes (:mod:`.table`, :mod:`.plots`):

* ``report.md`` — a markdown table, one row per grid point: mean ± sample std (n-1) over the seeds
  that completed, n, trainable parameters (and % of total), peak memory, trained tokens/s, wall time,
  final val loss / perplexity, exact-match accuracy (and per task), forgetting (change of
  ``val/general/loss`` from before to after training), memory and speed relative to a reference
  method (default ``full``), and Welch's t-test of accuracy against the reference when both have
  >= 2 seeds; from the predictions files, a 95 % interval on each point's score and the paired test
  against the reference on the test rows both answered (McNemar / permutation, Holm-adjusted, a
  verdict with the minimum detectable difference: :mod:`.comparison`, :mod:`.paired`); ``columns``
  (names, glob patterns or the titles shown) shows any other set of columns;
* ``report.csv`` — every column with raw numbers (means and stds in their own columns);
* ``accuracy_vs_memory.png`` (Pareto front marked), ``throughput.png``, ``loss_curves.png``;
* with ``examples`` N (``--examples N``): up to N wrong answers per method, every method's answer to
  the same rows side by side (:mod:`.examples`, from the predictions files the records point to).

``compare_report(DIR, [(A, B)])`` (``--compare A B``) prints the paired comparison of two points, and
with ``examples`` N the rows where they disagree.

``select="val/loss"`` keeps, per method, the grid point with the best seed-mean of that validation
metric (never a test metric). Several results directories go into one markdown file, a section each.

Nothing here imports torch; matplotlib (Agg) only when plots are made, scipy and statsmodels only for the tests.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd

from ftbench.fileio import write_text_atomic
from ftbench.sweep.report.records import (DERIVED, RecordWarning, ReportError, label_parts, load_records, runs_frame,
                                          setting_of, sweep_runs)
from ftbench.sweep.report.stats import (matches_reference, parse_select, pareto_front, select_points, summarise,
                                        welch_t_test)
from ftbench.sweep.report.table import (PAIRED, available, choose_keys, column, csv_text, markdown_table, summary_line,
                                        unmatched)

__all__ = ["DERIVED", "RecordWarning", "ReportError", "Study", "available", "choose_keys", "compare_report", "csv_text",
           "label_parts",
           "load_records", "load_study", "markdown_table", "pareto_front", "parse_select", "report", "runs_frame",
           "select_points", "setting_of", "summarise", "summary_line", "welch_t_test"]


@dataclass
class Study:
    """One results directory: its runs (one row per record) and its grid points (one row per table row)."""

    name: str
    directory: Path
    runs: pd.DataFrame
    points: pd.DataFrame
    selected: list[str] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)


def study_name(directory: Path) -> str:
    """The sweep's name (``sweep.json``), else the directory's."""
    try:
        name = json.loads((directory / "sweep.json").read_text()).get("name")
    except (OSError, ValueError, AttributeError):
        name = None
    return str(name or directory.resolve().name)


def run_names(directory: Path) -> dict[str, str]:
    """Run id -> the name the sweep gave the run (``sweep.json``), for the ``run`` column."""
    return {str(r["run_id"]): str(r["name"]) for r in sweep_runs(directory) if r.get("name")}


def load_study(directory: str | Path, reference: str = "full", select: Optional[str] = None,
               select_over: Sequence[str] = ()) -> Study:
    """Read, group and compare the records in ``directory``; an unreadable record is a
    :class:`RecordWarning` (and a note in the report); no records at all is a :class:`ReportError`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ReportError(f"{directory} is not a directory")
    problems: list[tuple[str, str]] = []
    records = load_records(directory, problems)
    for path, reason in problems:
        warnings.warn(f"{path}: {reason}; skipped", RecordWarning, stacklevel=2)
    if not records:
        raise ReportError(f"{directory}: no run records (*.json with run_info and train_info)"
                          + (f"; {len(problems)} file(s) could not be read" if problems else ""))
    runs = runs_frame(records, run_names(directory))
    points, selected = summarise(runs, reference, select, select_over)
    return Study(study_name(directory), directory, runs, points, selected, problems)


def notes(study: Study, reference: str, select: Optional[str] = None) -> str:
    points = study.points
    lines = ["Mean ± sample std (n-1) over the seeds that completed (n). Peak memory: the training phase "
             "(test phase for test-only rows); trained tok/s excludes warm-up batches."]
    matched = points.loc[matches_reference(points, reference), "label"].unique()
    if not points["is_reference"].any():
        lines.append(f"No '{reference}' fine-tuning run in these results: no relative columns (choose one with --reference).")
    elif any(m != reference for m in matched):
        lines.append(f"Reference '{reference}': {', '.join(matched)} (each row against the one of its own objective "
                     "and settings where there is one).")
    if points["p"].notna().any():
        lines.append(f"p: Welch's two-sided t-test (unequal variances) of exact match over seeds against {reference}; "
                     "* p < 0.05. With no seed variance on either side p is 1 for equal means, 0 otherwise.")
    if points["forgetting"].notna().any():
        lines.append("Forgetting: val/general/loss after training minus before (positive = forgot).")
    if select:
        name, mode = parse_select(select)
        lines.append(f"One grid point per method, chosen by the best mean {name} over seeds "
                     f"({'lower' if mode == 'min' else 'higher'} is better; test metrics never choose): "
                     + "; ".join(study.selected) + ".")
    from ftbench.sweep.report.comparison import refusals

    lines += refusals(points)
    lines += [f"Skipped {Path(path).name}: {reason}." for path, reason in study.problems]
    return "\n".join(f"- {x}" for x in lines)


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("_") or "study"


def report(directories: str | Path | Sequence[str | Path], out: Optional[str | Path] = None, reference: str = "full",
           plots: bool = True, wandb: bool = False, wandb_project: Optional[str] = None,
           columns: Optional[Sequence[str]] = None, select: Optional[str] = None, examples: int = 0,
           select_over: Sequence[str] = ()) -> str:
    """Write the report for the records in ``directories`` (one, or several studies); return the
    markdown table (for several studies, a section per study), and with ``examples`` N up to N wrong
    answers per method side by side (:mod:`.examples`, from the runs' predictions files).

    ``out``: where to write; a ``.md`` path names the markdown file, anything else a directory that
    gets ``report.md``. Without ``out`` each study's report goes into its own directory. With one
    markdown file for several studies, a study's CSV and plots are named after it
    (``report-STUDY.csv``, ``STUDY-throughput.png``). ``columns``: names or glob patterns of the
    table's columns (``default`` = the default set). ``select``: a validation metric (``val/loss``,
    ``max:val/accuracy``) that picks one grid point per method; with ``select_over`` (short setting
    names, ``["lr"]``) one point per method and setting but those (a learning rate per LoRA rank). Every study is read and every option
    checked before anything is written."""
    dirs = [directories] if isinstance(directories, (str, Path)) else list(directories)
    if not dirs:
        raise ReportError("no results directory given")
    if select:
        parse_select(select)
    if select_over and not select:
        raise ReportError("--select-over: say what chooses with --select (e.g. --select val/loss --select-over lr)")
    if examples < 0:
        raise ReportError(f"--examples {examples}: give a number of rows >= 0")
    studies = [load_study(d, reference, select, select_over) for d in dirs]
    columns = [c for c in (columns or []) if c]
    bad = unmatched([s.points for s in studies], columns, reference)
    if bad:
        have = sorted({k for s in studies for k in available(s.points)})
        raise ReportError(f"--columns: {', '.join(bad)} match(es) no column; columns: {', '.join(have)}")
    seen: dict[str, int] = {}
    for s in studies:  # distinct names for sections and file names
        seen[s.name] = seen.get(s.name, 0) + 1
        s.name = s.name if seen[s.name] == 1 else f"{s.name}-{seen[s.name]}"
    if out is None and len(studies) > 1:
        return "\n\n".join(f"## {s.name}\n\n" + _write([s], s.directory / "report.md", reference, plots, wandb,
                                                      wandb_project, columns, select, examples) for s in studies)
    if out is None:
        md = Path(dirs[0]) / "report.md"
    else:
        md = Path(out) if str(out).endswith(".md") else Path(out) / "report.md"
    return _write(studies, md, reference, plots, wandb, wandb_project, columns, select, examples)


def compare_report(directory: str | Path, pairs: Sequence[tuple[str, str]], reference: str = "full",
                   select: Optional[str] = None, select_over: Sequence[str] = (), examples: int = 0) -> str:
    """The paired comparison of each pair (A, B) of points in one results directory (``--compare A B``,
    :func:`ftbench.sweep.report.comparison.compare_text`); writes nothing."""
    from ftbench.sweep.report.comparison import compare_text

    if examples < 0:
        raise ReportError(f"--examples {examples}: give a number of rows >= 0")
    if select:
        parse_select(select)
    study = load_study(directory, reference, select, select_over)
    return compare_text(study.points, study.runs, pairs, examples)


def _write(studies: list[Study], md: Path, reference: str, plots: bool, wandb: bool, wandb_project: Optional[str],
           columns: list[str], select: Optional[str], examples: int = 0) -> str:
    folder = md.parent
    folder.mkdir(parents=True, exist_ok=True)
    several = len(studies) > 1
    sections, tables = [], []
    for s in studies:
        prefix = f"{_safe(s.name)}-" if several else ""
        keys = choose_keys(s.points, columns, reference)
        from ftbench.sweep.report.comparison import table_note

        table = markdown_table(s.points, keys, reference,
                               after=[table_note(s.points, keys, reference)] if any(k in PAIRED for k in keys) else [])
        written = make_plots(s, folder, prefix) if plots and len(s.points) else []
        from ftbench.sweep.report.levers import levers_table

        lever_section = levers_table(s.points)  # where the points differ by a speed lever
        if lever_section:
            table += "\n\n" + lever_section
        text = table + "\n\n" + notes(s, reference, select)
        if written:
            text += "\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in written)
        from ftbench.sweep.report.search import search_section

        searches, pngs = search_section(load_records(s.directory, []), folder, prefix, plots)  # a sweep's search: block
        if searches:
            text += "\n\n" + searches + "".join(f"\n\n![{p.stem}]({p.name})" for p in pngs)
            table += "\n\n" + searches
        csv_name = f"{md.stem}-{_safe(s.name)}.csv" if several else f"{md.stem}.csv"
        write_text_atomic(folder / csv_name, csv_text(s.points))
        if examples:
            from ftbench.sweep.report.examples import examples_section

            section = examples_section(s.points, s.runs, examples)
            text += "\n\n" + section.rstrip()
            table += "\n\n" + section.rstrip()
        if wandb:
            where = log_to_wandb(s, keys, reference, written, folder, wandb_project)
            table += f"\n\n(W&B: logged the table and {len(written)} plot(s); run files in {where})"
        if several:
            text = f"## {s.name}\n\nRecords: `{s.directory}` ({len(s.runs)} runs).\n\n" + text
            table = f"## {s.name}\n\n" + table
        sections.append(text)
        tables.append(table)
    write_text_atomic(md, "\n\n".join(sections) + "\n")
    return "\n\n".join(tables)


def make_plots(study: Study, folder: Path, prefix: str = "") -> list[Path]:
    from ftbench.sweep.report.plots import make_plots as _make

    return _make(study.points, study.runs, folder, prefix)


# ---------------------------------------------------------------------------------- W&B
def log_to_wandb(study: Study, keys: list[str], reference: str, plots: list[Path], folder: Path,
                 project: Optional[str] = None) -> str:
    """Log the table (a W&B Table), the raw numbers and the plots to a ``report`` run, grouped under
    the sweep's name. Offline unless an API key is set; returns where the run went."""
    from ftbench.sweep.report.table import cell
    from ftbench.wandb_mode import offline_unless_reachable

    offline_unless_reachable()
    import wandb

    group = os.environ.get("WANDB_RUN_GROUP") or study.name
    run = wandb.init(project=project or os.environ.get("WANDB_PROJECT", "ftbench"), group=group, job_type="report",
                     name=f"report-{group}", dir=str(folder), config={"results_dir": str(study.directory)},
                     reinit="finish_previous")
    cols = [column(k, reference) for k in keys]
    points = study.points
    table = wandb.Table(columns=[c.title for c in cols], data=[[cell(r, c) for c in cols] for _, r in points.iterrows()])
    raw = ["method", "setting", "n", *DERIVED, "mem_rel", "speed_rel", "p"]
    numbers = wandb.Table(columns=raw, data=[[None if pd.isna(v) else v for v in r] for r in
                                             points[raw].astype(object).itertuples(index=False)])
    run.log({"report/table": table, "report/numbers": numbers, **{f"report/{p.stem}": wandb.Image(str(p)) for p in plots}})
    where = getattr(run, "dir", "") or ""
    run.finish()
    return where
