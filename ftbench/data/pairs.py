"""Preference-pair batches as one forward sees them: what the pairwise objectives (reward model, DPO)
share, next to the data that makes the pairs (:mod:`ftbench.data.preference`).

A pair batch (:class:`~ftbench.data.preference.PreferenceData`) carries ``chosen_{field}`` and
``rejected_{field}`` for ``input_ids``, ``attention_mask`` and ``labels``; an objective stacks them into
one ``(2 * pairs, T)`` batch, chosen rows first, so that both sides go through ONE forward (TRL's
``concatenated_forward``), and splits the per-row results back with :func:`split_pairs`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ftbench.data.base import IGNORE_INDEX

#: what a padded position holds in each concatenated field (ids: any id, the mask hides it)
_PAD = {"input_ids": 0, "attention_mask": 0, "labels": IGNORE_INDEX}


def concatenate_pairs(batch: dict[str, Any], fields: tuple[str, ...] = ("input_ids", "attention_mask")) -> dict[str, torch.Tensor]:
    """``chosen_{field}`` on top of ``rejected_{field}`` for each field, right-padded to one width:
    ``(2 * pairs, T)``, rows ``[:pairs]`` chosen and ``[pairs:]`` rejected, for one forward."""
    out = {}
    for f in fields:
        c, r = batch[f"chosen_{f}"], batch[f"rejected_{f}"]
        width = max(c.shape[1], r.shape[1])
        c, r = (F.pad(t, (0, width - t.shape[1]), value=_PAD.get(f, 0)) for t in (c, r))
        out[f] = torch.cat([c, r], dim=0)
    return out


def split_pairs(values: torch.Tensor, pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row values of a concatenated batch back into ``(chosen, rejected)``, ``(pairs, ...)`` each."""
    return values[:pairs], values[pairs:]


def pair_memory_batch(batch_size: int, seq_len: int, device: str | torch.device = "meta") -> dict[str, torch.Tensor]:
    """``batch_size`` pairs whose chosen and rejected sides are ``seq_len`` real tokens, every one
    trained: the batch ``ftbench estimate`` steps (``memory_batch``) for the pairwise objectives."""
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
    batch = {}
    for side in ("chosen", "rejected"):
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": torch.ones_like(ids),
                      f"{side}_labels": torch.zeros_like(ids)})
    return batch
