"""``ftbench sweep SWEEP.yaml`` and ``ftbench report RESULTS_DIR``.

The sweep runner starts every run as its own ``python -m ftbench.cli`` process (one run's memory
never inflates another's peak; a crash stays in its process) and decides from the run's record
what to do on a second invocation:

==========================  =====================================================
record status               what ``ftbench sweep`` does
==========================  =====================================================
none                        runs it
``running``                 reruns it (the run or the sweep was killed)
``completed``               skips it
``failed``/``nan``/``oom``  skips it; ``--retry-failed`` reruns it
failed by an interrupt      reruns it (Ctrl-C / SIGTERM is not the run's fault)
==========================  =====================================================

Where the processes run is the launcher's choice (:mod:`ftbench.sweep.launchers`: one after another
here, the default, or as Ray tasks with ``--launcher ray``); the process, its record and these rules
are the same either way.

The parent reads every point with the run's own parser (:func:`ftbench.runcli.read_run`), which
imports torch and lightning; the runs' memory is their own processes'.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from ftbench.fileio import write_text_atomic
from ftbench.runcli import die_with_parent
from ftbench.sweep.child import python_command, with_this_package
from ftbench.wandb_mode import default_to_offline
from ftbench.sweep.grid import (RunSpec, Sweep, SweepError, load_sweep, parse_overrides, parse_shard, shard,
                                point_text, short_value, weights_dir)

if TYPE_CHECKING:
    from ftbench.sweep.launchers import Launcher

DONE = "completed"
FAILED = ("failed", "nan", "oom")
INTERRUPTS = ("KeyboardInterrupt", "SIGTERMException", "Interrupted", "SystemExit", "SweepWriteError")
MANIFEST = "sweep.json"
RUN_INFO_ENV = "FTBENCH_RUN_INFO"  # read by the run's CLI (ftbench.runcli)


def read_record(path: Path) -> Optional[dict[str, Any]]:
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def record_status(path: Path) -> Optional[str]:
    """The status of the record at ``path``; ``interrupted`` for a run failed by Ctrl-C/SIGTERM."""
    rec = read_record(path)
    try:
        status = rec["train_info"]["status"]
    except (TypeError, KeyError):
        return None
    if status in FAILED and (rec["train_info"].get("error") or {}).get("type") in INTERRUPTS:
        return "interrupted"
    return status


def run_summary(path: Path) -> Optional[str]:
    """The one line :func:`ftbench.sweep.report.summary_line` makes of the record at ``path`` (None
    when there is no readable record)."""
    rec = read_record(path)
    if rec is None:
        return None
    from ftbench.sweep.report import summary_line

    try:
        return summary_line(rec)
    except (KeyError, TypeError, ValueError):  # a record torn by a killed run: its status says so
        return None


def decide(status: Optional[str], retry_failed: bool) -> tuple[bool, str]:
    """(run it?, what to say) for a record status. A ``skipped`` run (its upstream stage had not
    completed) runs once its upstream has."""
    if status == DONE:
        return False, "done"
    if status in FAILED:
        return (True, f"rerun ({status})") if retry_failed else (False, f"{status} (skipped; --retry-failed reruns it)")
    if status is None:
        return True, "to run"
    return True, f"rerun ({status})"


def _mark_skipped(path: Path, spec: RunSpec, why: str) -> None:
    """A stage whose upstream run did not complete is not run: recorded ``skipped`` with the reason."""
    rec = {"schema": 1, "run_info": {"run_id": spec.run_id, "subcommand": spec.subcommand, "point": spec.label,
                                     "upstream": {k: u.run_id for k, u in spec.upstream.items()}, **spec.run_info},
           "train_info": {"method": spec.method, "status": "skipped", "metrics": [], "final": {},
                          "error": {"type": "UpstreamNotCompleted", "message": why}}, "meta_info": {}}
    write_text_atomic(path, json.dumps(rec, indent=2))


def _mark_stopped(path: Path, spec: RunSpec, err: OSError) -> None:
    """The run a sweep was on when it could not write: recorded as stopped by the sweep (a status the
    next invocation reruns), when anything can still be written; a completed record is left alone."""
    if record_status(path) == DONE:
        return
    rec = read_record(path)
    if rec is None or not isinstance(rec.get("train_info"), dict):
        rec = {"schema": 1, "run_info": {"run_id": spec.run_id, "subcommand": spec.subcommand, "point": spec.label},
               "train_info": {"method": spec.method, "metrics": [], "final": {}}, "meta_info": {}}
    rec["train_info"]["status"] = "failed"
    rec["train_info"]["error"] = {"type": "SweepWriteError", "message": f"the sweep could not write: {err}"}
    try:
        write_text_atomic(path, json.dumps(rec, indent=2))
    except OSError:
        pass  # left as it was (running, or no record): the next invocation reruns it either way


def _mark_failed(path: Path, spec: RunSpec, returncode: int, log: Path) -> None:
    """A run that died without saying why (killed, crashed in start-up, a bad config value) is
    recorded as failed, with the end of its output."""
    rec = read_record(path)
    if rec is None or "train_info" not in rec:
        rec = {"schema": 1, "run_info": {"run_id": spec.run_id, "subcommand": spec.subcommand,
                                         "argv": spec.argv(str(path.parent)), "point": spec.label, **spec.run_info},
               "train_info": {"method": spec.method, "metrics": [], "final": {}}, "meta_info": {}}
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    info = rec["train_info"]
    info["status"] = "failed"
    if not info.get("error"):
        why = f"killed by signal {-returncode}" if returncode < 0 else f"process exited with {returncode}"
        info["error"] = {"type": "ExitCode", "message": why, "log_tail": tail}
    write_text_atomic(path, json.dumps(rec, indent=2))


# ---------------------------------------------------------------------------------- progress
@dataclass
class RunProgress:
    """Where a run is, as its progress file last said (the sweep's side of :mod:`ftbench.sweep.progress`)."""

    phase: str = "starting"
    loss: Optional[float] = None
    steps_done: int = 0

    def read_file(self, path: Path) -> Optional[int]:
        """Take what the run's progress file says, when there is one; returns its max_steps."""
        try:
            state = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(state, dict):
            return None
        self.phase = state.get("phase") or self.phase
        self.steps_done = max(self.steps_done, int(state.get("step") or 0))
        if isinstance(state.get("loss"), (int, float)):
            self.loss = float(state["loss"])
        return state.get("max_steps") if isinstance(state.get("max_steps"), int) else None


def _fmt_time(s: Optional[float]) -> str:
    if s is None:
        return "?"
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """Run i of N, the current run's step and loss, elapsed time and an estimate of what is left.
    A live rich panel on a terminal; plain lines otherwise (logs, CI, tests)."""

    def __init__(self, total: int, live: Optional[bool] = None):
        self.total = total
        self.t0 = time.monotonic()
        self.durations: list[float] = []
        self.live = sys.stdout.isatty() if live is None else live
        self._live = None
        self._last_plain = 0.0

    def __enter__(self):
        if self.live:
            try:
                from rich.live import Live

                self._live = Live("", refresh_per_second=4, transient=True)
                self._live.__enter__()
            except Exception:  # rich missing or no terminal: plain lines
                self._live = None
        return self

    def __exit__(self, *exc):
        if self._live is not None:
            self._live.__exit__(*exc)

    def print(self, text: str) -> None:
        if self._live is not None:
            self._live.console.print(text, markup=False, highlight=False)
        else:
            print(text, flush=True)

    def eta(self, i: int, elapsed_run: float, fraction: Optional[float]) -> Optional[float]:
        """Seconds left for the whole sweep: the mean run time so far (or this run's pace) times the runs left."""
        left_after = self.total - i
        if self.durations:
            per_run = sum(self.durations) / len(self.durations)
        elif fraction and fraction > 0.05:
            per_run = elapsed_run / fraction
        else:
            return None
        return max(0.0, per_run - elapsed_run) + per_run * left_after

    def update(self, i: int, spec: RunSpec, elapsed_run: float, p: RunProgress, max_steps: Optional[int]) -> None:
        fraction = min(1.0, p.steps_done / max_steps) if max_steps and p.steps_done else None
        step = f"step {p.steps_done}" + (f"/{max_steps}" if max_steps else "") if p.steps_done else p.phase
        if p.phase in ("validate", "test", "sanity") and p.steps_done:
            step += f" ({p.phase})"
        loss = f"loss {p.loss:.4f}" if p.loss is not None else "loss –"
        line = (f"[{i}/{self.total}] {spec.run_id}  {step}  {loss}  run {_fmt_time(elapsed_run)}  "
                f"sweep {_fmt_time(time.monotonic() - self.t0)}  left ~{_fmt_time(self.eta(i, elapsed_run, fraction))}")
        if self._live is not None:
            self._live.update(line)
        elif time.monotonic() - self._last_plain > 30:  # plain output: a line every 30 s at most
            self._last_plain = time.monotonic()
            print("    " + line, flush=True)


# ---------------------------------------------------------------------------------- running
def child_env(sweep: Sweep, spec: RunSpec) -> dict[str, str]:
    """The run's environment: W&B groups every run of a sweep under its name and tags it with the
    method (honoured by ``wandb.init`` when the run's logger is W&B; inert otherwise). Values the
    user (or a W&B agent) has already set win."""
    env = {**with_this_package(os.environ), "PYTHONUNBUFFERED": "1"}
    env.setdefault("WANDB_RUN_GROUP", sweep.name)
    env.setdefault("WANDB_TAGS", ",".join(dict.fromkeys([spec.method, spec.subcommand, sweep.name]))[:500])
    env.setdefault("WANDB_JOB_TYPE", spec.subcommand)
    env.setdefault("WANDB_NAME", spec.run_id)
    default_to_offline(env)  # never prompt, never hang
    if spec.run_info:  # extra record entries (a search trial's study and number): the run's record keeps them
        env[RUN_INFO_ENV] = json.dumps(spec.run_info)
    return {**env, **spec.env}


def run_one(sweep: Sweep, spec: RunSpec, i: int, progress: Progress, python: str = sys.executable) -> str:
    """Run one point in its own process; its output goes to ``{run_id}.log`` (written as
    ``.{run_id}.log.part`` while it runs, renamed when it ends). Returns the record's status."""
    out = Path(sweep.out)
    path = out / f"{spec.run_id}.json"
    part, log = out / f".{spec.run_id}.log.part", out / f"{spec.run_id}.log"
    side = out / f".{spec.run_id}.progress.json"
    side.unlink(missing_ok=True)
    env = {**child_env(sweep, spec), "FTBENCH_PROGRESS_FILE": str(side)}
    cmd = [*python_command(python), "ftbench.cli", *spec.argv(str(out))]
    progress.print(f"[{i}/{progress.total}] {spec.run_id}: ftbench {' '.join(spec.argv(str(out)))}")
    t0 = time.monotonic()
    p = RunProgress()
    max_steps = spec.max_steps() if spec.subcommand == "fit" else None
    with part.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, preexec_fn=die_with_parent if os.name == "posix" else None)
        try:
            while proc.poll() is None:
                time.sleep(0.25)
                max_steps = p.read_file(side) or max_steps
                progress.update(i, spec, time.monotonic() - t0, p, max_steps)
        except KeyboardInterrupt:
            # Ctrl-C reached the run too (same process group): give it a moment, then stop it. Its
            # record says interrupted or running; the next invocation reruns it.
            try:
                proc.wait(timeout=20)
            except (subprocess.TimeoutExpired, KeyboardInterrupt):
                proc.kill()
                proc.wait()
            os.replace(part, log)
            side.unlink(missing_ok=True)
            raise
    os.replace(part, log)
    side.unlink(missing_ok=True)
    dt = time.monotonic() - t0
    progress.durations.append(dt)
    attempt = path.with_name(path.name + ".attempt")  # ftbench.bench.record.attempt_path
    if attempt.exists():  # a rerun of a completed run that did not complete: the completed record stays
        path = attempt
    if proc.returncode != 0 and record_status(path) not in FAILED + ("interrupted",):
        _mark_failed(path, spec, proc.returncode, log)
    status = record_status(path)
    if status in (None, "running"):  # exited 0 without a finished record: not a completed run
        _mark_failed(path, spec, proc.returncode, log)
        status = "failed"
    # a finished run: its summary line from the record; any other: the one-line reason it stopped
    detail = f"  {run_summary(path) or ''}".rstrip() if status == DONE else f": {failure_reason(path, log)}"
    progress.print(f"      {status} in {dt:.0f} s{detail}  (log: {log})")
    return status


def failure_reason(path: Path, log: Path) -> str:
    """One line saying why a run did not complete: the last ``ftbench: error:`` line of its log (what
    the run itself said), else its record's error message (first line)."""
    try:
        said = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("ftbench: error: ")]
    except OSError:
        said = []
    if said:
        return said[-1][len("ftbench: error: "):]
    error = ((read_record(path) or {}).get("train_info") or {}).get("error") or {}
    message = str(error.get("message") or "").strip().splitlines()
    return f"{error.get('type', 'error')}: {message[0]}"[:300] if message else "no reason recorded"


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


def blocked_by(sweep: Sweep, spec: RunSpec) -> Optional[str]:
    """Why ``spec`` cannot run now (an upstream stage without a completed record and saved weights), or None."""
    for key, up in spec.upstream.items():
        status = record_status(Path(sweep.out) / f"{up.run_id}.json")
        if status != DONE:
            return f"upstream run {up.display_name} ({up.run_id}, {key}) is {status or 'not run'}"
        if not Path(weights_dir(sweep.out, up.run_id)).is_dir():
            return f"upstream run {up.display_name} ({up.run_id}) saved no weights"
    return None


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
