"""Who runs a sweep's points: :class:`LocalLauncher` (one after another on this machine, the default)
or :class:`RayLauncher` (each point a Ray task, on a local Ray instance or a cluster).

Either way a point is the same ``python -m ftbench.cli`` process started by
:func:`ftbench.sweep.runs.run_one` (its command line, environment, log file, progress file and the
marking of a run that died without a record), so the records, run ids and resume rules do not
depend on the launcher. ``launcher.run(sweep, specs, progress)`` is the one call that runs a list of
points (a grid's, or a search's trials) and returns each one's record status::

    with make_launcher("ray") as launcher:          # Ray is stopped on leaving, if it started it
        statuses = launcher.run(sweep, specs, progress)        # {run_id: "completed", ...}
        more = launcher.run(sweep, trials, progress, start=len(specs) + 1)   # the same Ray instance

The specs are in the sweep's order (every pipeline stage after the runs whose weights it takes); a
stage starts once its upstream runs have finished, and is recorded ``skipped`` when one did not
complete, as in a local sweep.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Protocol

from ftbench.errors import FTBenchError

if TYPE_CHECKING:
    from ftbench.sweep.runs import Progress
    from ftbench.sweep.grid import RunSpec, Sweep

LAUNCHERS = ("local", "ray")
RAY_EXTRA = "pip install 'ftbench[ray]'"


class Launcher(Protocol):
    """What runs a list of points: ``with launcher: launcher.run(sweep, specs, progress)``."""

    name: str

    def run(self, sweep: "Sweep", specs: list["RunSpec"], progress: "Progress", start: int = 1) -> dict[str, str]:
        """Run ``specs`` (stages after their upstream runs); ``{run_id: record status}``."""
        ...

    def __enter__(self) -> "Launcher": ...

    def __exit__(self, *exc: Any) -> None: ...


class LauncherError(FTBenchError):
    """A launcher that cannot start (its optional extra is missing); the message names the option."""


class RunStopped(OSError):
    """The sweep could not write while it ran ``run_id`` (recorded as stopped by the sweep: the next
    invocation reruns it)."""

    def __init__(self, run_id: str, err: OSError):
        super().__init__(err.errno, err.strerror or str(err))
        self.run_id = run_id


def _stop(sweep: "Sweep", spec: "RunSpec", err: OSError) -> RunStopped:
    from ftbench.sweep.runs import _mark_stopped

    _mark_stopped(Path(sweep.out) / f"{spec.run_id}.json", spec, err)
    return RunStopped(spec.run_id, err)


def _skip_if_blocked(sweep: "Sweep", spec: "RunSpec", i: int, progress: "Progress") -> bool:
    """Record ``spec`` as skipped when an upstream stage did not complete (True), as a local sweep does."""
    from ftbench.sweep.runs import _mark_skipped, blocked_by

    why = blocked_by(sweep, spec)
    if why is None:
        return False
    _mark_skipped(Path(sweep.out) / f"{spec.run_id}.json", spec, why)
    progress.print(f"[{i}/{progress.total}] {spec.run_id}: skipped: {why}")
    return True


class LocalLauncher:
    """The points one after another, each in its own process on this machine."""

    name = "local"

    def __enter__(self) -> "LocalLauncher":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def run(self, sweep: "Sweep", specs: list["RunSpec"], progress: "Progress", start: int = 1) -> dict[str, str]:
        """Run ``specs`` in order (``start``: the number the first one gets in the progress lines);
        returns ``{run_id: record status}``. An OSError (the results folder cannot be written)
        stops the sweep as :class:`RunStopped`."""
        from ftbench.sweep.runs import run_one

        statuses: dict[str, str] = {}
        for i, spec in enumerate(specs, start):
            try:
                if _skip_if_blocked(sweep, spec, i, progress):
                    statuses[spec.run_id] = "skipped"
                    continue
                statuses[spec.run_id] = run_one(sweep, spec, i, progress)
            except OSError as err:
                raise _stop(sweep, spec, err) from err
        return statuses


# ---------------------------------------------------------------------------------- Ray
def task_resources(spec: "RunSpec", cluster_gpus: float) -> dict[str, float]:
    """What a point's Ray task reserves, from its trainer config as the run reads it.

    ``accelerator: gpu|cuda`` reserves ``devices`` GPUs (a count, or a list's length; ``auto``/-1:
    one GPU, which is then all the run sees, since Ray sets ``CUDA_VISIBLE_DEVICES`` to the GPUs it
    reserved); ``cpu`` reserves ``devices`` CPUs (one process each); Lightning's default ``auto``
    reserves one GPU when the cluster has any (Lightning would take a GPU) and otherwise one CPU.
    Every task reserves at least one CPU (the run's main process)."""
    trainer = spec.identity.settings.get("trainer") or {}
    accelerator = str(trainer.get("accelerator", "auto")).lower()
    devices = trainer.get("devices", "auto")
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    count = len(devices) if isinstance(devices, (list, tuple)) else devices if isinstance(devices, int) and devices > 0 else 1
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and cluster_gpus > 0):
        return {"num_cpus": 1, "num_gpus": count}
    return {"num_cpus": count if accelerator == "cpu" else 1, "num_gpus": 0}


def _portable(sweep: "Sweep", spec: "RunSpec") -> tuple["Sweep", "RunSpec"]:
    """What a Ray task needs of the sweep and of the point: the results folder, the sweep's name, and
    the point with its identity read here (the task does not parse configs again, nor carry the
    parsed namespace or the upstream runs, which ``run_one`` does not use)."""
    light = dataclasses.replace(sweep, runs=[])
    point = dataclasses.replace(spec, upstream={})
    point.__dict__["identity"] = spec.identity  # functools.cached_property's slot: the id read once, here
    return light, point


def run_in_task(sweep: "Sweep", spec: "RunSpec", i: int, total: int) -> tuple[str, list[str]]:
    """The body of a point's Ray task: :func:`ftbench.sweep.runs.run_one` on the worker, its progress
    lines kept and returned (the driver prints them when the run has finished)."""
    from ftbench.sweep.runs import Progress, run_one

    class Collected(Progress):
        def __init__(self) -> None:
            super().__init__(total, live=False)
            self.lines: list[str] = []

        def print(self, text: str) -> None:
            self.lines.append(text)

        def update(self, *args: Any) -> None:  # the live step/loss line: not sent back (Ray tasks return once)
            pass

    progress = Collected()
    status = run_one(sweep, spec, i, progress)
    return status, progress.lines


def _import_ray():
    try:
        import ray
    except ImportError as err:
        raise LauncherError(f"--launcher ray needs Ray, an optional extra: {RAY_EXTRA}") from err
    return ray


class RayLauncher:
    """Every point a Ray task that starts the point's process (:func:`run_in_task`), as many at once
    as the cluster's CPUs and GPUs allow (:func:`task_resources`).

    ``address`` None starts a local Ray instance with ``num_cpus`` CPUs (default: this machine's) and
    shuts it down afterwards; an address (``auto``, ``ray://host:10001``) joins a running cluster,
    whose nodes must have ftbench installed and the sweep's ``--out`` on shared storage (each task
    writes its record there, and the driver reads them). A Ray instance already started in this
    process (``ray.init`` before) is used as it is. Ray is started (or joined) by the first
    :meth:`run` and kept for the next ones (a search's trials); leaving ``with launcher:`` shuts down
    what this launcher started."""

    name = "ray"

    def __init__(self, address: Optional[str] = None, num_cpus: Optional[int] = None):
        self.ray = _import_ray()
        self.address = address
        self.num_cpus = num_cpus
        self.started = False  # whether this launcher started (or joined) Ray, and so shuts it down

    def __enter__(self) -> "RayLauncher":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.started:
            self.ray.shutdown()
            self.started = False

    def _connect(self) -> None:
        """Start or join Ray unless this process already has."""
        if self.ray.is_initialized():
            return
        options: dict[str, Any] = dict(log_to_driver=False, logging_level=logging.WARNING, configure_logging=True)
        if self.address is None:
            options.update(num_cpus=self.num_cpus, include_dashboard=False)
        self.ray.init(address=self.address, **options)
        self.started = True

    def run(self, sweep: "Sweep", specs: list["RunSpec"], progress: "Progress", start: int = 1) -> dict[str, str]:
        """Run ``specs`` as Ray tasks; returns ``{run_id: record status}`` (see :meth:`LocalLauncher.run`).
        A stage is submitted once the runs of ``specs`` it takes weights from have finished. Ctrl-C
        cancels the tasks (their processes die with their workers; their records stay ``running``,
        which the next invocation reruns)."""
        if not specs:  # nothing to do: no Ray start-up (~9 s on 2 cores)
            return {}
        self._connect()
        return self._run(sweep, specs, progress, start)

    def _run(self, sweep: "Sweep", specs: list["RunSpec"], progress: "Progress", start: int) -> dict[str, str]:
        ray = self.ray
        task = ray.remote(run_in_task)
        cluster_gpus = float(ray.cluster_resources().get("GPU", 0))
        in_batch = {id(s) for s in specs}
        pending, running = list(specs), {}
        finished: set[int] = set()
        statuses: dict[str, str] = {}
        i = start - 1
        try:
            while pending or running:
                for spec in list(pending):  # the sweep's order: an upstream run comes before its stages
                    if any(id(u) in in_batch and id(u) not in finished for u in spec.upstream.values()):
                        continue
                    pending.remove(spec)
                    i += 1
                    try:
                        skipped = _skip_if_blocked(sweep, spec, i, progress)
                    except OSError as err:
                        raise _stop(sweep, spec, err) from err
                    if skipped:
                        statuses[spec.run_id] = "skipped"
                        finished.add(id(spec))
                        continue
                    resources = task_resources(spec, cluster_gpus)
                    # max_retries=0: a lost task is not rerun behind the sweep's back (its record says
                    # so, and the next invocation reruns it)
                    ref = task.options(**resources, max_retries=0, name=spec.run_id).remote(
                        *_portable(sweep, spec), i, progress.total)
                    running[ref] = spec
                    progress.print(f"[{i}/{progress.total}] {spec.run_id}: started as a Ray task "
                                   f"({resources['num_cpus']} CPU, {resources['num_gpus']} GPU)")
                if not running:
                    continue
                (ref,), _ = ray.wait(list(running), num_returns=1)
                spec = running.pop(ref)
                finished.add(id(spec))
                try:
                    status, lines = ray.get(ref)
                except OSError as err:  # the task could not write the results folder
                    raise _stop(sweep, spec, err) from err
                except ray.exceptions.RayError as err:  # the task itself was lost (worker or node died)
                    status, lines = self._lost(sweep, spec, err, progress), []
                statuses[spec.run_id] = status
                for line in lines:
                    progress.print(line)
        except BaseException:  # Ctrl-C or a stop: no task outlives the sweep
            for ref in running:
                try:
                    ray.cancel(ref, force=True)  # kills the worker: the run's process dies with it
                except Exception:  # finished meanwhile, or Ray already gone
                    pass
            raise
        return statuses

    @staticmethod
    def _lost(sweep: "Sweep", spec: "RunSpec", err: Exception, progress: "Progress") -> str:
        """A task that returned nothing (its worker or node died, Ray's memory monitor killed it, or
        ``run_one`` raised): the run is recorded failed with Ray's reason, unless its record already
        says how it ended (``--retry-failed`` reruns it, as a local run killed by a signal; an
        interrupted one stays interrupted, which the next invocation reruns)."""
        from ftbench.fileio import write_text_atomic
        from ftbench.sweep.runs import _mark_failed, read_record, record_status

        path = Path(sweep.out) / f"{spec.run_id}.json"
        reason = (str(err).strip().splitlines() or [""])[0][:300]
        if record_status(path) in (None, "running"):  # the run did not get to say how it ended
            _mark_failed(path, spec, -9, Path(sweep.out) / f"{spec.run_id}.log")
            rec = read_record(path) or {}
            rec["train_info"]["error"] = {"type": type(err).__name__, "message": f"the Ray task was lost: {reason}"}
            write_text_atomic(path, json.dumps(rec, indent=2))
        progress.print(f"      {spec.run_id}: the Ray task was lost ({type(err).__name__}: {reason})")
        return record_status(path) or "failed"


def make_launcher(name: str = "local", ray_address: Optional[str] = None,
                  ray_cpus: Optional[int] = None) -> Launcher:
    """The launcher ``--launcher NAME`` names (``--ray-address``/``--ray-cpus`` apply to Ray only)."""
    if name == "ray":
        if ray_address is not None and ray_cpus is not None:
            raise LauncherError("--ray-cpus sizes a local Ray instance; with --ray-address the cluster's own CPUs are used")
        return RayLauncher(ray_address, ray_cpus)
    if ray_address is not None or ray_cpus is not None:
        raise LauncherError(f"--ray-address/--ray-cpus apply to --launcher ray (the launcher is {name!r})")
    if name == "local":
        return LocalLauncher()
    raise LauncherError(f"--launcher {name!r}: expected one of {', '.join(LAUNCHERS)}")
