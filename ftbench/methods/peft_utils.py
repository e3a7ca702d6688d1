"""Helpers shared by the peft-based methods (and the bottleneck adapters)."""

from __future__ import annotations

import torch

from ftbench.backbone import Backbone


def prepare_quantized(model: torch.nn.Module, backbone: Backbone) -> torch.nn.Module:
    """Freeze the backbone; for a quantized one, apply peft's k-bit preparation unless
    ``backbone.prepare_kbit`` is off.

    ``prepare_model_for_kbit_training`` upcasts the unquantized weights (embeddings, norms, head) to
    float32 and, with gradient checkpointing, makes the input embeddings' output require grad. With a
    float32 backbone the upcast is a no-op; with bfloat16/float16 it costs memory, which is why it can
    be turned off.
    """
    if backbone.quantization != "none" and getattr(backbone, "prepare_kbit", True):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=backbone.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    model.requires_grad_(False)
    return model
