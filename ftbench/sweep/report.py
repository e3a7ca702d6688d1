"""Tables from run records. Every figure comes from a record; nothing is typed by hand."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Optional

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


def load_records(directory: str | Path) -> list[dict[str, Any]]:
    """Every ``*.json`` run record in ``directory`` (not recursive), sorted by creation time."""
    records = []
    for p in sorted(Path(directory).glob("*.json")):
        try:
            rec = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and "train_info" in rec and "run_info" in rec:
            rec["_path"] = str(p)
            records.append(rec)
    return sorted(records, key=lambda r: r["run_info"].get("created", ""))


def _get(d: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def row_of(rec: dict[str, Any]) -> dict[str, Any]:
    """One table row (raw numbers) from one record."""
    info = rec["train_info"]
    final = info.get("final", {})
    mem = info.get("memory") or info.get("test_memory") or {}
    subcommand = rec["run_info"].get("subcommand")
    method = info.get("method", "?")
    if subcommand != "fit" and method != "baseline":
        method = f"{method} ({subcommand})"
    wall = (info.get("fit_seconds") or 0) + (info.get("test_seconds") or 0)
    params = info.get("params") or {}
    return {
        "run_id": rec["run_info"].get("run_id"),
        "method": method,
        "status": info.get("status"),
        "trainable": params.get("trainable"),
        "trainable_pct": params.get("trainable_pct"),
        "total": params.get("total"),
        "peak_mem_mb": mem.get("peak_bytes") / 2**20 if mem.get("peak_bytes") else None,
        "tokens_per_s": _get(info, "throughput", "trained_tokens_per_s"),
        "wall_s": wall or None,
        "val_loss": final.get("val/loss"),
        "test_loss": final.get("test/loss"),
        "accuracy": final.get("test/accuracy", final.get("val/accuracy")),
        "tasks": {k.split("/")[1]: v for k, v in final.items() if k.startswith("test/") and k.endswith("/accuracy") and k.count("/") == 2},
    }


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "–"
    if key == "trainable":
        return f"{value:,}"
    if key == "trainable_pct":
        return f"{value:.2f}"
    if key in ("peak_mem_mb", "tokens_per_s"):
        return f"{value:,.0f}"
    if key == "wall_s":
        return f"{value:.0f}"
    if key in ("val_loss", "test_loss"):
        return f"{value:.3f}"
    if key == "accuracy":
        return f"{100 * value:.1f}%"
    return str(value)


def markdown_table(rows: list[dict[str, Any]], columns=COLUMNS) -> str:
    head = "| " + " | ".join(title for _, title in columns) + " |"
    sep = "|" + "|".join("---" if k in ("method", "status") else "---:" for k, _ in columns) + "|"
    body = ["| " + " | ".join(_fmt(k, r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def csv_text(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    keys = [k for k, _ in COLUMNS] + ["run_id", "total"]
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k) for k in keys})
    return buf.getvalue()


def summary_line(rec: dict[str, Any]) -> str:
    r = row_of(rec)
    parts = [f"[ftbench] {r['run_id']}: {r['method']} {r['status']}"]
    for key, title in COLUMNS[2:]:
        if r.get(key) is not None:
            parts.append(f"{title}={_fmt(key, r[key])}")
    return " ".join(parts)


def report(directory: str | Path, out: Optional[str | Path] = None) -> str:
    """Write ``report.md`` and ``report.csv`` next to the records; return the markdown table."""
    directory = Path(directory)
    rows = [row_of(r) for r in load_records(directory)]
    table = markdown_table(rows)
    out = Path(out) if out else directory
    out.mkdir(parents=True, exist_ok=True)
    from ftbench.fileio import write_text_atomic

    write_text_atomic(out / "report.md", table + "\n")
    write_text_atomic(out / "report.csv", csv_text(rows))
    return table
