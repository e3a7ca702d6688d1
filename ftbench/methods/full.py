"""Full fine-tuning: every weight of the backbone trains."""

from __future__ import annotations

import torch

from ftbench.methods.base import FTMethod


class FullFinetune(FTMethod):
    """Full fine-tuning: all parameters train; saves the whole model."""

    method_name = "full"

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.backbone.quantization != "none":
            raise ValueError(
                f"FullFinetune: a {self.backbone.quantization} backbone cannot be trained in full "
                "(quantized weights take no gradient); use backbone.quantization: none, or LoRA on it (QLoRA)"
            )
        model.requires_grad_(True)
        return model
