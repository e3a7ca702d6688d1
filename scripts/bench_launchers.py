"""The wall time of one sweep under each launcher: ``nice python scripts/bench_launchers.py``.

Runs the same 3 points (LoRA SFT at 3 learning rates on a tiny random Llama, CPU, offline) as
``ftbench sweep`` with the default launcher (one run after another) and with ``--launcher ray`` (a
local Ray instance with ``--ray-cpus`` CPUs, each run a 1-CPU task: as many at once as there are
CPUs), each a fresh command in its own results folder, and prints each command's wall time (Ray's
includes starting and stopping the local instance, timed on its own too), the CPUs, the load
average, and whether the two launchers' records agree (ids, statuses, losses).

    nice python scripts/bench_launchers.py --steps 10 --ray-cpus 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline",
                  PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))

TRAINER = """accelerator: cpu
devices: 1
val_check_interval: 1.0
limit_val_batches: 1
num_sanity_val_steps: 0
enable_checkpointing: false
logger: false
"""
RAY_START = ("import logging, ray; ray.init(num_cpus={cpus}, include_dashboard=False, log_to_driver=False, "
             "logging_level=logging.WARNING); ray.shutdown()")


def timed(cmd: list[str]) -> float:
    t0 = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    return time.monotonic() - t0


def losses(out: Path) -> dict[str, tuple]:
    """run id -> (status, the logged train/val losses in order)."""
    found = {}
    for p in out.glob("*.json"):
        if p.name == "sweep.json":
            continue
        info = json.loads(p.read_text())["train_info"]
        found[p.stem] = (info["status"], [m.get(k) for m in info.get("metrics", []) for k in ("train/loss", "val/loss") if k in m])
    return found


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="trainer.max_steps of each run")
    p.add_argument("--ray-cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray instance")
    args = p.parse_args()
    from ftbench.testing import build_tiny_llama

    with tempfile.TemporaryDirectory(prefix="ftbench-launchers-") as tmp:
        tmp = Path(tmp)
        model = build_tiny_llama(tmp / "tiny")
        (tmp / "trainer.yaml").write_text(TRAINER)
        (tmp / "sweep.yaml").write_text(
            f"name: launchers\nbase:\n  backbone.model: {model}\n"
            f"  objective: {ROOT / 'configs' / 'objective' / 'sft.yaml'}\n"
            f"  data: {ROOT / 'configs' / 'data' / 'instruction.yaml'}\n  data.init_args.builtin_size: 200\n"
            f"  data.init_args.max_length: 64\n  trainer: trainer.yaml\n  trainer.max_steps: {args.steps}\n"
            f"  test_after_fit: false\n  tuner: {ROOT / 'configs' / 'tuner' / 'lora.yaml'}\n"
            f"grid:\n  lr: [1.0e-4, 3.0e-4, 1.0e-3]\n")
        sweep = [sys.executable, "-m", "ftbench.cli", "sweep", str(tmp / "sweep.yaml")]
        load = os.getloadavg()[0]
        ray_start = timed([sys.executable, "-c", RAY_START.format(cpus=args.ray_cpus)])
        local = timed(sweep + ["--out", str(tmp / "local")])
        on_ray = timed(sweep + ["--out", str(tmp / "ray"), "--launcher", "ray", "--ray-cpus", str(args.ray_cpus)])
        same = losses(tmp / "local") == losses(tmp / "ray")
        print(f"3 points (sft+lora, tiny Llama, max_steps {args.steps}, CPU); machine: {os.cpu_count()} CPUs, "
              f"load average {load:.1f} before / {os.getloadavg()[0]:.1f} after")
        print(f"  launcher local (sequential)            {local:6.1f} s")
        print(f"  launcher ray   ({args.ray_cpus} CPUs, 1 per task)     {on_ray:6.1f} s   "
              f"(of which starting + stopping Ray alone: {ray_start:.1f} s)")
        print(f"  ray / local: {on_ray / local:.2f};  records agree (ids, statuses, losses): {same}")
        return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
