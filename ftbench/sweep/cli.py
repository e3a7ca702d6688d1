"""``ftbench sweep SWEEP.yaml`` and ``ftbench report RESULTS_DIR``."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from ftbench.fileio import write_text_atomic
from ftbench.sweep.grid import RunSpec, Sweep, SweepError, load_sweep
from ftbench.sweep.report import report

DONE = "completed"
FAILED = ("failed", "nan", "oom")


def record_status(path: Path) -> Optional[str]:
    try:
        return json.loads(path.read_text())["train_info"]["status"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _mark_failed(path: Path, spec: RunSpec, returncode: int, log: Path) -> None:
    """A run that died without saying why (killed, crashed in start-up) is recorded as failed."""
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        rec = {"schema": 1, "run_info": {"run_id": spec.run_id, "subcommand": spec.subcommand,
                                         "argv": spec.argv("")}, "train_info": {"final": {}}, "meta_info": {}}
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    rec["train_info"]["status"] = "failed"
    rec["train_info"].setdefault("error", {"type": "ExitCode", "message": f"process exited with {returncode}", "log_tail": tail})
    write_text_atomic(path, json.dumps(rec, indent=2))


def run_sweep(sweep: Sweep, retry_failed: bool = False, dry_run: bool = False) -> int:
    out = Path(sweep.out)
    todo = []
    for spec in sweep.runs:
        status = record_status(out / f"{spec.run_id}.json")
        if status == DONE or (status in FAILED and not retry_failed):
            state = "done" if status == DONE else f"{status} (skip; --retry-failed reruns it)"
        else:
            state = "to run" if status is None else f"rerun ({status})"
            todo.append(spec)
        print(f"  {spec.run_id:32s} {spec.subcommand:5s} {state}")
    if dry_run:
        print(f"{len(todo)} of {len(sweep.runs)} runs to do")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    t_sweep = time.perf_counter()
    for i, spec in enumerate(todo, 1):
        log = out / f"{spec.run_id}.log"
        cmd = [sys.executable, "-m", "ftbench.cli", *spec.argv(str(out))]
        print(f"[{i}/{len(todo)}] {spec.run_id}: ftbench {' '.join(cmd[3:])}", flush=True)
        t0 = time.perf_counter()
        with log.open("w") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        path = out / f"{spec.run_id}.json"
        if proc.returncode != 0 and record_status(path) not in FAILED:
            _mark_failed(path, spec, proc.returncode, log)
        print(f"      {record_status(path)} in {time.perf_counter() - t0:.0f} s (log: {log})", flush=True)
    print(f"sweep {sweep.name}: {len(todo)} runs in {time.perf_counter() - t_sweep:.0f} s\n")
    print(report(out))
    failed = [s.run_id for s in sweep.runs if record_status(out / f"{s.run_id}.json") != DONE]
    if failed:
        print(f"\n{len(failed)} run(s) did not complete: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ftbench")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("sweep", help="run every point of a sweep file, each in its own process")
    p.add_argument("sweep_file")
    p.add_argument("--out", help="results directory (default: the sweep file's 'out')")
    p.add_argument("--retry-failed", action="store_true", help="rerun runs recorded as failed")
    p.add_argument("--dry-run", action="store_true", help="list the runs and which are done")
    r = sub.add_parser("report", help="tables from the run records in a directory")
    r.add_argument("results_dir")
    args = parser.parse_args(argv)
    if args.command == "report":
        print(report(args.results_dir))
        return 0
    try:
        sweep = load_sweep(args.sweep_file, args.out)
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return run_sweep(sweep, args.retry_failed, args.dry_run)
