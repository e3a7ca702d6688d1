"""The side channel from a run to the sweep that started it: where the run is, for the live view.

``ftbench sweep`` sets ``FTBENCH_PROGRESS_FILE`` for each run; the CLI then adds
:class:`ProgressFile`, which rewrites that small JSON file (atomically, at most once a second) with
the global step, ``max_steps``, the last training loss and the phase; the sweep reads it back with
:class:`ftbench.sweep.runs.RunProgress` (which imports nothing of Lightning: the sweep's own process
stays torch-free). It does not depend on which progress bar (tqdm, rich, none) the run shows (the
sweep reads nothing of the run's log), and nothing of it reaches the record.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L

from ftbench.fileio import write_text_atomic

ENV = "FTBENCH_PROGRESS_FILE"


class ProgressFile(L.Callback):
    """Writes ``{"phase", "step", "max_steps", "loss", "time"}`` to ``path`` (rank 0 only)."""

    def __init__(self, path: str | Path, every_s: float = 1.0):
        self.path = Path(path)
        self.every_s = every_s
        self._last = 0.0
        self.state: dict[str, Any] = {"phase": "starting", "step": 0, "max_steps": None, "loss": None}

    def _write(self, trainer: L.Trainer, force: bool = False, **update: Any) -> None:
        self.state.update(update)
        now = time.monotonic()
        if not trainer.is_global_zero or (not force and now - self._last < self.every_s):
            return
        self._last = now
        try:
            write_text_atomic(self.path, json.dumps({**self.state, "time": time.time()}))
        except OSError:
            pass  # the live view is a convenience; it never stops a run

    @staticmethod
    def _loss(trainer: L.Trainer) -> Optional[float]:
        v = trainer.callback_metrics.get("train/loss")
        try:
            return float(v) if v is not None else None
        except (TypeError, ValueError):
            return None

    def on_fit_start(self, trainer, pl_module):
        max_steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        if max_steps is None:
            try:
                max_steps = int(trainer.estimated_stepping_batches)
            except Exception:
                max_steps = None
        self._write(trainer, force=True, phase="train", max_steps=max_steps)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._write(trainer, phase="train", step=trainer.global_step, loss=self._loss(trainer))

    def on_validation_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._write(trainer, force=True, phase="validate", step=trainer.global_step)

    def on_validation_end(self, trainer, pl_module):
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._write(trainer, force=True, phase="train")

    def on_test_start(self, trainer, pl_module):
        self._write(trainer, force=True, phase="test")

    def on_fit_end(self, trainer, pl_module):
        self._write(trainer, force=True, phase="fit done", step=trainer.global_step, loss=self._loss(trainer))

