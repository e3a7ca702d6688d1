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
    """The loss ``training_step`` returns (what is backpropagated: for SFT the mean token loss plus the
    tuner's regularization) at each of ``steps`` optimizer steps of a real Lightning fit: fp32 on CPU,
    the objective's optimizer at the tuner's lr, its lr schedule, ``after_optimizer_step`` (AdaLoRA's
    allocation), the data module's training order; no validation. ``after_setup(objective)`` runs once
    the model is built and the optimizer made, before the first step."""
    import torch

    from helpers import LossRecorder, cpu_trainer

    class SetupThenRecord(LossRecorder):
        def on_train_start(self, trainer, pl_module):
            if after_setup is not None:
                after_setup(pl_module)

    recorder = SetupThenRecord()
    torch.manual_seed(seed)
    cpu_trainer(steps, [recorder]).fit(objective, datamodule=dm)
    losses = recorder.losses
    assert len(losses) == steps, f"{len(losses)} training steps ran, not {steps}"
    return losses
