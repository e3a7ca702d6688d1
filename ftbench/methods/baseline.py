"""The backbone as it is: nothing trains. Used with ``validate``/``test`` for the "before" row."""

from __future__ import annotations

import torch

from ftbench.methods.base import FTMethod


class Baseline(FTMethod):
    """The untouched backbone, for the baseline row of a comparison (``ftbench test``)."""

    method_name = "baseline"

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        model.requires_grad_(False)
        return model
