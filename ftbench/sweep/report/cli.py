"""``ftbench report RESULTS_DIR... [options]``: the report's command line (torch-free).

:func:`add_arguments` and :func:`run` are what a parent parser wires in; :func:`main` is the same
command on its own (``python -m ftbench.sweep.report``). :func:`report_for_cli` is :func:`report` for
a command line: a :class:`ReportError` becomes ``error: ...`` on stderr and exit status 2, and each
skipped record a ``warning: ...`` line.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any, Optional

from ftbench.sweep.report import RecordWarning, ReportError, compare_report, report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results_dirs", nargs="+", metavar="RESULTS_DIR",
                        help="results directories (studies); several go into one markdown file, a section each")
    parser.add_argument("--out", help="FILE.md, or a directory that gets report.md (default: each RESULTS_DIR); "
                                      "the CSV and plots go next to it")
    parser.add_argument("--reference", default="full",
                        help="method the relative columns compare with: a label (sft+full) or its tuner part (full)")
    parser.add_argument("--columns", help="comma-separated column names, glob patterns or the titles the table "
                                          "shows, e.g. 'default,memory_breakdown.*' or 'method,n,val/*,exact match'")
    parser.add_argument("--select", metavar="METRIC", help="per method, keep the grid point with the best seed-mean "
                        "of this validation metric (val/loss: lower is better; val/accuracy: higher; "
                        "min:NAME / max:NAME to say); test metrics are refused")
    parser.add_argument("--select-over", metavar="KEYS", help="with --select: choose only among these settings "
                        "(comma-separated short names, e.g. lr), one choice per method and every other setting "
                        "(a learning rate per LoRA rank)")
    parser.add_argument("--examples", type=int, default=0, metavar="N",
                        help="print up to N wrong answers per method (test rows of its predictions file), with every "
                             "method's answer to the same rows side by side")
    parser.add_argument("--compare", nargs=2, action="append", metavar=("A", "B"),
                        help="print the paired comparison of two points of one results directory on the rows both "
                             "answered (a run name, a run id, 'method (setting)' or a method with one point); with "
                             "--examples N the rows where they disagree; repeat for several pairs (Holm-adjusted); "
                             "writes no file")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    parser.add_argument("--wandb", action="store_true", help="also log the table (and plots) to W&B (offline without an API key)")
    parser.add_argument("--wandb-project", default=None, help="W&B project (default: $WANDB_PROJECT or ftbench)")


def report_for_cli(*args: Any, make: Any = report, **kwargs: Any) -> str:
    """:func:`report` (or ``make``), with errors and skipped records said on stderr for a person."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RecordWarning)
        try:
            return make(*args, **kwargs)
        except ReportError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        finally:
            for w in caught:
                if issubclass(w.category, RecordWarning):
                    print(f"warning: {w.message}", file=sys.stderr)
                else:
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def run(args: argparse.Namespace) -> int:
    columns = [c.strip() for c in args.columns.split(",")] if args.columns else None
    over = [k.strip() for k in args.select_over.split(",") if k.strip()] if args.select_over else []
    if args.compare:
        if len(args.results_dirs) != 1:
            print("error: --compare: give one results directory", file=sys.stderr)
            return 2
        print(report_for_cli(args.results_dirs[0], [tuple(p) for p in args.compare], make=compare_report,
                             reference=args.reference, select=args.select, select_over=over, examples=args.examples),
              end="")
        return 0
    print(report_for_cli(args.results_dirs, args.out, reference=args.reference, plots=not args.no_plots,
                         wandb=args.wandb, wandb_project=args.wandb_project, columns=columns, select=args.select,
                         examples=args.examples, select_over=over))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="ftbench report", description="Tables and plots from the run records in "
                                     "one or more results directories.")
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except SystemExit as exit_:
        return int(exit_.code or 0)
