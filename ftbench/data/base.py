"""What every data regime shares: the constructor arguments (:class:`SplitDataModule`), reading
rows with their file and line, format errors that name them, the one chat-row check
(:func:`chat_messages`, :func:`check_conversation`), prompt masking, dynamic-padding collation,
prompt-only batches for online RL (:class:`PromptCollator`) and the one split rule
(:func:`group_split`: rows with the same normalised prompt share a split, deterministic by seed).

Rows are read by hand from JSONL/JSON/CSV/text (``datasets`` loses line numbers, and a research
user with a 50k-line file needs to be told *which* line is wrong); a ``datasets`` dataset is read
through ``datasets`` itself (``hf:NAME`` for ``load_dataset`` or a ``save_to_disk`` folder).
"""

from __future__ import annotations

import csv
import io
import json
import random
import unicodedata
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Literal, Optional, Sequence, Union

import lightning as L
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler

from ftbench.backbone import Backbone
from ftbench.evaluation.metrics import MetricConfig

from ftbench.errors import ConfigError, FTBenchError

IGNORE_INDEX = -100


class DataFormatError(FTBenchError):
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
    form: Optional[str] = None  # the form it was read in (ftbench.data.formats), None: ftbench's own
    checked: bool = False  # its chat messages were checked by its form's rules when it was converted

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
def read_text_file(path: str | Path) -> str:
    """The text of a file, decoded as UTF-8; a :class:`DataFormatError` names the file and the line
    of the first byte that is not UTF-8."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataFormatError(str(path), None, None, f"cannot read: {err.strerror or err}") from err
    from ftbench.data.fingerprint import note_file

    note_file(str(path), data)
    try:  # utf-8-sig: a byte-order mark (Excel's CSV export) is not part of the first field's name
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataFormatError(str(path), line, None, f"not UTF-8 (byte 0x{data[err.start]:02x})") from err


def read_rows(path: str | Path) -> list[Row]:
    """Read ``.jsonl``/``.json``/``.csv`` rows, each with its file and line. Empty files are errors."""
    path = Path(path)
    text = read_text_file(path)
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
    from ftbench.data.fingerprint import note_dataset

    note_dataset(name, ds)
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


def normalise_text(text: str) -> str:
    """Text as compared for the split: Unicode NFKC, white space runs collapsed, ends stripped."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def prompt_key(prompt: "str | Sequence[dict[str, str]]") -> tuple[tuple[str, str], ...]:
    """The normalised prompt that decides a row's split group: a string is one user turn, so the
    same question as a plain prompt, an Alpaca instruction or a chat turn is one group."""
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    return tuple((m["role"], normalise_text(m["content"])) for m in prompt)


def group_split(keys: Sequence[Hashable], fractions: Sequence[float], seed: int) -> list[list[int]]:
    """The split rule of every regime: rows with the same key (the normalised prompt) go to the same
    split, deterministic in ``seed``.

    The rows are shuffled with ``random.Random(seed)``; each group takes the shuffled position of its
    first row (first in the input order), which orders the groups uniformly at random whatever
    their sizes. In that order the groups fill each part up to ``round(n * fraction)`` rows (at least
    one when the fraction is > 0; the group that crosses the mark goes in whole); the last part, the
    training rows, gets the rest. With no repeated key this is a plain seeded row split. Indices in
    each part are in input order."""
    n = len(keys)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    members: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        members.setdefault(key, []).append(i)
    groups = [members[keys[i]] for i in order if members[keys[i]][0] == i]
    parts: list[list[int]] = []
    g = 0
    for frac in fractions:
        target = int(round(n * frac))
        if frac > 0:
            target = max(1, target)
        part: list[int] = []
        while g < len(groups) and len(part) < target:
            part.extend(groups[g])
            g += 1
        parts.append(sorted(part))
    parts.append(sorted(i for group in groups[g:] for i in group))
    return parts


# ---------------------------------------------------------------------------- chat rows
CHAT_ROLES = ("system", "user", "assistant")


def chat_messages(row: Row, name: str, value: Any) -> list[dict[str, str]]:
    """The messages of field ``name`` as ``{role, content}`` dicts, each checked: an object with a
    known role and string content. A single message object counts as a list of one. A converted row
    (``row.checked``: LLaMA-Factory's forms, ``ftbench.data.formats``) was checked by its form's rules."""
    if isinstance(value, dict):
        value = [value]
    if row.checked:
        return list(value)
    if not isinstance(value, list) or not value:
        raise row.error(name, "must be a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(m, dict):
            raise row.error(where, "must be an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in CHAT_ROLES:
            raise row.error(f"{where}.role", f"unknown role {role!r} (expected one of {', '.join(CHAT_ROLES)})")
        if not isinstance(content, str):
            raise row.error(f"{where}.content", "missing or not a string")
        out.append({"role": role, "content": content})
    return out


def check_conversation(row: Row, *fields: tuple[str, list[dict[str, str]]]) -> None:
    """One conversation, possibly spread over fields (``("prompt", msgs), ("chosen", msgs)``):
    an optional leading system message, then user and assistant turns alternating, the last one the
    assistant's. Errors name the field and the message's index in it. A converted row
    (``row.checked``) was checked by its form's rules."""
    if row.checked:
        return
    named = [(f"{name}[{i}]", m) for name, msgs in fields for i, m in enumerate(msgs)]
    start = 1 if named and named[0][1]["role"] == "system" else 0
    for k, (where, m) in enumerate(named[start:]):
        want = "user" if k % 2 == 0 else "assistant"
        if m["role"] != want:
            raise row.error(f"{where}.role", f"roles must alternate user/assistant: expected {want!r}, got {m['role']!r}")
    if named and named[-1][1]["role"] != "assistant":
        raise row.error(f"{named[-1][0]}.role", "the last message must be from the assistant")


def row_choices(row: Row) -> Optional[tuple[list[str], int]]:
    """A multiple-choice row's ``(choices, gold)``: ``choices`` a list of at least two distinct strings,
    ``gold`` the index of the right one (an int, or a string of digits as a CSV gives it). None for a
    row with neither; one without the other is an error."""
    has_c, has_g = "choices" in row.fields, "gold" in row.fields
    if not has_c and not has_g:
        return None
    if not has_c or not has_g:
        raise row.error("gold" if has_c else "choices", "missing (a multiple-choice row has both 'choices' and 'gold')")
    choices, gold = row.fields["choices"], row.fields["gold"]
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise row.error("choices", "must be a list of at least two non-empty strings")
    if len(set(choices)) != len(choices):
        raise row.error("choices", "has the same option twice")
    if isinstance(gold, str) and gold.strip().isdigit():
        gold = int(gold.strip())
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise row.error("gold", f"must be the index of the right choice, 0 to {len(choices) - 1}; got {gold!r}")
    return list(choices), gold


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
    prompt_text: Optional[str] = None  # the rendered prompt (``prompt_ids`` as text), for prompt batches
    choices: Optional[list[str]] = None  # multiple choice: the options (scored after ``prompt_ids``)
    gold: Optional[int] = None  # multiple choice: the index of the right option
    choice_ids: Optional[list[list[int]]] = None  # multiple choice: each option's tokens (as the answer's)


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


def left_padded(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts left-padded to the longest, so each ends at the last column (where generation
    continues), and their attention mask (0 on the padding)."""
    ids = pad_batch(seqs, pad_id, left=True)
    width = ids.shape[1]
    lengths = torch.tensor([len(s) for s in seqs])
    return ids, (torch.arange(width)[None, :] >= (width - lengths)[:, None]).long()


class Collator:
    """Dynamic padding: right-padded ``input_ids``/``labels``/``attention_mask`` for the loss, and,
    with ``generation`` (evaluation batches) when every example has a reference answer, the
    left-padded prompts for greedy generation (``gen_input_ids``, ``gen_attention_mask``), the
    answers (``answers``) and, when a row is multiple choice, ``choices``, ``gold`` and ``choice_ids``
    (None for rows without options)."""

    def __init__(self, pad_id: int, pad_to_multiple_of: int = 1, generation: bool = True):
        self.pad_id = pad_id
        self.multiple_of = pad_to_multiple_of
        self.generation = generation

    def __call__(self, examples: Sequence[Example]) -> dict[str, Any]:
        ids = [e.input_ids for e in examples]
        batch: dict[str, Any] = {
            "input_ids": pad_batch(ids, self.pad_id, multiple_of=self.multiple_of),
            "labels": pad_batch([e.labels for e in examples], IGNORE_INDEX, multiple_of=self.multiple_of),
        }
        lengths = torch.tensor([len(s) for s in ids])
        batch["attention_mask"] = (torch.arange(batch["input_ids"].shape[1])[None, :] < lengths[:, None]).long()
        if self.generation and all(e.prompt_ids is not None and e.answer is not None for e in examples):
            batch["gen_input_ids"], batch["gen_attention_mask"] = left_padded([e.prompt_ids for e in examples], self.pad_id)
            batch["answers"] = [e.answer for e in examples]
            if any(e.choices is not None for e in examples):  # multiple choice (None for rows without options)
                batch["choices"] = [e.choices for e in examples]
                batch["gold"] = [e.gold for e in examples]
                batch["choice_ids"] = [e.choice_ids for e in examples]
        if any(e.task is not None for e in examples):
            batch["tasks"] = [e.task or "default" for e in examples]
        return batch


class PromptCollator:
    """Prompt-only batches (``prompt_batches: true``, for online RL such as GRPO): the left-padded
    prompts ``prompt_input_ids``/``prompt_attention_mask`` (the same tensors as a preference batch's
    and as ``gen_input_ids``/``gen_attention_mask``), the rendered prompt text ``prompts``, each
    row's exact answer or None ``answers``, and ``tasks`` (``"default"`` for a row without one)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, examples: Sequence[Any]) -> dict[str, Any]:
        if any(e.prompt_ids is None for e in examples):
            raise ConfigError("data.prompt_batches: these examples have no prompt (raw text has nothing to answer)")
        ids, mask = left_padded([e.prompt_ids for e in examples], self.pad_id)
        return {
            "prompt_input_ids": ids,
            "prompt_attention_mask": mask,
            "prompts": [e.prompt_text for e in examples],
            "answers": [e.answer for e in examples],
            "tasks": [e.task or "default" for e in examples],
        }


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


# ---------------------------------------------------------------------------- the shared data module
ANSWER_SLACK = 4  # tokens allowed past the longest reference answer: EOS and white space
Source = Union[str, list[str]]


def source_list(source: Optional[Source]) -> list[str]:
    """A source argument as a list (one string is a list of one; None is empty)."""
    if source is None:
        return []
    return [source] if isinstance(source, str) else list(source)


def refuse_arguments(kwargs: dict[str, Any], **reasons: str) -> None:
    """A shared argument that a regime fixes (and so hides from its CLI) given anyway: a ConfigError
    that says why, instead of Python's "got multiple values for keyword argument"."""
    for name, why in reasons.items():
        if name in kwargs:
            raise ConfigError(f"data.{name}: {why}")


class RepeatedBatches(Sampler[list[int]]):
    """Each batch of ``batches`` (a batch sampler) ``times`` times in a row, as TRL's ``RepeatSampler``
    (its ``repeat_count``): online RL reusing one rollout for several updates (objective grpo's
    ``num_iterations x steps_per_generation``) gets the same prompts at each of those steps, so an
    epoch still uses every prompt and the lr schedule counts every update."""

    def __init__(self, batches: Sampler[list[int]], times: int):
        self.batches, self.times = batches, times

    def __iter__(self):
        for batch in self.batches:
            for _ in range(self.times):
                yield batch

    def __len__(self) -> int:
        return len(self.batches) * self.times


class SplitDataModule(L.LightningDataModule):
    """The arguments, split rule and loaders every regime shares.

    A regime's ``__init__`` declares what differs (its own arguments, and a shared one whose default
    or meaning differs) and passes the rest on as ``**kwargs`` (jsonargparse follows them here, so
    the CLI documents every argument); an argument it passes by keyword is hidden from its CLI. It
    fills ``self.splits`` (``train``/``val``/``test`` lists of examples) in ``setup``, using
    :meth:`split` for the one split rule, and provides ``collator(generation)``."""

    regime = ""
    empty_train = "no training rows left after the split and truncation"
    #: how many steps in a row each training batch is given (set by the CLI from the objective's
    #: ``train_batch_repeats``: GRPO reusing a rollout); 1: every step a new batch
    train_batch_repeats = 1
    #: training batches' rows packed into ``max_length`` blocks (``data.packing`` of the instruction,
    #: multitask and preference regimes: :mod:`ftbench.data.packing`); set by :meth:`set_row_packing`
    row_packing = False

    def __init__(
        self,
        backbone: Optional[Backbone] = None,
        source: Source = "builtin:instruction",
        val_source: Optional[Source] = None,
        test_source: Optional[Source] = None,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        builtin_size: int = 2000,
        max_length: int = 512,
        truncation: Literal["truncate", "drop"] = "truncate",
        max_train_rows: Optional[int] = None,
        max_eval_rows: Optional[int] = None,
        batch_size: int = 8,
        eval_batch_size: Optional[int] = None,
        pad_to_multiple_of: int = 1,
        num_workers: int = 0,
        seed: int = 42,
        order_seed: Optional[int] = None,
        prompt_batches: bool = False,
        metrics: Optional[list[MetricConfig]] = None,
    ):
        """
        Args:
            backbone: The shared backbone (linked from the top-level ``backbone`` by the CLI).
            source: ``builtin:NAME``, a .jsonl/.json/.csv file, ``hf:NAME`` for
                ``datasets.load_dataset`` or a ``save_to_disk`` folder; a list reads several.
            val_source: Validation rows; when absent, ``val_fraction`` of ``source`` is held out.
                Training rows that share a prompt with them are left out.
            test_source: Test rows (exact-match evaluation); when absent, ``test_fraction`` is held
                out. Training rows that share a prompt with them are left out.
            val_fraction: Share of ``source`` held out for validation when there is no ``val_source``.
                Rows with the same (normalised) prompt always land in the same split.
            test_fraction: Share of ``source`` held out for testing when there is no ``test_source``.
            builtin_size: Rows generated for a ``builtin:`` source (before the split).
            max_length: Longest tokenised row, prompt and response together.
            truncation: What to do with longer rows: ``truncate`` (cut the end) or ``drop``. Counted.
            max_train_rows: Use at most this many training rows (after the split).
            max_eval_rows: Use at most this many validation and test rows each.
            batch_size: Training micro-batch size.
            eval_batch_size: Validation/test batch size (default: ``batch_size``).
            pad_to_multiple_of: Round padded lengths up (8 helps tensor cores on GPU).
            num_workers: DataLoader workers.
            seed: Seed of the split (and of generated data): the same held-out rows for every run.
            order_seed: Seed of the training order (shuffling, mixture draws); None: ``seed``. The
                CLI sets it to the run's ``seed_everything`` when it is not given, so that seeds vary
                what a run sees and in which order (the only randomness of full fine-tuning without
                dropout) while every seed keeps the same validation and test rows.
            prompt_batches: Training batches hold prompts only, for online RL (``prompt_input_ids``,
                ``prompt_attention_mask``, ``prompts``, ``answers``, ``tasks``); validation and test
                batches are unchanged.
            metrics: The answer metrics of validation and test (``ftbench.evaluation.metrics``): names
                (``exact_match``, ``label_accuracy``, ``rouge_l``, ``chrf``, ``bleu``, ``mc_accuracy``,
                ``mc_accuracy_norm``) or objects with options (``{metric: exact_match, ignore_case:
                true, regex: '-?\\d+'}``). Default: ``[exact_match]`` (recorded as ``accuracy``), plus
                ``mc_accuracy`` and ``mc_accuracy_norm`` when held-out rows carry ``choices``.
        """
        super().__init__()
        for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= frac < 1.0:
                raise ConfigError(f"data.{name}: must be in [0, 1), got {frac}")
        if val_fraction + test_fraction >= 1.0:
            raise ConfigError(f"data.val_fraction + data.test_fraction: must be below 1, got {val_fraction + test_fraction}")
        if max_length < 2:
            raise ConfigError(f"data.max_length: must be at least 2, got {max_length}")
        for name, size in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size), ("pad_to_multiple_of", pad_to_multiple_of)):
            if size is not None and size < 1:
                raise ConfigError(f"data.{name}: must be at least 1, got {size}")
        if source is not None and not source_list(source):
            raise ConfigError("data.source: give at least one source")
        self.backbone = backbone or Backbone()
        self.source, self.val_source, self.test_source = source, val_source, test_source
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.builtin_size = builtin_size
        self.max_length, self.truncation = max_length, truncation
        self.max_train_rows, self.max_eval_rows = max_train_rows, max_eval_rows
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.pad_to_multiple_of, self.num_workers, self.seed = pad_to_multiple_of, num_workers, seed
        self.order_seed = seed if order_seed is None else order_seed
        self.prompt_batches = prompt_batches
        from ftbench.evaluation.metrics import build_metrics

        build_metrics(metrics)  # checked now, before any data is read or any model loaded (a MetricError)
        self.metrics = metrics
        self._metric_suites: dict[Optional[str], list] = {}
        self.splits: dict[str, list] = {}
        self.max_answer_tokens: Optional[int] = None
        self.removed_as_held_out = 0

    # ------------------------------------------------------------------ rows and the split
    def source_name(self) -> str:
        """The source as one string, for messages."""
        return ", ".join(source_list(self.source))

    def read(self, source: Source) -> list:
        """The items (rows, documents) of one source argument; a list is read in order."""
        return [item for s in source_list(source) for item in self.read_one(s)]

    def read_one(self, source: str) -> list:
        raise NotImplementedError

    def split(self, items: list, key: Callable[[Any], Hashable]) -> dict[str, list]:
        """``train``/``val``/``test`` items under the one rule (:func:`group_split`): items with the
        same ``key`` (the normalised prompt) share a split; an explicit ``val_source``/``test_source``
        replaces its share, and training items that share a key with it are left out (counted in
        ``removed_as_held_out``)."""
        keys = [key(x) for x in items]
        fractions = [0.0 if self.val_source else self.val_fraction, 0.0 if self.test_source else self.test_fraction]
        val_idx, test_idx, train_idx = group_split(keys, fractions, self.seed)
        out = {
            "val": self.read(self.val_source) if self.val_source else [items[i] for i in val_idx],
            "test": self.read(self.test_source) if self.test_source else [items[i] for i in test_idx],
        }
        held_out = {key(x) for x in out["val"] + out["test"]} if self.val_source or self.test_source else set()
        out["train"] = [items[i] for i in train_idx if keys[i] not in held_out]
        self.removed_as_held_out = len(train_idx) - len(out["train"])
        return {k: out[k] for k in ("train", "val", "test")}

    def limit(self, split: str, items: list) -> list:
        """The first ``max_train_rows`` (training) or ``max_eval_rows`` (validation, test) items."""
        n = self.max_train_rows if split == "train" else self.max_eval_rows
        return items if n is None else items[:n]

    # ------------------------------------------------------------------ answer metrics
    def metric_config(self, task: Optional[str]) -> Optional[list]:
        """The ``metrics`` given for ``task``'s rows (a mixture overrides this per task); None = the default."""
        return self.metrics

    def metrics_for(self, task: Optional[str]) -> list:
        """The resolved answer metrics of ``task``'s rows (``ftbench.evaluation.metrics``): the given
        list, or ``[exact_match]`` plus ``mc_accuracy``/``mc_accuracy_norm`` when held-out rows of the
        task carry options."""
        if task not in self._metric_suites:
            from ftbench.evaluation.metrics import build_metrics

            given = self.metric_config(task)
            if given is None:
                given = ["exact_match"]
                if any(getattr(e, "choices", None) is not None and getattr(e, "task", None) == task
                       for split in ("val", "test") for e in self.splits.get(split, [])):
                    given += ["mc_accuracy", "mc_accuracy_norm"]
            self._metric_suites[task] = build_metrics(given, self._metrics_where(task))
        return self._metric_suites[task]

    def _metrics_where(self, task: Optional[str]) -> str:
        return "data.metrics"

    def check_metrics(self) -> None:
        """Held-out rows fit their metrics: a ``label_accuracy`` reference is one of its labels, and a
        multiple-choice metric has rows with options. A ConfigError names the metric and the row."""
        from ftbench.evaluation.metrics import LabelAccuracy

        self._metric_suites = {}
        rows = [(split, e) for split in ("val", "test") for e in self.splits.get(split, [])
                if getattr(e, "answer", None) is not None]
        for task in {getattr(e, "task", None) for _, e in rows}:
            mine = [(split, e) for split, e in rows if getattr(e, "task", None) == task]
            for m in self.metrics_for(task):
                where = self._metrics_where(task)
                if m.needs_choices and not any(getattr(e, "choices", None) is not None for _, e in mine):
                    raise ConfigError(f"{where}: {m.kind} scores options, but no held-out row"
                                     f"{'' if task is None else f' of task {task!r}'} has 'choices' and 'gold'")
                if isinstance(m, LabelAccuracy):
                    for split, e in mine:
                        if m.label(e.answer, reference=True) is None:
                            raise ConfigError(f"{where}: label_accuracy: the reference answer {e.answer!r} of a {split} "
                                             f"row{'' if task is None else f' of task {task!r}'} is none of the labels "
                                             f"{', '.join(m.labels)}")

    def metric_names(self) -> "dict[str, list[str]] | list[str]":
        """What the record says about the metrics: their record names (per task in a mixture)."""
        tasks = sorted({getattr(e, "task", None) for split in ("val", "test") for e in self.splits.get(split, [])}, key=str)
        if tasks and tasks != [None]:
            return {str(t): [m.name for m in self.metrics_for(t)] for t in tasks}
        return [m.name for m in self.metrics_for(None)]

    def finish_setup(self, stage: Optional[str]) -> None:
        """After ``self.splits`` is filled: the generation budget, the held-out rows checked against their
        metrics, and an error if nothing is left to train on."""
        answers = [e.answer for split in ("val", "test") for e in self.splits.get(split, []) if getattr(e, "answer", None) is not None]
        if answers:  # greedy generation never needs more than the longest reference answer (+ EOS and slack)
            tok = self.backbone.tokenizer
            self.max_answer_tokens = max(len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers) + ANSWER_SLACK
        self.check_metrics()
        if not self.splits["train"] and stage in (None, "fit"):
            raise DataFormatError(self.source_name(), None, None, self.empty_train)

    # ------------------------------------------------------------------ loaders
    def collator(self, generation: bool = True):
        """The supervised collator; ``generation``: evaluation batches (with generation prompts)."""
        raise NotImplementedError

    def train_collator(self):
        """Prompt batches with ``prompt_batches``, packed rows with ``packing``, else the supervised
        collator without generation prompts."""
        if self.prompt_batches:
            return PromptCollator(self.backbone.tokenizer.pad_token_id)
        if self.row_packing:
            return self.packing_collator()
        return self.collator(generation=False)

    # ------------------------------------------------------------------ packed training rows
    def set_row_packing(self, packing: bool) -> None:
        """``data.packing`` (:mod:`ftbench.data.packing`), refused with prompt batches (nothing to pack)."""
        if packing and self.prompt_batches:
            raise ConfigError("data.packing: prompt batches (online RL) hold prompts to generate from, not rows to "
                              "pack; set data.packing or data.prompt_batches to false")
        self.row_packing = bool(packing)

    def packing_collator(self):
        """The collator of packed training batches (:class:`~ftbench.data.packing.RowPackingCollator`)."""
        from ftbench.data.packing import RowPackingCollator

        return RowPackingCollator(self.backbone.tokenizer.pad_token_id, self.max_length, self.pad_to_multiple_of)

    def item_lengths(self, item: Any) -> list[int]:
        """The token lengths of one training item's sequences (one row: one)."""
        return [len(item.input_ids)]

    def training_batches(self) -> list[list[int]]:
        """The first epoch's training batches (indices), in the training loader's seeded order."""
        from ftbench.data.packing import first_epoch_batches

        return first_epoch_batches(len(self.splits["train"]), self.batch_size, self.order_seed)

    def packing_record(self) -> dict[str, Any]:
        """What the record says about packing: on or off, and the padding fraction of the training
        batches unpacked and packed (either way, so the lever's effect is in every record)."""
        from ftbench.data.packing import training_padding

        out: dict[str, Any] = {"enabled": self.row_packing}
        if self.splits.get("train") and not self.prompt_batches:
            out["padding"] = training_padding([self.item_lengths(e) for e in self.splits["train"]],
                                              self.training_batches(), self.max_length, self.pad_to_multiple_of)
        return out

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.order_seed) if shuffle else None
        if split == "train" and self.train_batch_repeats > 1:  # the same order as shuffle=True, each batch repeated
            sampler = RandomSampler(self.splits[split], generator=generator)
            # generator given to the loader too: its iterator draws a base seed from it before the sampler
            # does, as with shuffle=True, so the order is the unrepeated loader's
            return DataLoader(self.splits[split], batch_sampler=self.repeated(sampler), collate_fn=self.train_collator(),
                              num_workers=self.num_workers, generator=generator)
        return DataLoader(
            self.splits[split],
            batch_size=self.batch_size if split == "train" else self.eval_batch_size,
            shuffle=shuffle,
            generator=generator,
            collate_fn=self.train_collator() if split == "train" else self.collator(),
            num_workers=self.num_workers,
        )

    def repeated(self, sampler: Sampler[int]) -> RepeatedBatches:
        """Training batches of ``batch_size`` drawn by ``sampler``, each ``train_batch_repeats`` times."""
        return RepeatedBatches(BatchSampler(sampler, self.batch_size, drop_last=False), self.train_batch_repeats)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


def warn_empty_texts(source: str, what: str, count: int, first: Optional[str]) -> None:
    """One warning line for ``count`` rows whose ``what`` text is empty (trained on as given: an empty
    answer teaches the model to stop at once)."""
    if count:
        print(f"ftbench: warning: {source}: {count} row(s) with an empty {what} (first: {first}); "
              "they are kept", file=sys.stderr)
