"""A search against the equivalent grid: runs needed to reach the same best validation loss, per method.

    nice python scripts/bench_search.py                       # embedded SmolLM2-135M, 20 steps a run
    nice python scripts/bench_search.py --steps 30 --trials 8 --out results/bench_search
    nice python scripts/bench_search.py --model tiny --steps 30   # the tests' tiny random Llama

Two sweeps on one base (the embedded backbone, the built-in instruction task, the quickstart trainer
with ``--steps`` steps, validation on the first 40 validation rows at the end, no test):

* the grid: full fine-tuning over ``--full-lr`` and LoRA over ``--lora-lr`` x ``--lora-r``;
* the search: the same methods over the continuous hull of those values (log-uniform lr between the
  grid's extremes, r a choice among the grid's ranks), TPE seeded 0, ``--trials`` trials each.

Per method it prints the grid's best final val/loss (the grid runs all its points to know it), and
the trial after which the search's running best first reaches it (or the search's best, if it does not
within its trials). Every run is an ordinary ``ftbench sweep`` run in ``--out`` (records and logs kept:
a second invocation resumes and reruns nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BASE = """\
base:
  {backbone}
  objective: {root}/configs/objective/sft.yaml
  data: {root}/configs/data/instruction.yaml
  trainer: {root}/configs/trainer/quickstart.yaml
  trainer.max_steps: {steps}
  trainer.val_check_interval: {steps}
  test_after_fit: false
  evaluate.generate_in_validation: false
"""


def sweep_files(out: Path, args) -> tuple[Path, Path]:
    backbone = f"backbone.model: {args.model}" if args.model else f"backbone: {ROOT}/configs/backbone/embedded.yaml"
    base = BASE.format(root=ROOT, steps=args.steps, backbone=backbone)
    full, lora = ROOT / "configs/tuner/full.yaml", ROOT / "configs/tuner/lora.yaml"
    grid = (f"name: bench_grid\nout: {out / 'grid'}\n{base}grid:\n"
            f"  - tuner: {full}\n    lr: {json.dumps(args.full_lr)}\n"
            f"  - tuner: {lora}\n    lr: {json.dumps(args.lora_lr)}\n"
            f"    tuner.init_args.peft_config.init_args.r: {json.dumps(args.lora_r)}\n")
    search = (f"name: bench_search\nout: {out / 'search'}\n{base}grid:\n  tuner: [{full}, {lora}]\n"
              f"search:\n  trials: {args.trials}\n  metric: val/loss\n  sampler: tpe\n  seed: 0\n  space:\n"
              f"    - when: {{tuner: {full}}}\n"
              f"      space: {{lr: {{log_uniform: [{min(args.full_lr)}, {max(args.full_lr)}]}}}}\n"
              f"    - when: {{tuner: {lora}}}\n"
              f"      space:\n        lr: {{log_uniform: [{min(args.lora_lr)}, {max(args.lora_lr)}]}}\n"
              f"        tuner.init_args.peft_config.init_args.r: {{choice: {json.dumps(args.lora_r)}}}\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / "grid.yaml").write_text(grid)
    (out / "search.yaml").write_text(search)
    return out / "grid.yaml", out / "search.yaml"


def records(folder: Path) -> list[dict]:
    out = []
    for p in sorted(folder.glob("*.json")):
        rec = json.loads(p.read_text())
        if isinstance(rec, dict) and "train_info" in rec and rec["train_info"].get("status") == "completed":
            out.append(rec)
    return out


def values_of(rec: dict) -> dict:
    """The searched settings of a run, from its record's settings (lr; LoRA's r where set)."""
    tuner = (rec["run_info"].get("settings") or {}).get("tuner") or {}
    args = tuner.get("init_args") or {}
    r = ((args.get("peft_config") or {}).get("init_args") or {}).get("r")
    return {"lr": args.get("lr"), **({"r": r} if r is not None else {})}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/bench_search")
    p.add_argument("--model", help="a backbone folder instead of the embedded SmolLM2-135M; 'tiny' builds the tests' "
                                   "2-layer random Llama in --out (for a loaded CPU)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--trials", type=int, default=6, help="search trials per method")
    p.add_argument("--full-lr", type=float, nargs="+", default=[1e-5, 1e-4, 1e-3])
    p.add_argument("--lora-lr", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2])
    p.add_argument("--lora-r", type=int, nargs="+", default=[4, 16])
    args = p.parse_args()
    out = Path(args.out).resolve()
    if args.model == "tiny":
        sys.path.insert(0, str(ROOT))
        from ftbench.testing import build_tiny_llama

        args.model = str(out / "tiny-llama") if (out / "tiny-llama").is_dir() else str(build_tiny_llama(out / "tiny-llama"))
    grid_file, search_file = sweep_files(out, args)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    seconds = {}
    for name, f in (("grid", grid_file), ("search", search_file)):
        t0 = time.monotonic()
        res = subprocess.run([sys.executable, "-m", "ftbench.cli", "sweep", str(f)], env=env, capture_output=True,
                             text=True)
        seconds[name] = time.monotonic() - t0
        (out / f"{name}.stdout.txt").write_text(res.stdout + res.stderr)
        if res.returncode != 0:
            print(f"{name} sweep exited {res.returncode}: see {out / (name + '.stdout.txt')}", file=sys.stderr)
    rows = []
    for method in ("sft+full", "sft+lora"):
        grid = [r for r in records(out / "grid") if r["train_info"]["method"] == method]
        trials = sorted((r for r in records(out / "search") if r["train_info"]["method"] == method),
                        key=lambda r: r["run_info"]["search"]["trial"])
        grid_best = min(r["train_info"]["final"]["val/loss"] for r in grid)
        running, reached = float("inf"), None
        for k, r in enumerate(trials, 1):
            running = min(running, r["train_info"]["final"]["val/loss"])
            if reached is None and running <= grid_best:
                reached = k
        best_grid_point = values_of(min(grid, key=lambda r: r["train_info"]["final"]["val/loss"]))
        best_trial = min(trials, key=lambda r: r["train_info"]["final"]["val/loss"])["run_info"]["search"]["params"]
        rows.append({"method": method, "grid_runs": len(grid), "grid_best": grid_best, "grid_best_point": best_grid_point,
                     "search_trials": len(trials), "search_best": running, "search_best_values": best_trial,
                     "search_runs_to_grid_best": reached})
    model = args.model or "embedded SmolLM2-135M"
    print(f"search vs grid, {model}, {args.steps} steps a run (val/loss at the end; lower is better)")
    print("| method | grid runs | grid best val/loss | search trials | search best val/loss | search runs to reach the grid's best |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        reach = r["search_runs_to_grid_best"] if r["search_runs_to_grid_best"] is not None else f"not in {r['search_trials']}"
        print(f"| {r['method']} | {r['grid_runs']} | {r['grid_best']:.4f} ({r['grid_best_point']}) | {r['search_trials']} | "
              f"{r['search_best']:.4f} ({r['search_best_values']}) | {reach} |")
    print(f"wall: grid {seconds['grid']:.0f} s, search {seconds['search']:.0f} s")
    (out / "summary.json").write_text(json.dumps({"args": vars(args), "rows": rows, "seconds": seconds}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
