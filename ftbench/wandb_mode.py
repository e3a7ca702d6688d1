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


#: seconds to wait for W&B's server before logging offline instead (wandb.init waits ~100 s and then
#: fails the run with a CommError when a key is set but there is no network)
CONNECT_TIMEOUT_S = 3.0


def reachable(url: str, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``url``'s host and port opens within ``timeout`` seconds."""
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def offline_unless_reachable(env: Optional[MutableMapping[str, str]] = None) -> None:
    """Before a run that logs to W&B: offline without a key (:func:`default_to_offline`), and also
    when a key is set but W&B's server (``WANDB_BASE_URL``, default https://api.wandb.ai) does not
    answer within :data:`CONNECT_TIMEOUT_S` — said in one line; the run and its record go on."""
    import sys

    env = os.environ if env is None else env
    default_to_offline(env)
    if env.get("WANDB_MODE", "online") not in ("online", "run"):
        return
    base = env.get("WANDB_BASE_URL", "https://api.wandb.ai")
    if not reachable(base):
        env["WANDB_MODE"] = "offline"
        print(f"ftbench: warning: W&B server {base} did not answer within {CONNECT_TIMEOUT_S:.0f} s: logging offline "
              "(upload later with `wandb sync wandb/offline-run-*`)", file=sys.stderr)
