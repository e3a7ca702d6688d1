"""The one forward of a preference pair batch that the reference-free objectives (CPO, ORPO) read per
token: ``cat([chosen, rejected])`` (:func:`ftbench.data.pairs.concatenate_pairs`), the float32 per-token
log-probs of every attended token (:func:`ftbench.objectives.losses.token_logps` against the input ids,
padding excluded), and two masks over them: the completion tokens (labels != -100) and every attended
token but the sequence's first (prompt and completion: ORPO's NLL set, as TRL's ``ORPOTrainer`` takes it).
On a completion token the label is the input id, so both masks read one set of log-probs: one
log-softmax pass over the logits, not two.

Packed pair batches (``data.packing``): the model sees the blocks, and the per-token log-probs are laid
out as the concatenated rows' (:func:`packed_token_logps`), so every mask, sum and split downstream is
the unpacked one (DPO reads the same helper for its policy and reference log-probs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ftbench.data.base import IGNORE_INDEX
from ftbench.data.pairs import concatenate_pairs
from ftbench.objectives.losses import token_logps


@dataclass
class PairTokens:
    """Per-token log-probs of a pair batch, ``(2 pairs, T - 1)``, chosen rows first."""

    cat: dict[str, torch.Tensor]
    logps: torch.Tensor
    completion_mask: torch.Tensor  # labels != -100 (the completion tokens)
    attended_mask: torch.Tensor  # every attended token but the first (prompt and completion)
    pairs: int

    def chosen(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.logps[:self.pairs], self.completion_mask[:self.pairs]

    def rejected(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.logps[self.pairs:], self.completion_mask[self.pairs:]

    def chosen_attended(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.logps[:self.pairs], self.attended_mask[:self.pairs]


def pair_token_logps(forward: Any, batch: dict[str, Any]) -> PairTokens:
    """``forward(input_ids, attention_mask) -> logits`` (the objective) on the concatenated pair batch (a
    packed batch: on its blocks, :func:`packed_token_logps`)."""
    cat = concatenate_pairs(batch, ("input_ids", "attention_mask", "labels"))
    if is_packed(batch):  # the same per-token layout, gathered from the blocks
        every = batch["packed_input_ids"].masked_fill(batch["packed_attention_mask"] == 0, IGNORE_INDEX)
        logps, attended = packed_token_logps(forward, batch, every, cat["input_ids"].shape[1])
    else:
        every = cat["input_ids"].masked_fill(cat["attention_mask"] == 0, IGNORE_INDEX)
        logps, attended = token_logps(forward(cat["input_ids"], cat["attention_mask"]), every)
    completion = cat["labels"][:, 1:] != IGNORE_INDEX
    return PairTokens(cat, logps, completion, attended, batch["chosen_input_ids"].shape[0])


# ---------------------------------------------------------------------------- packed pair batches
def is_packed(batch: dict[str, Any]) -> bool:
    """A packed pair batch (``data.packing``: :class:`~ftbench.data.preference.PackedPairCollator`)."""
    return "packed_segments" in batch


def model_inputs(batch: dict[str, Any], cat: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``input_ids`` and ``attention_mask`` the model sees: the packed blocks, else the concatenated pairs
    (the step's padded and real token counts are read from them)."""
    if is_packed(batch):
        return batch["packed_input_ids"], batch["packed_attention_mask"]
    return cat["input_ids"], cat["attention_mask"]


def unpack_tokens(values: torch.Tensor, mask: torch.Tensor, segments: torch.Tensor, width: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token values of packed blocks, ``(blocks, L - 1)`` after the causal shift, laid out as the
    unpacked rows' ``(rows, width - 1)``: row ``i`` at ``(block b, start s, length l)`` takes
    ``values[b, s + j]`` (position ``s + j`` predicting the row's token ``j + 1``) for ``j < l - 1``, and 0
    (mask False) beyond, as :func:`~ftbench.objectives.losses.token_logps` leaves excluded positions.
    Position ``s - 1``, the previous row's last token predicting this row's first, belongs to no row."""
    j = torch.arange(width - 1, device=values.device)
    block, start, length = segments.to(values.device).unbind(-1)
    inside = j[None, :] < (length - 1)[:, None]
    flat = ((block * values.shape[1] + start)[:, None] + j[None, :]).masked_fill(~inside, 0)
    return values.reshape(-1)[flat].masked_fill(~inside, 0), mask.reshape(-1)[flat] & inside


def packed_token_logps(forward: Any, batch: dict[str, Any], labels: torch.Tensor, width: int,
                       model: Optional[torch.nn.Module] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~ftbench.objectives.losses.token_logps` of a packed pair batch against ``labels`` (packed,
    ``(blocks, L)``), unpacked to the concatenated rows' layout ``(2 pairs, width - 1)`` (:func:`unpack_tokens`).
    ``forward(input_ids, attention_mask, position_ids, model=...)`` is the objective's: with position ids it
    drops the mask, so the sequences of a block do not attend to each other."""
    logits = forward(batch["packed_input_ids"], batch["packed_attention_mask"], batch["packed_position_ids"], model=model)
    logps, mask = token_logps(logits, labels)
    return unpack_tokens(logps, mask, batch["packed_segments"], width)
