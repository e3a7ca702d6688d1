"""The one forward of a preference pair batch that the reference-free objectives (CPO, ORPO) read per
token: ``cat([chosen, rejected])`` (:func:`ftbench.data.pairs.concatenate_pairs`), the float32 per-token
log-probs of every attended token (:func:`ftbench.objectives.losses.token_logps` against the input ids,
padding excluded), and two masks over them: the completion tokens (labels != -100) and every attended
token but the sequence's first (prompt and completion: ORPO's NLL set, as TRL's ``ORPOTrainer`` takes it).
On a completion token the label is the input id, so both masks read one set of log-probs: one
log-softmax pass over the logits, not two."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
    """``forward(input_ids, attention_mask) -> logits`` (the objective) on the concatenated pair batch."""
    cat = concatenate_pairs(batch, ("input_ids", "attention_mask", "labels"))
    every = cat["input_ids"].masked_fill(cat["attention_mask"] == 0, IGNORE_INDEX)
    logps, attended = token_logps(forward(cat["input_ids"], cat["attention_mask"]), every)
    completion = cat["labels"][:, 1:] != IGNORE_INDEX
    return PairTokens(cat, logps, completion, attended, batch["chosen_input_ids"].shape[0])
