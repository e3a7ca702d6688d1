"""The one place that decides whether W&B logs online (torch-free; the CLI, the sweep runner and the
report all call it)."""

from __future__ import annotations

import os


def default_to_offline() -> None:
    """Without an API key, W&B logs offline (it never prompts or hangs); sync later with ``wandb sync``.
    An explicit ``WANDB_MODE`` is left alone."""
    if not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
        os.environ["WANDB_MODE"] = "offline"
