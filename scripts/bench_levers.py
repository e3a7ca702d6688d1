"""The speed-levers table on the embedded model: trained tokens/s and predicted peak per lever against the
plain float32 run of the same method, measured side by side.

    nice python scripts/bench_levers.py [--rounds 2] [--steps 10] [--levers fp32 bf16-mixed bf16-true compile packing]
                                       [--tuners lora full] [--out /tmp/bench_levers]

Each round runs every (tuner, lever) once, in turn, as ``ftbench fit`` (its own process: one lever's
compile caches or allocator state never reach another), so a change in the machine's load hits every
lever of a round alike; the ratio is taken within a round and the median over rounds is printed. Runs are
short (``--steps`` optimizer steps of 8 rows, the quickstart's data and settings, no validation or test);
their first 2 batches and every batch in which torch compiled are left out of tokens/s (the compile
seconds are printed apart). The predicted peak is the run's own memory breakdown (measured from tensors).
Each record says whether its speed was contended (throughput.contended): the table marks those with †.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LEVERS = {
    "fp32": [],
    "bf16-mixed": ["--trainer.precision", "bf16-mixed"],
    "bf16-true": ["--trainer.precision", "bf16-true"],
    "compile": ["--backbone.compile", "true"],
    "compile-aot_eager": ["--backbone.compile", "true", "--backbone.compile_backend", "aot_eager"],
    "packing": ["--data.init_args.packing", "true"],
}


def fit(tuner: str, lever: str, steps: int, out: Path) -> dict:
    argv = [sys.executable, "-m", "ftbench.cli", "fit", "--backbone", "configs/backbone/embedded.yaml",
            "--tuner", f"configs/tuner/{tuner}.yaml", "--model", "configs/objective/sft.yaml",
            "--data", "configs/data/instruction.yaml", "--trainer", "configs/trainer/quickstart.yaml",
            "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--test_after_fit", "false", "--out", str(out),
            *LEVERS[lever]]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    line = next(x for x in reversed(done.stdout.splitlines()) if x.startswith("[ftbench]"))
    run_id = line.split()[1].rstrip(":")
    info = json.loads((out / f"{run_id}.json").read_text())["train_info"]
    tp = info["throughput"]
    return {"tokens_per_s": tp["trained_tokens_per_s"], "peak_mb": info["memory_breakdown"]["predicted_peak_bytes"] / 2**20,
            "compile_s": tp.get("compile_seconds"), "contended": tp.get("contended"), "kernels": info.get("kernels")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--levers", nargs="+", default=["fp32", "bf16-mixed", "bf16-true", "compile"], choices=list(LEVERS))
    ap.add_argument("--tuners", nargs="+", default=["lora", "full"])
    ap.add_argument("--out", default="/tmp/bench_levers")
    args = ap.parse_args()
    results: dict[tuple[str, str], list[dict]] = {}
    for r in range(args.rounds):
        for tuner in args.tuners:
            for lever in args.levers:
                res = fit(tuner, lever, args.steps, Path(args.out) / f"round{r}")
                results.setdefault((tuner, lever), []).append(res)
                print(f"round {r} {tuner:5s} {lever:18s} {json.dumps({k: v for k, v in res.items() if k != 'kernels'})}",
                      flush=True)
    kernels = next((x["kernels"] for rs in results.values() for x in rs if x.get("kernels")), None)
    print(f"\nkernels: {json.dumps(kernels)}")
    print(f"embedded SmolLM2-135M, SFT, {args.steps} steps x 8 rows, {args.rounds} round(s); ratio = median over rounds "
          "of the lever's / fp32's within a round; † = a run of it was contended")
    print("| method | lever | trained tok/s | speed vs fp32 | predicted peak (MiB) | peak vs fp32 | compile s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for tuner in args.tuners:
        plain = results.get((tuner, "fp32"), [])
        for lever in args.levers:
            runs = results[(tuner, lever)]
            ok = [(x, p) for x, p in zip(runs, plain) if "error" not in x and "error" not in p]
            if not ok:
                print(f"| sft+{tuner} | {lever} | {runs[0].get('error', 'failed')} | | | | |")
                continue
            speed = statistics.median(x["tokens_per_s"] for x, _ in ok)
            rel = statistics.median(x["tokens_per_s"] / p["tokens_per_s"] for x, p in ok)
            peak = statistics.median(x["peak_mb"] for x, _ in ok)
            prel = statistics.median(x["peak_mb"] / p["peak_mb"] for x, p in ok)
            comp = statistics.median(x["compile_s"] or 0.0 for x, _ in ok)
            mark = "†" if any(x.get("contended") for x, _ in ok) else ""
            print(f"| sft+{tuner} | {lever} | {speed:,.0f}{mark} | {rel:.2f}x | {peak:,.0f} | {prel:.2f}x | {comp:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
