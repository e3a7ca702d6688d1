"""How a sweep starts a run's process: this interpreter, this ftbench package first on the path."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def with_this_package(env: "dict[str, str] | os._Environ[str]") -> dict[str, str]:
    """``env`` with the folder of the ftbench this process runs first on ``PYTHONPATH``: a sweep's
    children import the same package, not an ``ftbench`` folder in the working directory."""
    root = str(Path(__file__).resolve().parents[2])
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**env, "PYTHONPATH": os.pathsep.join(dict.fromkeys([root, *paths]))}


def python_command(python: str = sys.executable) -> list[str]:
    """``python -m`` without the working directory at the front of the path (``-P``, Python 3.11+):
    ``-m`` would otherwise put it before ``PYTHONPATH``."""
    return [python, *(["-P"] if sys.version_info >= (3, 11) else []), "-m"]
