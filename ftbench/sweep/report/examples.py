"""``ftbench report DIR --examples N``: up to N wrong answers per method, side by side.

For each method (grid point) the report reads the predictions file of its first completed run (lowest
seed; ``train_info.predictions``), takes the test rows (validation rows when a run has no test rows),
and picks the N that score lowest on the data set's primary metric (its first metric: exact match
``accuracy`` by default, ROUGE-L for ``metrics: [rouge_l, ...]``; :func:`.rowscores.primary_metric`)
among those below 1, ties in file order; the section says which metric chose them. Each picked row is
shown with what every method of the study answered to the same row (same task, prompt and
reference), marked ✓ or ✗ by that method's own primary metric (its value for a graded metric). Prompts are shown without special tokens (``<|im_start|>``), white space
folded, cut to their last characters (where the question is); answers cut to their first characters.
Torch-free.
"""

from __future__ import annotations

import re
from typing import Any, Optional

import pandas as pd

from ftbench.sweep.report.paired import is_binary
from ftbench.sweep.report.rowscores import primary_metric, score, stage_rows

PROMPT_CHARS = 70
ANSWER_CHARS = 40
_SPECIAL = re.compile(r"<\|[^|>]{1,40}\|>")


def primary_score(row: dict[str, Any]) -> Optional[float]:
    """The row's value of its primary metric (None when it has none)."""
    return score(row, primary_metric(row))


def is_wrong(row: dict[str, Any]) -> Optional[bool]:
    value = primary_score(row)
    return None if value is None else value < 1.0


def mark(row: dict[str, Any]) -> str:
    """`` ✓`` / `` ✗`` for a primary score of 1 / 0, its value for a graded one, nothing without one."""
    value = primary_score(row)
    if value is None:
        return ""
    return {1.0: " ✓", 0.0: " ✗"}.get(value, f" ({value:.3g})")


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
    return stage_rows(path) if path else ("", [])


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
        # the lowest primary scores first; sorted() keeps file order among equal scores
        wrong = sorted((r for r in judged if is_wrong(r)), key=primary_score)
        metric = primary_metric(wrong[0] if wrong else judged[0]) if judged else "–"
        if is_binary([primary_score(r) for r in judged]):
            out.append(f"### {name}: {len(wrong)} of {len(judged)} {stage} rows wrong ({metric})")
        else:
            out.append(f"### {name}: {len(wrong)} of {len(judged)} {stage} rows below 1 ({metric}; the lowest first)")
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
                cells.append(cell_text(other.get("prediction"), ANSWER_CHARS) + mark(other))
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"
