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
#: W&B's own bounds on each call, in seconds (its settings, read from these variables; a value the
#: user set wins): ``wandb.init`` (default 90), the wait for its service process (30), each HTTP call
#: of its API, and ``finish``'s upload (default: no bound). Past them W&B gives up; ftbench then
#: logs offline (:func:`start_or_offline`) and the run's record is written either way.
WANDB_BOUNDS = {"WANDB_INIT_TIMEOUT": "30", "WANDB__SERVICE_WAIT": "30", "WANDB_HTTP_TIMEOUT": "10",
                "WANDB_FINISH_TIMEOUT": "60"}


def bound_wandb_calls(env: Optional[MutableMapping[str, str]] = None) -> None:
    """Set :data:`WANDB_BOUNDS` in ``env`` (default: this process's) where the user has not."""
    env = os.environ if env is None else env
    for key, value in WANDB_BOUNDS.items():
        env.setdefault(key, value)


def reachable(url: str, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """Whether ``url`` answers an HTTP request (any status) within ``timeout`` seconds: a server that
    accepts the connection and then says nothing is not reachable (a TCP connect alone would be)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return True
    except urllib.error.HTTPError:  # it answered (401, 404, ...): the server is there
        return True
    except (OSError, ValueError):  # refused, timed out, no such host, a malformed URL
        return False


def offline_unless_reachable(env: Optional[MutableMapping[str, str]] = None) -> None:
    """Before a run that logs to W&B: offline without a key (:func:`default_to_offline`), and also
    when a key is set but W&B's server (``WANDB_BASE_URL``, default https://api.wandb.ai) does not
    answer within :data:`CONNECT_TIMEOUT_S` — said in one line; the run and its record go on."""
    import sys

    env = os.environ if env is None else env
    default_to_offline(env)
    bound_wandb_calls(env)
    if env.get("WANDB_MODE", "online") not in ("online", "run"):
        return
    base = env.get("WANDB_BASE_URL", "https://api.wandb.ai")
    if not reachable(base):
        env["WANDB_MODE"] = "offline"
        print(f"ftbench: warning: W&B server {base} did not answer within {CONNECT_TIMEOUT_S:.0f} s: logging offline "
              "(upload later with `wandb sync wandb/offline-run-*`)", file=sys.stderr)


def start_or_offline(trainer) -> None:
    """Start the trainer's W&B run now (``wandb.init``, bounded by ``WANDB_INIT_TIMEOUT``); if W&B
    fails or times out, start it offline instead with one warning line, and if even that fails, go on
    without W&B: a run never fails, or ends without its record, because of W&B."""
    import sys

    from lightning.pytorch.loggers import WandbLogger

    for logger in list(trainer.loggers):
        if not isinstance(logger, WandbLogger):
            continue
        try:
            logger.experiment
            continue
        except Exception as err:  # CommError, a timeout, an unexpected answer
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        os.environ["WANDB_MODE"] = "offline"
        logger._wandb_init["mode"] = "offline"
        logger._experiment = None
        try:
            logger.experiment
            print(f"ftbench: warning: W&B did not start ({reason}): logging offline (upload later with "
                  "`wandb sync wandb/offline-run-*`)", file=sys.stderr)
        except Exception as err:
            trainer.loggers = [x for x in trainer.loggers if x is not logger]
            print(f"ftbench: warning: W&B did not start ({reason}; offline: {type(err).__name__}): the run goes on "
                  "without W&B", file=sys.stderr)
