"""Fine-tuning methods: one LightningModule per method, sharing :class:`FTMethod`'s loop."""

from ftbench.methods.base import FTMethod
from ftbench.methods.baseline import Baseline
from ftbench.methods.full import FullFinetune
from ftbench.methods.lora import LoRA

__all__ = ["FTMethod", "Baseline", "FullFinetune", "LoRA"]
