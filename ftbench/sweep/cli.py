"""``ftbench sweep SWEEP.yaml`` and ``ftbench report RESULTS_DIR``.

The sweep starts every point as its own run process (:mod:`ftbench.sweep.runs`, where the record
status rules are) and decides from the run's record what to do on a second invocation. Where the
processes run is the launcher's choice (:mod:`ftbench.sweep.launchers`: one after another here, the
default, or as Ray tasks with ``--launcher ray``); the process, its record and these rules are the
same either way.

The parent reads every point with the run's own parser (:func:`ftbench.runcli.read_run`), which
imports torch and lightning; the runs' memory is their own processes'.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ftbench.fileio import write_text_atomic
from ftbench.sweep.grid import (RunSpec, Sweep, SweepError, load_sweep, parse_overrides, parse_shard, shard,
                                point_text, short_value, weights_dir)
from ftbench.sweep.runs import DONE, Progress, decide, read_record, record_status

if TYPE_CHECKING:
    from ftbench.sweep.launchers import Launcher

MANIFEST = "sweep.json"


def plan(sweep: Sweep, runs: list[RunSpec], retry_failed: bool) -> list[tuple[RunSpec, Optional[str], bool, str]]:
    """(run, its record's status, run it?, what to say), in the sweep's order (stages after their
    upstream runs). A completed run whose saved weights a stage still to run needs, but which are
    missing (it ran before it was a pipeline stage), runs again, replacing its record."""
    out = Path(sweep.out)
    rows = []
    for spec in runs:
        status = record_status(out / f"{spec.run_id}.json")
        todo, say = decide(status, retry_failed)
        rows.append((spec, status, todo, say))
    needed = {id(u) for spec, _, todo, _ in rows if todo for u in spec.upstream.values()}
    for i, (spec, status, todo, say) in enumerate(rows):
        if status == DONE and id(spec) in needed and not Path(weights_dir(sweep.out, spec.run_id)).is_dir():
            spec.overrides["overwrite"] = True  # not part of its id
            rows[i] = (spec, status, True, "rerun (a later stage needs its weights)")
    return rows


def changed_sources(out: Path, done: list[RunSpec]) -> list[str]:
    """One warning per data file that changed since a completed run of this sweep read it (its record's
    ``train_info.data_fingerprints`` against the file now): runs still to do will read the new
    version, and the report refuses to group the two as one point."""
    from ftbench.data.fingerprint import path_fingerprint

    warned: dict[str, str] = {}
    for spec in done:
        info = (read_record(out / f"{spec.run_id}.json") or {}).get("train_info") or {}
        prints = info.get("data_fingerprints") if isinstance(info, dict) else None
        for source, then in (prints.items() if isinstance(prints, dict) else []):
            if source in warned or str(then).startswith("datasets:"):
                continue
            now = path_fingerprint(os.path.expanduser(source))
            if now is not None and now != then:
                warned[source] = (f"ftbench: warning: {source} changed since run {spec.run_id} read it ({then} -> {now}, "
                                  "bytes:sha256): the runs still to do read the new version, and the report will not "
                                  "group them with the completed ones")
    return list(warned.values())


def run_sweep(sweep: Sweep, retry_failed: bool = False, dry_run: bool = False,
              shard_of: Optional[tuple[int, int]] = None, reference: str = "full", live: Optional[bool] = None,
              run_index: Optional[int] = None, launcher: Optional[Launcher] = None,
              storage: Optional[str] = None) -> int:
    """Run the sweep's points that are not done (all, one shard, or the point ``run_index``) with
    ``launcher`` (:mod:`ftbench.sweep.launchers`; default: one after another here); 0 when every one
    of them completed, 1 otherwise (the runs that did not are named on stderr). With a ``search:``
    block, each grid point is a study whose trials the same launcher runs (:mod:`ftbench.sweep.search`;
    ``storage``: an Optuna database URL, default ``{out}/search.db``)."""
    from ftbench.sweep.launchers import LocalLauncher, RunStopped

    launcher = launcher or LocalLauncher()
    out = Path(sweep.out)
    runs = shard(sweep.runs, *shard_of) if shard_of else sweep.runs
    if run_index is not None:
        runs = [sweep.runs[run_index]]
    part = f" (shard {shard_of[0]}/{shard_of[1]}: {len(runs)} of {len(sweep.runs)} runs)" if shard_of else ""
    searched = [sp for sp in (sweep.search.points if sweep.search else []) if any(sp.point is r for r in runs)]
    if sweep.search:  # a search point runs as its study's trials, not as a run of its own
        runs = [r for r in runs if not any(sp.point is r for sp in sweep.search.points)]
        from ftbench.sweep.search import default_storage

        storage = storage or default_storage(out)
    rows = plan(sweep, runs, retry_failed)
    todo = [spec for spec, _, run, _ in rows if run]
    print(f"sweep {sweep.name}: {len(sweep.runs)} runs{part} -> {out}")
    problems = check_points(sweep, todo + [sp.point for sp in searched])
    if problems:
        print(f"error: {sweep.path}: {len(problems)} point(s) do not parse; nothing was run:\n" + "\n".join(problems),
              file=sys.stderr)
        return 2
    for spec, _, _, say in rows:
        point = ", ".join(f"{k.replace('.init_args', '')}={short_value(v)}" for k, v in spec.label.items())
        named = f"[{spec.name}] " if spec.name else ""
        after = f"  (after {', '.join(u.display_name for u in spec.upstream.values())})" if spec.upstream else ""
        print(f"  {spec.run_id:28s} {spec.subcommand:8s} {say:44s} {named}{point}{after}")
    if searched:
        from ftbench.sweep.search import study_lines

        print("\n".join(study_lines(sweep.search, sweep.name, storage, searched)))
    if dry_run:
        print(f"{len(todo)} of {len(runs)} runs to do" + (f", and {len(searched)} searched point(s)" if searched else ""))
        return 0
    from ftbench.runcli import check_out
    from ftbench.errors import OutputError

    try:
        check_out(sweep.out)
    except OutputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if todo:
        for line in changed_sources(out, [spec for spec, status, _, _ in rows if status == DONE]):
            print(line, file=sys.stderr)
    t_sweep = time.monotonic()
    trials: list[tuple[str, str]] = []
    try:
        write_text_atomic(out / MANIFEST, json.dumps(sweep.manifest(), indent=2, default=str))
        budget = sum(sweep.search.budget(sp) for sp in searched) if searched else 0
        with Progress(len(todo) + budget, live) as progress, launcher:
            launcher.run(sweep, todo, progress)
            if searched:  # each trial: a RunSpec handed to the same launcher as the points above
                from ftbench.sweep.search import run_search

                count = iter(range(len(todo) + 1, 10**9))
                trials = run_search(sweep.search, sweep.name, out, storage,
                                    lambda trial: launcher.run(sweep, [trial], progress, start=next(count))[trial.run_id],
                                    searched, retry_failed, progress.print)
    except KeyboardInterrupt:
        print("\ninterrupted: finished records are kept; run the same command again to resume.", file=sys.stderr)
        return 130
    except OSError as err:  # a full disk, a folder gone read-only: stop here, lose nothing completed
        # (the launcher recorded the run it was on as stopped by the sweep: RunStopped)
        at = f" at run {err.run_id}" if isinstance(err, RunStopped) else ""
        print(f"error: cannot write in {out} ({err.strerror or err}): the sweep stopped{at}; completed records are "
              "kept, and the same command resumes once it can write", file=sys.stderr)
        return 1
    print(f"sweep {sweep.name}: {len(todo) + len(trials)} run(s) in {time.monotonic() - t_sweep:.0f} s\n")
    try:
        from ftbench.sweep.report import report

        print(report(out, reference=reference))
    except Exception as err:  # the runs are done; a report problem must not hide their status
        print(f"report failed: {type(err).__name__}: {err}", file=sys.stderr)
    bad = [(s.run_id, record_status(out / f"{s.run_id}.json")) for s in runs]
    bad = [(r, st) for r, st in bad + trials if st not in (DONE, "pruned")]
    if bad:
        print(f"\n{len(bad)} run(s) did not complete: " + ", ".join(f"{r} ({st})" for r, st in bad), file=sys.stderr)
        return 1
    return 0


def check_points(sweep: Sweep, runs: list[RunSpec]) -> list[str]:
    """The points that parse but that the run's parser does not pass as complete (a required key
    missing: :attr:`RunSpec.problem`), one line each: index in the sweep, run id, what the point sets,
    and the parser's message."""
    index = {id(s): i for i, s in enumerate(sweep.runs)}
    problems = [(spec, spec.problem) for spec in runs]
    return [f"  point {index[id(spec)] + 1} ({spec.run_id}: {point_text(spec)}): {msg}"
            for spec, msg in problems if msg]


def wandb_sweep_config(sweep: Sweep, sweep_file: str, extra_args: list[str]) -> str:
    """A W&B Sweeps config whose agent calls ``ftbench sweep SWEEP.yaml --run_index=K``: each agent
    run is one point of this sweep, recorded in the same results directory as a local sweep."""
    import yaml

    lines = ["# W&B sweep over the points of " + sweep_file + ":",
             "#   wandb sweep THIS.yaml && wandb agent ENTITY/PROJECT/SWEEP_ID   (one agent per machine)"]
    for k, spec in enumerate(sweep.runs):
        lines.append(f"#   run_index {k}: {spec.run_id} ({spec.subcommand}) " +
                     point_text(spec))
    cfg = {
        "name": sweep.name,
        "program": "ftbench",
        "method": "grid",
        "metric": {"name": "val/loss", "goal": "minimize"},
        "parameters": {"run_index": {"values": list(range(len(sweep.runs)))}},
        "command": ["ftbench", "sweep", sweep_file, "--out", sweep.out, *extra_args, "${args}"],
    }
    return "\n".join(lines) + "\n" + yaml.safe_dump(cfg, sort_keys=False)


def main(argv: list[str]) -> int:
    if argv and argv[0] == "report":  # the report's own command line (it imports pandas; a sweep need not)
        from ftbench.sweep.report.cli import main as report_main

        return report_main(argv[1:])
    parser = argparse.ArgumentParser(prog="ftbench")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("sweep", help="run every point of a sweep file, each in its own process",
                       description="Run every point of a sweep file, each in its own process. Extra "
                                   "--dotted.key VALUE arguments apply to every run (and are part of its id).")
    p.add_argument("sweep_file")
    p.add_argument("--out", help="results directory (default: the sweep file's 'out')")
    p.add_argument("--retry-failed", action="store_true", help="rerun runs recorded as failed/nan/oom")
    p.add_argument("--dry-run", action="store_true", help="list the runs and which are done; run nothing")
    p.add_argument("--shard", metavar="I/N", help="run only part I of N (0 <= I < N) of the grid; 'auto' from a SLURM job array")
    p.add_argument("--run_index", "--run-index", type=int, dest="run_index",
                   help="run only the K-th point of the sweep (what a W&B agent passes)")
    p.add_argument("--reference", default="full", help="method the report compares memory/speed/accuracy with")
    p.add_argument("--launcher", choices=("local", "ray"), default="local",
                   help="who runs the points: local (one after another here) or ray (each a Ray task, as many "
                        "at once as the CPUs/GPUs allow; needs the extra ftbench[ray])")
    p.add_argument("--ray-address", metavar="ADDR",
                   help="join this Ray cluster (auto, ray://HOST:10001) instead of starting a local Ray instance; "
                        "--out must then be on storage every node shares")
    p.add_argument("--ray-cpus", type=int, metavar="N", help="CPUs of the local Ray instance (default: this machine's)")
    p.add_argument("--storage", metavar="URL", help="with a search: block, the Optuna database of its studies "
                   "(default: sqlite in --out); machines running the same command on one database share each study")
    p.add_argument("--wandb-sweep-config", action="store_true",
                   help="print a W&B Sweeps config (program/command) that runs this sweep's points, and exit")
    args, rest = parser.parse_known_args(argv[:1] + argv[1:])
    known = {o.lstrip("-").replace("_", "-") for a in p._actions for o in a.option_strings}
    for tok in rest:
        name = tok.split("=", 1)[0].lstrip("-").replace("_", "-")
        if tok.startswith("--") and name in known:
            print(f"error: {tok.split('=', 1)[0]} is spelled --{name} (extra --key VALUE arguments are config settings)", file=sys.stderr)
            return 2
    from ftbench.sweep.launchers import LauncherError, make_launcher

    try:  # before the points are read (which imports torch): a missing extra is said at once
        launcher = make_launcher(args.launcher, args.ray_address, args.ray_cpus)
    except LauncherError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        extra = parse_overrides(rest)
        sweep = load_sweep(args.sweep_file, args.out, extra)
        shard_of = parse_shard(args.shard) if args.shard else None
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.wandb_sweep_config:
        print(wandb_sweep_config(sweep, args.sweep_file, rest), end="")
        return 0
    if args.run_index is not None:
        if not 0 <= args.run_index < len(sweep.runs):
            print(f"error: --run_index {args.run_index}: the sweep has {len(sweep.runs)} runs (0..{len(sweep.runs) - 1})", file=sys.stderr)
            return 2
    return run_sweep(sweep, args.retry_failed, args.dry_run, shard_of, args.reference, run_index=args.run_index,
                     launcher=launcher, storage=args.storage)
