"""Pinned numbers live in ``tests/pins/<name>.json`` and are regenerated only by
``python scripts/regen_pins.py`` (never edited by hand). A test module that pins numbers defines
``PIN_NAME`` and ``compute_pins() -> dict``; its tests compare against ``load_pins(PIN_NAME)``."""

from __future__ import annotations

import json
from pathlib import Path

PIN_DIR = Path(__file__).parent / "pins"


def load_pins(name: str) -> dict:
    path = PIN_DIR / f"{name}.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `python scripts/regen_pins.py {name}`")
    return json.loads(path.read_text())
