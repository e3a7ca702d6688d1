"""Unpaired preference data for KTO: a prompt, one completion, and whether it is desirable.

Accepted rows (TRL's unpaired preference format, standard or conversational):

- ``{"prompt": str, "completion": str, "label": true|false}``
- ``{"prompt": [messages], "completion": [assistant message], "label": true|false}``

``label`` is a JSON boolean (in a CSV file, the text ``true`` or ``false``); anything else, or an empty
completion, is an error naming the file, the line and the field. A row may add ``answer`` (the exact
answer, for exact-match evaluation) and ``task``.

A PAIRED preference row (any form :func:`ftbench.data.preference.parse_pair` reads, and the built-in
pairs) becomes two rows, as TRL's ``unpair_preference_dataset`` makes them: (prompt, chosen, true) and
(prompt, rejected, false). Both rows of a pair share a prompt, so they share a split.

Each row is tokenised as the preference regime tokenises one side of a pair (prompt masked out of the
labels). A training batch carries ``input_ids``/``attention_mask``/``labels``, ``kto_labels`` (bool,
True = desirable) and the KL rows ``kl_input_ids``/``kl_attention_mask``/``kl_labels``: row ``i``'s
prompt followed by the completion of the PREVIOUS row of the same batch, cyclic (row 1 gets row n's;
TRL 1.16's pairing, :func:`ftbench.objectives.losses.kl_completion_order`), for KTO's KL estimate. A
batch of one row has no mismatched completion: it carries no KL rows (the last batch of an epoch is
dropped when it would be one row alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch.utils.data import DataLoader

from ftbench.data.base import (IGNORE_INDEX, DataFormatError, Example, Row, TruncationStats, chat_messages,
                               check_conversation, left_padded, pad_batch, prompt_key, refuse_arguments,
                               segments_to_example)
from ftbench.data.preference import Pair, PreferenceData, completion_text, parse_pair

_TRUE, _FALSE = "true", "false"


def kl_completion_order(batch_size: int) -> list[int]:
    """For each row ``i`` of a KTO batch, the row whose completion it is paired with for the KL
    estimate: the previous one, cyclic (``x_1`` gets ``y_n``, ``x_i`` gets ``y_(i-1)``), TRL 1.16's
    rule. A batch of one has no mismatched completion: refused."""
    if batch_size < 2:
        raise ValueError(f"kto: the KL estimate pairs each prompt with another row's completion and needs a batch "
                         f"of at least 2 rows, got {batch_size}")
    return [(i - 1) % batch_size for i in range(batch_size)]


@dataclass
class Unpaired:
    """A normalised unpaired row: messages (chat form) or plain text, and its label."""

    prompt: Any
    completion: Any
    label: bool
    chat: bool
    row: Row
    answer: Optional[str] = None


def parse_label(row: Row) -> bool:
    """A row's ``label``: a boolean (the text true/false in a CSV file, which has no other types)."""
    value = row.fields.get("label")
    if isinstance(value, bool):
        return value
    if value is None:
        raise row.error("label", "missing (true for a desirable completion, false for an undesirable one)")
    if isinstance(value, str) and row.source.lower().endswith((".csv", ".tsv")) and value.strip().lower() in (_TRUE, _FALSE):
        return value.strip().lower() == _TRUE
    raise row.error("label", f"must be true or false, got {value!r}")


def parse_unpaired(row: Row) -> list[Unpaired]:
    """One unpaired row, or the two rows of a paired one (chosen: true, rejected: false)."""
    f = row.fields
    if "completion" not in f and ("chosen" in f or "rejected" in f):
        pair = parse_pair(row)
        return [Unpaired(pair.prompt, pair.chosen, True, pair.chat, row, pair.answer),
                Unpaired(pair.prompt, pair.rejected, False, pair.chat, row, pair.answer)]
    if f.get("completion") is None:
        raise row.error("completion", "missing (an unpaired row is prompt, completion, label; a paired one has chosen and rejected)")
    label = parse_label(row)
    answer = f.get("answer")
    if answer is not None and not isinstance(answer, str):
        raise row.error("answer", f"must be a string, got {type(answer).__name__}")
    if isinstance(f["completion"], list) or isinstance(f.get("prompt"), list):
        prompt = chat_messages(row, "prompt", f.get("prompt"))
        completion = chat_messages(row, "completion", f["completion"])
        check_conversation(row, ("prompt", prompt), ("completion", completion))
        chat = True
    else:
        prompt, completion, chat = row.get_str("prompt"), row.get_str("completion"), False
    if not completion_text(completion).strip():
        raise row.error("completion", "empty (a label needs a completion to judge)")
    return [Unpaired(prompt, completion, label, chat, row, answer)]


@dataclass
class UnpairedExample:
    example: Example  # prompt + completion, the prompt masked out of the labels
    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool
    task: Optional[str] = None
    answer: Optional[str] = None
    prompt_text: Optional[str] = None


class UnpairedCollator:
    """Right-pads the rows; adds ``kto_labels`` and (batches of two rows or more) the KL rows: row ``i``'s
    prompt with row ``i - 1``'s completion (cyclic), cut at ``max_length``; with ``generation`` and an
    exact answer in every row, the left-padded prompts and answers as the preference regime gives them."""

    def __init__(self, pad_id: int, max_length: int, pad_to_multiple_of: int = 1, generation: bool = True):
        self.pad_id, self.max_length, self.multiple_of, self.generation = pad_id, max_length, pad_to_multiple_of, generation

    def _pad(self, examples: Sequence[Example], prefix: str) -> dict[str, torch.Tensor]:
        ids = pad_batch([e.input_ids for e in examples], self.pad_id, multiple_of=self.multiple_of)
        labels = pad_batch([e.labels for e in examples], IGNORE_INDEX, multiple_of=self.multiple_of)
        lengths = torch.tensor([len(e.input_ids) for e in examples])
        mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
        return {f"{prefix}input_ids": ids, f"{prefix}attention_mask": mask, f"{prefix}labels": labels}

    def __call__(self, examples: Sequence[UnpairedExample]) -> dict[str, Any]:
        batch: dict[str, Any] = self._pad([e.example for e in examples], "")
        batch["kto_labels"] = torch.tensor([e.label for e in examples], dtype=torch.bool)
        if len(examples) >= 2:
            kl = []
            for i, j in enumerate(kl_completion_order(len(examples))):
                ids = (examples[i].prompt_ids + examples[j].completion_ids)[: self.max_length]
                labels = ([IGNORE_INDEX] * len(examples[i].prompt_ids) + examples[j].completion_ids)[: self.max_length]
                kl.append(Example(input_ids=ids, labels=labels))
            batch.update(self._pad(kl, "kl_"))
        batch["prompt_input_ids"], batch["prompt_attention_mask"] = left_padded([e.prompt_ids for e in examples], self.pad_id)
        if self.generation and all(e.answer is not None for e in examples):
            batch["gen_input_ids"], batch["gen_attention_mask"] = batch["prompt_input_ids"], batch["prompt_attention_mask"]
            batch["answers"] = [e.answer for e in examples]
        if any(e.task is not None for e in examples):
            batch["tasks"] = [e.task or "default" for e in examples]
        return batch


class UnpairedData(PreferenceData):
    """Prompt / completion / label rows (TRL's unpaired preference format) for KTO; paired rows and the
    built-in pairs are unpaired (chosen: desirable, rejected: undesirable). See the module docstring.

    Built-in sets as :class:`~ftbench.data.preference.PreferenceData`'s (``builtin:capitals``,
    ``builtin:TASK``), each pair giving two rows: ``builtin_size`` counts pairs."""

    regime = "unpaired"
    empty_train = "no training rows left after the split and truncation"

    def __init__(self, **kwargs: Any):
        """
        Args:
            **kwargs: The preference regime's arguments (:class:`~ftbench.data.preference.PreferenceData`);
                ``batch_size`` counts rows (KTO's KL estimate needs at least 2 in a batch), ``max_length``
                each row, the KL rows too.
        """
        if kwargs.pop("packing", False):  # the CLI passes the inherited default (false) too
            refuse_arguments({"packing": True}, packing="KTO's batches are not packed (each row's KL term is scored "
                                                        "with another row's completion, a pairing built per padded batch)")
        super().__init__(**kwargs)
        self.labels_count = {"desirable": 0, "undesirable": 0}

    # ------------------------------------------------------------------ rows
    def split_rows(self) -> dict[str, list[Row]]:
        def key(row: Row):
            return prompt_key(parse_unpaired(row)[0].prompt)

        parts = self.split(self.read(self.source), key)
        return {name: self.limit(name, rows) for name, rows in parts.items()}

    def encode(self, rows: list[Row], template: str) -> list[UnpairedExample]:
        out = []
        for row in rows:
            for item in parse_unpaired(row):
                # one side of a pair: the preference regime's tokenisation (chosen = rejected = the completion)
                pair = Pair(item.prompt, item.completion, item.completion, item.chat, row, item.answer)
                prompt_ids, completion_ids, _, prompt_text = self.tokenize(pair, template)
                example = segments_to_example([(prompt_ids, False), (completion_ids, True)], self.max_length,
                                              self.truncation, self.stats)
                if example is None:
                    continue
                task = row.fields.get("task")
                task = task if isinstance(task, str) else None
                example.task = task
                out.append(UnpairedExample(example, prompt_ids[: self.max_length], completion_ids, item.label, task,
                                           item.answer, prompt_text))
        return out

    def setup(self, stage: Optional[str] = None) -> None:
        if self.splits:
            return
        template = self.template()
        rows = self.split_rows()
        self.stats = TruncationStats()
        self.splits = {name: self.encode(r, template) for name, r in rows.items()}
        train = self.splits["train"]
        self.labels_count = {"desirable": sum(e.label for e in train), "undesirable": sum(not e.label for e in train)}
        self.finish_setup(stage)

    def check_labels(self, need_desirable: bool, need_undesirable: bool, option: str) -> None:
        """A training set with only one kind of label, when the objective's weights need both: one line
        naming the source and the field (``option``: the setting that would make it usable)."""
        d, u = self.labels_count["desirable"], self.labels_count["undesirable"]
        if need_desirable and d == 0:
            raise DataFormatError(self.source_name(), None, "label", f"every one of the {u} training rows is undesirable "
                                  f"(false); KTO needs desirable rows too, or set {option}")
        if need_undesirable and u == 0:
            raise DataFormatError(self.source_name(), None, "label", f"every one of the {d} training rows is desirable "
                                  f"(true); KTO needs undesirable rows too, or set {option}")

    # ------------------------------------------------------------------ loaders
    def collator(self, generation: bool = True) -> UnpairedCollator:
        return UnpairedCollator(self.backbone.tokenizer.pad_token_id, self.max_length, self.pad_to_multiple_of, generation)

    def train_dataloader(self) -> DataLoader:
        rows = len(self.splits["train"])
        if self.batch_size > 1 and self.train_batch_repeats == 1 and rows % self.batch_size == 1:
            # a last batch of one row has no other completion for the KL estimate: dropped (the same
            # order as the shared loader's: shuffled by a generator seeded with order_seed)
            return DataLoader(self.splits["train"], batch_size=self.batch_size, shuffle=True, drop_last=True,
                              generator=torch.Generator().manual_seed(self.order_seed),
                              collate_fn=self.train_collator(), num_workers=self.num_workers)
        return super().train_dataloader()

    def item_lengths(self, item: UnpairedExample) -> list[int]:
        return [len(item.example.input_ids)]

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.pop("identical_pairs", None)
        out.pop("packing", None)  # refused in __init__
        out["training_labels"] = dict(self.labels_count)
        return out
