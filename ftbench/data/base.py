"""What every data regime shares: reading rows with their file and line, format errors that name
them, prompt masking, dynamic-padding collation and the deterministic split.

Rows are read by hand from JSONL/JSON/CSV/text (``datasets`` loses line numbers, and a research
user with a 50k-line file needs to be told *which* line is wrong); a ``datasets`` dataset is read
through ``datasets`` itself (``hf:NAME`` for ``load_dataset`` or a ``save_to_disk`` folder).
"""

from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader

IGNORE_INDEX = -100


class DataFormatError(ValueError):
    """Bad input data. The message names the file, the line (or row) and the field."""

    def __init__(self, source: str, line: Optional[int], field: Optional[str], problem: str):
        self.source, self.line, self.field, self.problem = source, line, field, problem
        where = source if line is None else f"{source}:{line}"
        what = f"field {field!r}: " if field else ""
        super().__init__(f"{where}: {what}{problem}")


@dataclass
class Row:
    """One input row and where it came from (for error messages)."""

    fields: dict[str, Any]
    source: str
    line: Optional[int]

    def error(self, field: Optional[str], problem: str) -> DataFormatError:
        return DataFormatError(self.source, self.line, field, problem)

    def get_str(self, name: str, required: bool = True, default: str = "") -> str:
        value = self.fields.get(name)
        if value is None:
            if required:
                raise self.error(name, "missing")
            return default
        if not isinstance(value, str):
            raise self.error(name, f"must be a string, got {type(value).__name__}")
        return value


# ---------------------------------------------------------------------------- reading
def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataFormatError(str(path), None, None, f"cannot read: {err.strerror or err}") from err
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataFormatError(str(path), line, None, f"not UTF-8 (byte 0x{data[err.start]:02x})") from err


def read_rows(path: str | Path) -> list[Row]:
    """Read ``.jsonl``/``.json``/``.csv`` rows, each with its file and line. Empty files are errors."""
    path = Path(path)
    text = _read_text(path)
    src = str(path)
    suffix = path.suffix.lower()
    rows: list[Row] = []
    if suffix in (".jsonl", ".ndjson"):
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFormatError(src, lineno, None, f"invalid JSON: {err.msg} (column {err.colno})") from err
            if not isinstance(obj, dict):
                raise DataFormatError(src, lineno, None, f"expected a JSON object, got {type(obj).__name__}")
            rows.append(Row(obj, src, lineno))
    elif suffix == ".json":
        try:
            obj = json.loads(text) if text.strip() else []
        except json.JSONDecodeError as err:
            raise DataFormatError(src, err.lineno, None, f"invalid JSON: {err.msg}") from err
        if isinstance(obj, dict) and isinstance(obj.get("data"), list):
            obj = obj["data"]
        if not isinstance(obj, list):
            raise DataFormatError(src, None, None, "expected a JSON list of objects")
        for i, item in enumerate(obj, 1):
            if not isinstance(item, dict):
                raise DataFormatError(src, None, None, f"row {i}: expected a JSON object")
            rows.append(Row(item, f"{src} row {i}", None))
    elif suffix in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ",")
        for item in reader:
            rows.append(Row({k: v for k, v in item.items() if k is not None}, src, reader.line_num))
    else:
        raise DataFormatError(src, None, None, f"unsupported file type {suffix!r} (use .jsonl, .json, .csv, .tsv)")
    if not rows:
        raise DataFormatError(src, None, None, "no rows (the file is empty)")
    return rows


def read_dataset(name: str, split: str = "train") -> list[Row]:
    """Rows of a ``datasets`` dataset: ``hf:NAME[:CONFIG]`` for ``load_dataset`` or a saved folder."""
    import datasets

    if name.startswith("hf:"):
        parts = name[3:].split(":", 1)
        ds = datasets.load_dataset(parts[0], parts[1] if len(parts) > 1 else None, split=split)
        src = name
    else:
        loaded = datasets.load_from_disk(name)
        ds = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        src = name
    rows = [Row(dict(item), f"{src}[{split}]", i + 1) for i, item in enumerate(ds)]
    if not rows:
        raise DataFormatError(src, None, None, f"split {split!r} has no rows")
    return rows


def load_rows(source: str | Path, split: str = "train") -> list[Row]:
    """Rows from a file, or a ``datasets`` dataset (``hf:NAME`` or a ``save_to_disk`` folder)."""
    s = str(source)
    if s.startswith("hf:") or Path(s).is_dir():
        return read_dataset(s, split)
    return read_rows(s)


def split_indices(n: int, fractions: Sequence[float], seed: int) -> list[list[int]]:
    """Deterministic shuffled split of ``range(n)``: the last part gets the remainder."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    parts, start = [], 0
    for frac in fractions:
        k = int(round(n * frac))
        if frac > 0:
            k = max(1, k)
        parts.append(sorted(order[start : start + k]))
        start += k
    parts.append(sorted(order[start:]))
    return parts


# ---------------------------------------------------------------------------- examples
@dataclass
class Example:
    """A tokenised training example. ``labels`` is ``input_ids`` with prompt tokens set to -100."""

    input_ids: list[int]
    labels: list[int]
    prompt_ids: Optional[list[int]] = None  # for generation: everything before the answer
    answer: Optional[str] = None  # reference for exact match
    task: Optional[str] = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class TruncationStats:
    """How many rows were longer than ``max_length`` and what was done with them."""

    seen: int = 0
    truncated: int = 0
    dropped: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"seen": self.seen, "truncated": self.truncated, "dropped": self.dropped}


def segments_to_example(
    segments: Iterable[tuple[list[int], bool]],
    max_length: int,
    policy: str,
    stats: TruncationStats,
) -> Optional[Example]:
    """Join token segments, each ``(ids, trained)``; apply the truncation policy.

    Returns None when the row is dropped (too long with ``policy='drop'``, or no trained token left).
    """
    input_ids: list[int] = []
    labels: list[int] = []
    for ids, trained in segments:
        input_ids.extend(ids)
        labels.extend(ids if trained else [IGNORE_INDEX] * len(ids))
    stats.seen += 1
    truncated = False
    if len(input_ids) > max_length:
        if policy == "drop":
            stats.dropped += 1
            return None
        stats.truncated += 1
        truncated = True
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    if all(x == IGNORE_INDEX for x in labels[1:]):
        if truncated:  # counted as dropped, not truncated (and only if it was truncated)
            stats.truncated -= 1
        stats.dropped += 1
        return None
    return Example(input_ids=input_ids, labels=labels)


def pad_batch(seqs: Sequence[Sequence[int]], value: int, left: bool = False, multiple_of: int = 1) -> torch.Tensor:
    """Pad to the longest sequence in the batch (rounded up to ``multiple_of``)."""
    longest = max(len(s) for s in seqs)
    longest = -(-longest // multiple_of) * multiple_of
    out = torch.full((len(seqs), longest), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            if left:
                out[i, longest - len(s) :] = torch.tensor(s, dtype=torch.long)
            else:
                out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


class Collator:
    """Dynamic padding: right-padded ``input_ids``/``labels``/``attention_mask`` for the loss, and,
    when every example has a reference answer, left-padded prompts for greedy generation."""

    def __init__(self, pad_id: int, pad_to_multiple_of: int = 1):
        self.pad_id = pad_id
        self.multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[Example]) -> dict[str, Any]:
        ids = [e.input_ids for e in examples]
        batch: dict[str, Any] = {
            "input_ids": pad_batch(ids, self.pad_id, multiple_of=self.multiple_of),
            "labels": pad_batch([e.labels for e in examples], IGNORE_INDEX, multiple_of=self.multiple_of),
        }
        lengths = torch.tensor([len(s) for s in ids])
        batch["attention_mask"] = (torch.arange(batch["input_ids"].shape[1])[None, :] < lengths[:, None]).long()
        if all(e.prompt_ids is not None and e.answer is not None for e in examples):
            prompts = [e.prompt_ids for e in examples]
            batch["gen_input_ids"] = pad_batch(prompts, self.pad_id, left=True)
            plen = torch.tensor([len(p) for p in prompts])
            width = batch["gen_input_ids"].shape[1]
            batch["gen_attention_mask"] = (torch.arange(width)[None, :] >= (width - plen)[:, None]).long()
            batch["answers"] = [e.answer for e in examples]
        if any(e.task is not None for e in examples):
            batch["tasks"] = [e.task or "default" for e in examples]
        return batch


# ---------------------------------------------------------------------------- shared by the other regimes
class PackedCollator(Collator):
    """:class:`Collator` that also passes ``position_ids`` when every example carries them in
    ``meta['position_ids']`` (packed blocks whose positions restart at each document). Padding gets
    its own positions from 0, so it never continues a document."""

    def __call__(self, examples: Sequence[Example]) -> dict[str, Any]:
        batch = super().__call__(examples)
        if examples and all("position_ids" in e.meta for e in examples):
            width = batch["input_ids"].shape[1]
            rows = []
            for e in examples:
                pos = list(e.meta["position_ids"])
                rows.append(pos + list(range(width - len(pos))))
            batch["position_ids"] = torch.tensor(rows, dtype=torch.long)
        return batch


def padding_stats(lengths: Sequence[int], batches: Iterable[Sequence[int]], multiple_of: int = 1) -> dict[str, Any]:
    """Padding of dynamically padded batches: each batch (indices into ``lengths``) is padded to its
    longest sequence rounded up to ``multiple_of`` (what :func:`pad_batch` does).

    Returns ``{"tokens": real tokens, "padded": padding tokens, "fraction": padded / all positions}``."""
    real = padded = 0
    for batch in batches:
        lens = [lengths[i] for i in batch]
        if not lens:
            continue
        width = -(-max(lens) // multiple_of) * multiple_of
        real += sum(lens)
        padded += width * len(lens) - sum(lens)
    total = real + padded
    return {"tokens": real, "padded": padded, "fraction": padded / total if total else 0.0}


def read_text_file(path: str | Path) -> str:
    """The text of a file, decoded as UTF-8; a :class:`DataFormatError` names the file and the line
    of the first byte that is not UTF-8."""
    return _read_text(Path(path))


class SplitDataModule(L.LightningDataModule):
    """Train/val/test DataLoaders over ``self.splits`` (lists of examples), shared by the regimes.

    A subclass fills ``self.splits`` in ``setup`` and provides ``collator()``; it sets ``batch_size``,
    ``eval_batch_size``, ``num_workers`` and ``seed`` (the training order's seed)."""

    splits: dict[str, list]
    batch_size: int
    eval_batch_size: int
    num_workers: int
    seed: int

    def collator(self):
        raise NotImplementedError

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            self.splits[split],
            batch_size=self.batch_size if split == "train" else self.eval_batch_size,
            shuffle=shuffle,
            generator=generator,
            collate_fn=self.collator(),
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
