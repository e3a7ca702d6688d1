"""The optimizer and learning-rate schedule of a run, from the objective's settings and the tuner's ``lr``."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ftbench.errors import ConfigError


def optimization(params: list[torch.nn.Parameter], factory: Callable, tuner_lr: Optional[float], schedule: str,
                 warmup_steps: int, total_steps: int) -> dict:
    """Lightning's ``configure_optimizers`` answer: the optimizer ``factory`` makes on ``params`` (the
    tuner's ``lr``, when set, replacing the one given), and ``transformers.get_scheduler``'s ``schedule``
    stepped per optimizer step over ``total_steps``."""
    from transformers import get_scheduler

    try:
        optimizer = factory(params)
    except ValueError as err:  # torch's own checks: "Invalid learning rate: -0.1", ...
        raise ConfigError(f"model.init_args.optimizer: {err}") from None
    if tuner_lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = tuner_lr
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
