"""Helpers shared by the peft-based methods."""

from __future__ import annotations

import torch

from ftbench.backbone import Backbone


def prepare_quantized(model: torch.nn.Module, backbone: Backbone) -> torch.nn.Module:
    """Freeze the backbone; for a quantized one, apply peft's k-bit preparation."""
    if backbone.quantization != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=backbone.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    model.requires_grad_(False)
    return model
