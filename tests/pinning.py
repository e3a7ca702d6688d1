"""Pinned numbers live in ``tests/pins/<name>.json`` and are regenerated only by
``python scripts/regen_pins.py`` (never edited by hand). A test module that pins numbers defines
``PIN_NAME`` and ``compute_pins() -> dict``; its tests compare against ``load_pins(PIN_NAME)``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

PIN_DIR = Path(__file__).parent / "pins"


def load_pins(name: str) -> dict:
    path = PIN_DIR / f"{name}.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `python scripts/regen_pins.py {name}`")
    return json.loads(path.read_text())


def four_step_losses(objective, dm, steps: int = 4, seed: int = 0, after_setup: Optional[Callable] = None) -> list[float]:
    """The SFT loss (``SFT.loss``) over ``steps`` optimizer steps on fixed batches, fp32, with the
    optimizer and learning rate ``Objective.configure_optimizers`` would use (no schedule).
    ``after_setup(objective)`` runs once the model is built, before the first step."""
    import torch

    torch.manual_seed(seed)
    objective.configure_model()
    if after_setup is not None:
        after_setup(objective)
    opt = objective.optimizer_factory([p for p in objective.parameters() if p.requires_grad])
    if objective.tuner.lr is not None:  # as Objective.configure_optimizers: the tuner's lr replaces the optimizer's
        for group in opt.param_groups:
            group["lr"] = objective.tuner.lr
    losses = []
    for _, batch in zip(range(steps), dm.train_dataloader()):
        loss = objective.loss(batch)[0]
        extra = objective.tuner.regularization(objective.model)  # as SFT.training_step (AdaLoRA's penalty)
        if extra is not None:
            loss = loss + extra
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses
