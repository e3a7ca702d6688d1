"""The one place that decides whether W&B logs online (torch-free; the CLI, the sweep runner and the
report all call it)."""

from __future__ import annotations

import os
from typing import MutableMapping, Optional


def default_to_offline(env: Optional[MutableMapping[str, str]] = None) -> None:
    """Without an API key, W&B logs offline (it never prompts or hangs); sync later with ``wandb sync``.
    An explicit ``WANDB_MODE`` is left alone. ``env``: the environment to decide in (default: this
    process's; the sweep runner passes a child's)."""
    env = os.environ if env is None else env
    if not env.get("WANDB_API_KEY") and "WANDB_MODE" not in env:
        env["WANDB_MODE"] = "offline"
