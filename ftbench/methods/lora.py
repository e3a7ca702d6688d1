"""LoRA through peft: low-rank updates on the chosen linear layers; the backbone is frozen."""

from __future__ import annotations

from typing import Optional, Union

import torch

from ftbench.methods.base import FTMethod


class LoRA(FTMethod):
    """LoRA (peft). With a quantized backbone (``backbone.quantization: nf4``) this is QLoRA."""

    method_name = "lora"

    def __init__(
        self,
        r: int = 8,
        alpha: int = 16,
        dropout: float = 0.0,
        target_modules: Union[str, list[str]] = "all-linear",
        bias: str = "none",
        use_rslora: bool = False,
        use_dora: bool = False,
        init_lora_weights: Union[bool, str] = True,
        modules_to_save: Optional[list[str]] = None,
        **kwargs,
    ):
        """
        Args:
            r: Rank of the update matrices.
            alpha: Scaling numerator (the update is scaled by alpha / r, or alpha / sqrt(r) with rsLoRA).
            dropout: Dropout on the LoRA input.
            target_modules: Module names to adapt, or ``all-linear`` (every linear but the output head).
            bias: Which biases train: ``none``, ``all`` or ``lora_only``.
            use_rslora: Rank-stabilised scaling alpha / sqrt(r).
            use_dora: Weight-decomposed LoRA (DoRA).
            init_lora_weights: peft's initialisation (True: B = 0, so training starts at the backbone).
            modules_to_save: Extra modules trained in full and saved with the adapter.
        """
        super().__init__(**kwargs)
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.target_modules, self.bias = target_modules, bias
        self.use_rslora, self.use_dora = use_rslora, use_dora
        self.init_lora_weights, self.modules_to_save = init_lora_weights, modules_to_save

    def peft_config(self):
        from peft import LoraConfig, TaskType

        return LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            bias=self.bias,
            use_rslora=self.use_rslora,
            use_dora=self.use_dora,
            init_lora_weights=self.init_lora_weights,
            modules_to_save=self.modules_to_save,
        )

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        from peft import get_peft_model

        from ftbench.methods.peft_utils import prepare_quantized

        model = prepare_quantized(model, self.backbone)
        return get_peft_model(model, self.peft_config())
