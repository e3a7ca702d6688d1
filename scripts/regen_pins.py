"""Regenerate the pinned numbers of the tests: ``python scripts/regen_pins.py [NAME ...]``.

Finds every ``tests/test_*.py`` that defines ``PIN_NAME`` and ``compute_pins()``, runs it (offline,
CPU, fp32, seeded) and writes ``tests/pins/<PIN_NAME>.json``. Run it only when a change to a method is
meant to change its numbers, and say so in the commit.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline")
ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
sys.path.insert(0, str(TESTS))


def main(names: list[str]) -> int:
    from ftbench.fileio import write_text_atomic

    written = 0
    for path in sorted(TESTS.glob("test_*.py")):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        name = getattr(module, "PIN_NAME", None)
        if name is None or not hasattr(module, "compute_pins") or (names and name not in names):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            pins = module.compute_pins(Path(tmp))
        write_text_atomic(TESTS / "pins" / f"{name}.json", json.dumps(pins, indent=2, sort_keys=True) + "\n")
        print(f"wrote tests/pins/{name}.json ({len(pins)} entries)")
        written += 1
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
