"""One point of a sweep, run: its child process (``python -m ftbench.cli``: one run's memory never
inflates another's peak; a crash stays in its process), its progress line, and what its record's
status says to do on the next invocation:

==========================  =====================================================
record status               what ``ftbench sweep`` does
==========================  =====================================================
none                        runs it
``running``                 reruns it (the run or the sweep was killed)
``completed``               skips it
``failed``/``nan``/``oom``  skips it; ``--retry-failed`` reruns it
failed by an interrupt      reruns it (Ctrl-C / SIGTERM is not the run's fault)
==========================  =====================================================

The launchers (:mod:`ftbench.sweep.launchers`) and a search's trials (:mod:`ftbench.sweep.search`) run
points through :func:`run_one`; :mod:`ftbench.sweep.cli` plans and reports the sweep.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ftbench.fileio import write_text_atomic
from ftbench.runcli import die_with_parent
from ftbench.sweep.child import python_command, with_this_package
from ftbench.sweep.grid import RunSpec, Sweep, weights_dir
from ftbench.wandb_mode import default_to_offline

DONE = "completed"
FAILED = ("failed", "nan", "oom")
INTERRUPTS = ("KeyboardInterrupt", "SIGTERMException", "Interrupted", "SystemExit", "SweepWriteError")
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


def blocked_by(sweep: Sweep, spec: RunSpec) -> Optional[str]:
    """Why ``spec`` cannot run now (an upstream stage without a completed record and saved weights), or None."""
    for key, up in spec.upstream.items():
        status = record_status(Path(sweep.out) / f"{up.run_id}.json")
        if status != DONE:
            return f"upstream run {up.display_name} ({up.run_id}, {key}) is {status or 'not run'}"
        if not Path(weights_dir(sweep.out, up.run_id)).is_dir():
            return f"upstream run {up.display_name} ({up.run_id}) saved no weights"
    return None
