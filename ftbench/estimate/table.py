"""``ftbench estimate``'s rows as a text table, and the labels that tell its rows apart."""

from __future__ import annotations

from typing import Any, Optional


def row_labels(methods: list[str], settings: list[dict[str, Any]], files: list[str]) -> list[str]:
    """One label per row: its method label (``sft+lora``) where that is the row's alone; where rows
    share one, the method label and the tuner settings that differ between them (``sft+lora r8``,
    ``sft+lora r16``; a long key as ``key=value``), or the tuner file's name where none differs."""
    out = []
    for i, method in enumerate(methods):
        same = [j for j, m in enumerate(methods) if m == method]
        if len(same) == 1:
            out.append(method)
            continue
        keys = sorted({k for j in same for k in settings[j]})
        differ = [k for k in keys if len({repr(settings[j].get(k)) for j in same}) > 1]
        parts = [f"{k.rpartition('.')[2]}{settings[i].get(k)}" if len(k.rpartition('.')[2]) <= 2
                 else f"{k.rpartition('.')[2]}={settings[i].get(k)}" for k in differ]
        out.append(" ".join([method, *parts]) if parts else f"{method} ({files[i]})")
    return out


def flat_settings(init_args: Any, prefix: str = "") -> dict[str, Any]:
    """A config's ``init_args`` as ``{dotted.key: value}`` (nested ``class_path``/``init_args`` flattened)."""
    if not isinstance(init_args, dict):
        return {prefix.rstrip("."): init_args} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in init_args.items():
        if key == "init_args":
            out.update(flat_settings(value, prefix))
        elif isinstance(value, dict):
            out.update(flat_settings(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _gib(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def _count(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def table(rows: list[dict[str, Any]]) -> str:
    """The breakdowns as a text table (GiB = 2**30 bytes); a row is named by its ``label``
    (else its ``method``)."""
    head = ["method", "trainable", "weights", "grads", "optimizer", "activations", "transient", "total"]
    if any("max_batch_size" in r for r in rows):
        head.append("max batch")
    lines = [head]
    for r in rows:
        name = r.get("label") or r["method"]
        if "error" in r:
            lines.append([name, f"error: {r['error']}"])
            continue
        act = r["activations"]
        line = [name, _count(r["params"]["trainable"]), _gib(r["weights"]["bytes"]),
                _gib(r["gradients"]["bytes"]), _gib(r["optimizer"]["bytes"]),
                _gib(act["bytes"] + act.get("other_live_bytes", 0)), _gib(r["largest_transient"]["bytes"]),
                _gib(r["predicted_peak_bytes"])]
        if "max_batch_size" in r:
            line.append(str(r["max_batch_size"]))
        lines.append(line)
    widths = [max(len(line[i]) for line in lines if len(line) == len(head)) for i in range(len(head))]
    out = []
    for i, line in enumerate(lines):
        if len(line) < len(head):
            out.append(f"{line[0]:<{widths[0]}}  {line[1]}")
            continue
        out.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(line, widths))))
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
