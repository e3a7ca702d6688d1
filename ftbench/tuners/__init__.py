"""Tuners: what trains (full, freeze, any peft config, bottleneck adapters, none).

Crossed freely with the objectives (``ftbench.objectives``): a run is backbone x tuner x objective x
data x trainer.
"""

from ftbench.tuners.adapters import Adapters
from ftbench.tuners.base import Tuner
from ftbench.tuners.full import Freeze, Full, NoTuning

__all__ = ["Tuner", "Full", "Freeze", "NoTuning", "Adapters", "Peft"]


def __getattr__(name: str):
    # Peft imports peft (and bitsandbytes) at import time for its typed config: load it on first use
    if name == "Peft":
        from ftbench.tuners.peft_tuner import Peft

        return Peft
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
