"""The builders the test modules share: a LoRA tuner, a CPU fp32 trainer, a loss recorder and the tiny
data modules. (Functions, not fixtures: a test calls them with its own settings. conftest.py holds the
fixtures; a module of plain functions is what pytest recommends importing, rather than conftest itself.)"""

from __future__ import annotations

from typing import Any, Optional

import lightning as L


def lora(r: int = 8, alpha: Optional[int] = None, target_modules: Any = "all-linear", **tuner_kw):
    """The Peft tuner with LoRA rank ``r`` (alpha ``2r`` unless given, peft's default dropout 0) on
    every linear layer but the head; ``tuner_kw`` go to the tuner (``lr=1e-3``, ...)."""
    from peft import LoraConfig

    from ftbench.tuners import Peft

    return Peft(peft_config=LoraConfig(r=r, lora_alpha=2 * r if alpha is None else alpha,
                                       target_modules=target_modules), **tuner_kw)


def cpu_trainer(max_steps: int, callbacks=(), **kw) -> L.Trainer:
    """A quiet fp32 CPU trainer: no logger, checkpoints, progress bar, summary or sanity check; no
    validation unless ``limit_val_batches`` says otherwise."""
    kw = {"limit_val_batches": 0, **kw}
    return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, precision="32-true", logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, callbacks=list(callbacks), **kw)


class LossRecorder(L.Callback):
    """The loss each training step returned (what is backpropagated), in order."""

    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def instruction_data(backbone, setup: bool = False, **kw):
    """The built-in instruction task, 64 rows split 80/10/10 (seed 0), batches of 4 of at most 96 tokens."""
    from ftbench.data import InstructionData

    kw = {"source": "builtin:instruction", "builtin_size": 64, "batch_size": 4, "max_length": 96,
          "val_fraction": 0.1, "test_fraction": 0.1, "seed": 0, **kw}
    dm = InstructionData(backbone=backbone, **kw)
    if setup:
        dm.setup("fit")
    return dm


def tiny_data(backbone, batch_size: int = 4):
    """80 built-in instruction rows, set up: the data of the pinned four-step tuner losses."""
    return instruction_data(backbone, setup=True, builtin_size=80, batch_size=batch_size, eval_batch_size=4)


def preference_data(backbone, **kw):
    """The built-in capitals pairs, 64 split 75/12.5/12.5 (seed 0), batches of 4 of at most 96 tokens."""
    from ftbench.data.preference import PreferenceData

    kw = {"source": "builtin:capitals", "builtin_size": 64, "batch_size": 4, "max_length": 96,
          "val_fraction": 0.125, "test_fraction": 0.125, "seed": 0, **kw}
    return PreferenceData(backbone=backbone, **kw)
