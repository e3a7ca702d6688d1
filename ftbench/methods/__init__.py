"""Fine-tuning methods: one LightningModule per method, sharing :class:`FTMethod`'s loop."""

from ftbench.methods.adapters import Adapters
from ftbench.methods.base import FTMethod
from ftbench.methods.baseline import Baseline
from ftbench.methods.full import FullFinetune
from ftbench.methods.lora import LoRA

__all__ = ["FTMethod", "Adapters", "Baseline", "FullFinetune", "LoRA", "PEFT"]


def __getattr__(name: str):
    # PEFT imports peft (and bitsandbytes) at import time for its typed config: load it on first use
    if name == "PEFT":
        from ftbench.methods.peft_method import PEFT

        return PEFT
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
