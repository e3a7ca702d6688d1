"""The predictions file of a run: ``{out}/{run_id}.predictions.jsonl``, one JSON object per evaluated row.

Each line: ``stage`` (``val``/``test``), ``step`` (the global step of the evaluation), ``task``,
``prompt``, ``reference``, ``prediction``, ``metrics`` (each metric's value for this row, by record
name) and, for a multiple-choice row, ``choices``, ``gold`` and the option each multiple-choice metric
picked (``picked``). The file holds the latest evaluation of each stage (validation rows are replaced
at every validation) and is rewritten whole and atomically (temporary file + rename, as the record is),
so an interrupted write leaves the previous file or none, never half of one.
The record points to it: ``train_info.predictions = {"path": NAME, "rows": {stage: n}}`` (``path``
relative to the record's folder). Torch-free: the report reads these files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Optional

from ftbench.errors import FTBenchError
from ftbench.fileio import write_text_atomic

SUFFIX = ".predictions.jsonl"
STAGES = ("val", "test")


class PredictionsFileError(FTBenchError):
    """A predictions file that cannot be read back (a line that is not a JSON object); the message
    names the file and the line, so the report prints it as one line."""


def predictions_path(record_path: "str | Path") -> Path:
    """``{out}/{run_id}.predictions.jsonl`` next to the record ``{out}/{run_id}.json``."""
    p = Path(record_path)
    return p.with_name(p.name[: -len(".json")] + SUFFIX if p.name.endswith(".json") else p.name + SUFFIX)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def dumps_rows(rows: Iterable[dict[str, Any]]) -> str:
    """JSONL text of ``rows`` (non-finite numbers as null, non-ASCII kept)."""
    return "".join(json.dumps(_clean(r), ensure_ascii=False) + "\n" for r in rows)


def write_predictions(path: "str | Path", by_stage: dict[str, list[dict[str, Any]]]) -> dict[str, int]:
    """Write every stage's rows (val first, then test) to ``path`` atomically; returns rows per stage."""
    order = [s for s in STAGES if s in by_stage] + [s for s in by_stage if s not in STAGES]
    write_text_atomic(path, dumps_rows(r for s in order for r in by_stage[s]))
    return {s: len(by_stage[s]) for s in order}


def read_predictions(path: "str | Path", stage: Optional[str] = None) -> list[dict[str, Any]]:
    """The rows of a predictions file (of one ``stage`` when given); a line that is not a JSON object
    raises :class:`PredictionsFileError` naming the file and the line."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise PredictionsFileError(f"{path}:{lineno}: not JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise PredictionsFileError(f"{path}:{lineno}: not a JSON object")
            if stage is None or row.get("stage") == stage:
                out.append(row)
    return out
