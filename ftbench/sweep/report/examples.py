"""``ftbench report DIR --examples N``: up to N wrong answers per method, side by side.

For each method (grid point) the report reads the predictions file of its first completed run (lowest
seed; ``train_info.predictions``), takes the test rows (validation rows when a run has no test rows)
in file order, and picks the first N that are wrong: the row's primary metric is below 1 (``accuracy``,
the exact match, when the row has it, else its first metric). Each picked row is shown with what every
method of the study answered to the same row (same task, prompt and reference), marked ✓ or ✗ by that
method's own primary metric. Prompts are shown without special tokens (``<|im_start|>``), white space
folded, cut to their last characters (where the question is); answers cut to their first characters.
Torch-free.
"""

from __future__ import annotations

import math
import re
from typing import Any, Optional

import pandas as pd

from ftbench.evaluation.predictions import read_predictions

PROMPT_CHARS = 70
ANSWER_CHARS = 40
_SPECIAL = re.compile(r"<\|[^|>]{1,40}\|>")


def primary(row: dict[str, Any]) -> Optional[str]:
    """The metric a row is judged wrong by: ``accuracy`` (exact match) when present, else the first."""
    metrics = row.get("metrics") or {}
    if "accuracy" in metrics:
        return "accuracy"
    return next(iter(metrics), None)


def is_wrong(row: dict[str, Any]) -> Optional[bool]:
    name = primary(row)
    value = (row.get("metrics") or {}).get(name) if name else None
    if not isinstance(value, (int, float)) or (isinstance(value, float) and math.isnan(value)):
        return None
    return value < 1.0


def _key(row: dict[str, Any]) -> tuple:
    return (row.get("task"), row.get("prompt"), row.get("reference"))


def cell_text(value: Any, limit: int, tail: bool = False) -> str:
    """A table cell: newlines as ↵, white space folded, cut to ``limit`` characters (``tail``: the end
    of a prompt, without its special tokens), ``|`` escaped."""
    text = "" if value is None else str(value)
    if tail:
        text = _SPECIAL.sub(" ", text)
    text = " ".join(text.replace("\n", " ↵ ").split())
    if tail:
        text = re.sub(r"^(↵ )+|( ↵)+$", "", text)
    if not text:
        return "(empty)"
    if len(text) > limit:
        text = "…" + text[-(limit - 1):] if tail else text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def _rows_of(path: Optional[str]) -> tuple[str, list[dict[str, Any]]]:
    """(stage, rows) of a predictions file: the test rows, else the validation rows."""
    if not path:
        return "", []
    try:
        rows = read_predictions(path)
    except (OSError, ValueError):
        return "", []
    for stage in ("test", "val"):
        mine = [r for r in rows if r.get("stage") == stage]
        if mine:
            return stage, mine
    return "", []


def _run_file(runs: pd.DataFrame, run_ids: list) -> Optional[str]:
    mine = runs[runs["run_id"].isin(run_ids) & (runs["status"] == "completed") & runs["predictions"].notna()]
    if mine.empty:
        return None
    return str(mine.sort_values("seed", key=lambda s: s.fillna(0), kind="stable").iloc[0]["predictions"])


def examples_section(points: pd.DataFrame, runs: pd.DataFrame, n: int) -> str:
    """The ``## Examples`` markdown: per method, up to ``n`` wrong rows with every method's answer."""
    methods: list[tuple[str, str, list[dict[str, Any]]]] = []
    for _, point in points.iterrows():
        name = str(point["method"]) + (f" ({point['setting']})" if point.get("setting") else "")
        stage, rows = _rows_of(_run_file(runs, list(point["run_ids"])))
        methods.append((name, stage, rows))
    shown = [(name, rows) for name, _, rows in methods if rows]  # the columns: methods with predictions
    lookup = [{_key(r): r for r in rows} for _, rows in shown]
    out = [f"## Examples: up to {n} wrong answers per method", ""]
    for name, stage, rows in methods:
        if not rows:
            out += [f"### {name}: no predictions file", ""]
            continue
        judged = [r for r in rows if is_wrong(r) is not None]
        wrong = [r for r in judged if is_wrong(r)]
        metric = primary(wrong[0] if wrong else judged[0]) if judged else "–"
        out.append(f"### {name}: {len(wrong)} of {len(judged)} {stage} rows wrong ({metric})")
        out.append("")
        if not wrong:
            continue
        head = ["task", "prompt", "reference"] + [m for m, _ in shown]
        out.append("| " + " | ".join(h.replace("|", "\\|") for h in head) + " |")
        out.append("|" + "|".join("---" for _ in head) + "|")
        for row in wrong[:n]:
            cells = [cell_text(row.get("task") or "–", 30), cell_text(row.get("prompt"), PROMPT_CHARS, tail=True),
                     cell_text(row.get("reference"), ANSWER_CHARS)]
            for table in lookup:
                other = table.get(_key(row))
                if other is None:
                    cells.append("–")
                    continue
                mark = {True: " ✗", False: " ✓", None: ""}[is_wrong(other)]
                cells.append(cell_text(other.get("prediction"), ANSWER_CHARS) + mark)
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"
