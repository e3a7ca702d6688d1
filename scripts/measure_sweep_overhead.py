"""How much a sweep's one-process-per-run costs: ``python scripts/measure_sweep_overhead.py``.

Runs a few points through the sweep runner (each in its own ``python -m ftbench.cli`` process, as
``ftbench sweep`` does) and prints, per run, the process's wall time, the time the record spent in
fit and test, and the rest: start-up (interpreter, torch/lightning/transformers imports, config
parsing, model and data loading) plus shut-down. Offline, CPU; a tiny random Llama unless
``--model`` names a backbone (e.g. ``embedded``).

    python scripts/measure_sweep_overhead.py --steps 2 20 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline")

TRAINER = """accelerator: cpu
devices: 1
val_check_interval: 1.0
limit_val_batches: 1
num_sanity_val_steps: 0
enable_checkpointing: false
logger: false
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="backbone (default: a tiny random Llama built here)")
    p.add_argument("--method", default=str(ROOT / "configs" / "method" / "lora.yaml"))
    p.add_argument("--steps", type=int, nargs="+", default=[2, 20], help="max_steps values to time")
    p.add_argument("--repeats", type=int, default=2, help="seeds per max_steps value")
    args = p.parse_args()

    from ftbench.sweep.cli import Progress, run_one
    from ftbench.sweep.grid import load_sweep

    with tempfile.TemporaryDirectory(prefix="ftbench-overhead-") as tmp:
        tmp = Path(tmp)
        model = args.model
        if model is None:
            from ftbench.testing import build_tiny_llama

            model = str(build_tiny_llama(tmp / "tiny"))
        (tmp / "trainer.yaml").write_text(TRAINER)
        (tmp / "sweep.yaml").write_text(
            f"name: overhead\nout: {tmp / 'out'}\nbase:\n  backbone.model: {model}\n"
            f"  data: {ROOT / 'configs' / 'data' / 'instruction.yaml'}\n  data.init_args.builtin_size: 400\n"
            f"  data.init_args.max_length: 128\n  trainer: trainer.yaml\n  test_after_fit: false\n"
            f"grid:\n  method: [{args.method}]\n  trainer.max_steps: {args.steps}\n  seed: {list(range(1, args.repeats + 1))}\n")
        sweep = load_sweep(tmp / "sweep.yaml")
        (tmp / "out").mkdir()
        rows = []
        with Progress(len(sweep.runs), live=False) as progress:
            for i, spec in enumerate(sweep.runs, 1):
                t0 = time.monotonic()
                status = run_one(sweep, spec, i, progress)
                wall = time.monotonic() - t0
                info = json.loads((tmp / "out" / f"{spec.run_id}.json").read_text())["train_info"]
                inside = (info.get("fit_seconds") or 0) + (info.get("test_seconds") or 0)
                rows.append((spec.overrides["trainer.max_steps"], status, wall, inside, wall - inside,
                             (info.get("throughput") or {}).get("step_time_median_s")))
    print(f"\n{'max_steps':>9} {'status':>10} {'wall s':>8} {'fit+test s':>10} {'overhead s':>10} {'overhead %':>10} {'step s':>7}")
    for steps, status, wall, inside, over, step in rows:
        print(f"{steps:>9} {status:>10} {wall:8.2f} {inside:10.2f} {over:10.2f} {100 * over / wall:9.0f}% "
              f"{step if step is None else round(step, 3)!s:>7}")
    overheads = [r[4] for r in rows]
    print(f"\nper-run overhead (process start to fit start, plus shut-down): mean {sum(overheads) / len(overheads):.2f} s "
          f"(min {min(overheads):.2f}, max {max(overheads):.2f}) on {os.cpu_count()} CPU cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
