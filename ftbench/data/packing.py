"""Padding-free packing of training rows (TRL's ``padding_free``, LLaMA-Factory's ``neat_packing``):
the rows of one training batch laid end to end in blocks of at most ``max_length`` tokens, with
``position_ids`` restarting at 0 at each row and no attention across rows.

What is shared with the domain regime's packed documents (:mod:`ftbench.data.domain`), one definition
each: positions that restart per segment (a row here, a document there) carried in
``Example.meta['position_ids']``; their collation (:class:`~ftbench.data.base.PackedCollator`: padding gets
positions of its own from 0, so it never continues a row); and the forward
(:meth:`ftbench.objectives.base.Objective.forward`), which passes a batch's ``position_ids`` with
``attention_mask=None`` so that transformers builds the block-diagonal causal mask from the restarts
(sdpa, eager and flex; flash-attention reads them as variable-length sequences; the domain module's
docstring says how, and ``tests/test_domain.py`` checks it). A row that itself carries restarting
positions (a domain block in a task mixture) keeps them inside its segment.

What differs from the domain's packing: a row is never cut. The rows of ONE batch (the same
``batch_size`` rows in the same order as without packing) are spread evenly over as few blocks as
hold them (:func:`balanced_bins`; LLaMA-Factory packs the whole data set by a greedy knapsack, TRL's ``bfd``
strategy best-fit decreasing; per batch, the optimisation is the unpacked one: the same rows, the
same trained tokens, the loss equal to float rounding, so packing is a speed lever and nothing else).
The first label of each row is set to -100: unpacked nothing predicts a row's first token, packed
the previous row's last token would. Only training batches are packed: validation and test batches
(loss, generation, answer metrics) are the unpacked ones.

Written by hand: TRL's ``pack_dataset`` packs a whole ``datasets`` table (pyarrow) and its
``DataCollatorWithFlattening`` concatenates a batch into one row without a length bound; neither packs a
list of token rows into bounded blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import torch
from torch.utils.data import BatchSampler, RandomSampler

from ftbench.data.base import IGNORE_INDEX, Example, PackedCollator, padding_stats


def segment_positions(lengths: Iterable[int]) -> list[int]:
    """Positions restarting at 0 at each segment: ``[3, 2] -> [0, 1, 2, 0, 1]``."""
    return [p for n in lengths for p in range(n)]


def row_positions(row: Example) -> list[int]:
    """A row's positions: its own restarting ones (``meta['position_ids']``, a domain block) or 0..n-1."""
    pos = row.meta.get("position_ids")
    return list(pos) if pos is not None else list(range(len(row.input_ids)))


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of indices: longest first (ties by index), each into the first bin with room; a length
    over ``capacity`` gets a bin of its own. Each bin lists its indices in increasing order."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        for b, left in enumerate(room):
            if lengths[i] <= left:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return [sorted(b) for b in bins]


def balanced_bins(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """As many bins as :func:`first_fit_decreasing` needs, filled evenly: longest first (ties by index),
    each onto the least-filled bin with room (a new bin when none has room; a length over ``capacity``
    alone). A batch is padded to its longest block, so even blocks carry little padding where first-fit
    leaves one full block and a short remainder: the quickstart's batches (8 rows of ~34 tokens, 256-token
    blocks) pad 36.6 % of their slots first-fit, 1.6 % even (26.6 % unpacked;
    ``scripts/packing_padding.py``). Each bin lists its indices in increasing order."""
    loads = [0] * len(first_fit_decreasing(lengths, capacity))
    bins: list[list[int]] = [[] for _ in loads]
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        fits = [b for b in range(len(bins)) if loads[b] + lengths[i] <= capacity]
        if not fits:
            bins.append([])
            loads.append(0)
            fits = [len(bins) - 1]
        b = min(fits, key=lambda k: (loads[k], k))
        bins[b].append(i)
        loads[b] += lengths[i]
    return [sorted(b) for b in bins if b]


@dataclass
class PackedRows:
    """Rows packed into blocks. ``segments[i] = (block, start, length)`` says where row ``i`` lies."""

    blocks: list[Example]
    segments: list[tuple[int, int, int]]


def pack_rows(rows: Sequence[Example], max_length: int) -> PackedRows:
    """Pack whole rows into blocks of at most ``max_length`` tokens (:func:`balanced_bins`).

    Each block concatenates its rows' ``input_ids`` and ``labels`` (the first label of each row set to
    -100) and carries ``meta['position_ids']`` restarting at each row (:func:`row_positions`)."""
    bins = balanced_bins([len(r.input_ids) for r in rows], max_length)
    segments: list[Optional[tuple[int, int, int]]] = [None] * len(rows)
    blocks = []
    for b, members in enumerate(bins):
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        for i in members:
            row = rows[i]
            segments[i] = (b, len(ids), len(row.input_ids))
            ids.extend(row.input_ids)
            labels.extend([IGNORE_INDEX, *row.labels[1:]])
            pos.extend(row_positions(row))
        blocks.append(Example(input_ids=ids, labels=labels, meta={"position_ids": pos}))
    return PackedRows(blocks, [s for s in segments if s is not None])


class RowPackingCollator:
    """Training batches of packed rows (``data.packing``): the blocks as :class:`PackedCollator` pads them
    (``input_ids``, ``labels``, ``attention_mask`` 1 on real tokens, ``position_ids``) and ``segments``,
    ``(rows, 3)``: each row's ``(block, start, length)``, in the batch's row order."""

    def __init__(self, pad_id: int, max_length: int, pad_to_multiple_of: int = 1):
        self.max_length = max_length
        self.blocks = PackedCollator(pad_id, pad_to_multiple_of, generation=False)

    def __call__(self, examples: Sequence[Example]) -> dict[str, Any]:
        packed = pack_rows(examples, self.max_length)
        batch = self.blocks(packed.blocks)
        batch["segments"] = torch.tensor(packed.segments, dtype=torch.long).reshape(-1, 3)
        return batch


def packed_padding_stats(lengths: Sequence[int], batches: Iterable[Sequence[int]], max_length: int,
                         multiple_of: int = 1) -> dict[str, Any]:
    """:func:`~ftbench.data.base.padding_stats` of the same batches packed: each batch's rows become
    :func:`balanced_bins` blocks, padded to the longest block (rounded up to ``multiple_of``)."""
    block_lengths: list[int] = []
    block_batches: list[list[int]] = []
    for batch in batches:
        lens = [lengths[i] for i in batch]
        first = len(block_lengths)
        block_lengths += [sum(lens[i] for i in b) for b in balanced_bins(lens, max_length)]
        block_batches.append(list(range(first, len(block_lengths))))
    return padding_stats(block_lengths, block_batches, multiple_of)


def first_epoch_batches(n: int, batch_size: int, order_seed: int) -> list[list[int]]:
    """The first epoch's training batches (indices of ``n`` items) of the shared loader
    (``DataLoader(shuffle=True, generator=Generator().manual_seed(order_seed))``): its iterator draws a
    base seed from the generator, then the ``RandomSampler`` draws the order."""
    generator = torch.Generator().manual_seed(order_seed)
    torch.empty((), dtype=torch.int64).random_(generator=generator)  # the loader iterator's base seed
    sampler = RandomSampler(range(n), generator=generator)
    return list(BatchSampler(sampler, batch_size, drop_last=False))


def training_padding(item_lengths: Sequence[Sequence[int]], batches: Iterable[Sequence[int]], max_length: int,
                     multiple_of: int = 1) -> dict[str, Any]:
    """The padding of training batches without and with packing (the record's ``data.packing.padding``):
    ``{"unpacked": {...}, "packed": {...}}``, each ``{"tokens", "padded", "fraction"}`` (fraction = padded
    slots / all slots). ``item_lengths``: each item's sequences (an instruction row: one; a preference
    pair: chosen and rejected, padded to one width or packed together); ``batches``: indices of items."""
    flat: list[int] = []
    members: list[list[int]] = []
    for lens in item_lengths:
        members.append(list(range(len(flat), len(flat) + len(lens))))
        flat.extend(lens)
    seq_batches = [[j for i in batch for j in members[i]] for batch in batches]
    return {"unpacked": padding_stats(flat, seq_batches, multiple_of),
            "packed": packed_padding_stats(flat, seq_batches, max_length, multiple_of)}
