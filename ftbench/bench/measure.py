"""Lightning callbacks that measure like a benchmark.

* :class:`PeakMemory` resets the peaks when training (or testing) starts and reads them when it
  ends. On CUDA: the caching allocator's allocated, reserved and active peaks. On CPU (where
  ``torch.cuda.max_memory_allocated()`` would silently read 0) the process's resident high-water
  mark ``VmHWM``, reset through ``/proc/self/clear_refs``; where that reset is refused the
  figure falls back to ``ru_maxrss`` (the whole process's peak) and says so in ``source``.
* :class:`Throughput` times each training batch from ``on_train_batch_start`` to
  ``on_train_batch_end`` (forward, backward, optimizer step; data loading and validation
  excluded), skips ``warmup_steps`` batches, and counts the tokens the objective's ``training_step``
  says it trained on (``trained_tokens``: torchtune's tokens/s) and processed (``padded_tokens``,
  ``real_tokens``): each objective knows its own batch keys. It never stalls a CUDA launch queue:
  on CUDA the batch is timed by events recorded on the stream and the token counts stay on the
  device, both read in bulk (completed events every ``read_every`` batches without waiting, the
  rest and the counts once when training ends). On CPU it times with ``perf_counter``.
  A batch during which torch compiled something (``backbone.compile``: the first batches, a recompile for
  a new shape) is left out of the figures as warm-up is, whenever it comes: ``compile_batches`` and
  ``compile_batch_seconds`` say how many and how long, ``compile_seconds`` what torch itself counted
  compiling (:func:`ftbench.levers.compile_seconds`), so a compiled run's tokens/s is its steady speed.
  Alongside, it records what the run got from the machine over the same timed batches (process
  CPU time over wall time, torch threads, the load average, usable CPUs, the main thread's
  run-queue wait) and whether that makes the speed figures suspect: :func:`contention`.
"""

from __future__ import annotations

import os
import re
import resource
import time
from typing import Any, Optional

import lightning as L
import torch

from ftbench.levers import compile_seconds


def _vm_hwm_bytes() -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            m = re.search(r"VmHWM:\s+(\d+)\s*kB", f.read())
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


def _reset_vm_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cuda(module: L.LightningModule) -> bool:
    return module.device.type == "cuda" and torch.cuda.is_available()


class PeakMemory(L.Callback):
    """Peak memory of the training phase (and separately of the test phase)."""

    def __init__(self):
        self.results: dict[str, dict[str, Any]] = {}
        self._reset_ok = False

    def _reset(self, pl_module: L.LightningModule) -> None:
        if _cuda(pl_module):
            torch.cuda.synchronize(pl_module.device)
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._reset_ok = _reset_vm_hwm()

    def _read(self, pl_module: L.LightningModule) -> dict[str, Any]:
        out: dict[str, Any] = {"device": pl_module.device.type}
        hwm = _vm_hwm_bytes()
        if self._reset_ok and hwm:
            out["host_peak_bytes"], out["host_source"] = hwm, "VmHWM (reset at start)"
        else:
            out["host_peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            out["host_source"] = "ru_maxrss (whole process)"
        if _cuda(pl_module):
            torch.cuda.synchronize(pl_module.device)
            stats = torch.cuda.memory_stats(pl_module.device)
            out["cuda_allocated_peak_bytes"] = int(stats.get("allocated_bytes.all.peak", 0))
            out["cuda_reserved_peak_bytes"] = int(stats.get("reserved_bytes.all.peak", 0))
            out["cuda_active_peak_bytes"] = int(stats.get("active_bytes.all.peak", 0))
            out["peak_bytes"], out["source"] = out["cuda_allocated_peak_bytes"], "torch.cuda allocated peak"
        else:
            out["peak_bytes"], out["source"] = out["host_peak_bytes"], out["host_source"]
        return out

    def on_train_start(self, trainer, pl_module):
        self._reset(pl_module)

    def on_train_end(self, trainer, pl_module):
        self.results["train"] = self._read(pl_module)

    def on_test_start(self, trainer, pl_module):
        self._reset(pl_module)

    def on_test_end(self, trainer, pl_module):
        self.results["test"] = self._read(pl_module)


#: below this share of the CPU time its torch threads could use, a CPU run did not get what it asked for
UTILISATION_MIN = 0.8
#: above this share of the timed wall time spent runnable but waiting for a CPU, the main thread was held up
RUNQUEUE_WAIT_MAX = 0.05
#: runnable threads over the usable CPUs, on average, before the load average says others competed: a run
#: using every CPU itself reads about the CPU count, and the machine's own housekeeping adds a little
LOAD_MARGIN = 0.5


def contention(device: str, *, cpu_utilisation: Optional[float], load_average: Optional[float],
               usable_cpus: Optional[int], runqueue_wait_fraction: Optional[float] = None,
               gpu_other_processes: Optional[int] = None) -> list[str]:
    """Why a run's speed figures are suspect (an empty list: they are not); ``contended`` is ``bool`` of it.

    The rule, over the timed batches (a figure that could not be read, ``None``, says nothing):

    * any device: the 1-minute load average (the larger of start and end) is above the CPUs the
      process may run on by more than ``LOAD_MARGIN`` (more runnable threads than CPUs: someone
      waited; the run's own threads count in it), or the main thread spent
      more than ``RUNQUEUE_WAIT_MAX`` of the timed wall time runnable but not running
      (``/proc/thread-self/schedstat``);
    * CPU: the process got less than ``UTILISATION_MIN`` of the CPU time its torch threads could use
      (``cpu_utilisation`` = process CPU time / (wall time x torch threads); more threads than usable
      CPUs fails this by construction: it asked for CPUs it cannot have);
    * CUDA: another process computes on the same GPU (NVML's process list, via
      ``torch.cuda.list_gpu_processes``; unknown without pynvml). The host thread's CPU share is not
      used there: a GPU-bound run's host thread waits for the device, which is not contention.
    """
    reasons = []
    if load_average is not None and usable_cpus and load_average > usable_cpus + LOAD_MARGIN:
        reasons.append(f"load average {load_average:.2f} > {usable_cpus} usable CPUs + {LOAD_MARGIN}")
    if runqueue_wait_fraction is not None and runqueue_wait_fraction > RUNQUEUE_WAIT_MAX:
        reasons.append(f"main thread waited for a CPU {100 * runqueue_wait_fraction:.0f}% of the time "
                       f"(> {100 * RUNQUEUE_WAIT_MAX:.0f}%)")
    if device == "cpu" and cpu_utilisation is not None and cpu_utilisation < UTILISATION_MIN:
        reasons.append(f"CPU utilisation {cpu_utilisation:.2f} of its threads (< {UTILISATION_MIN})")
    if device == "cuda" and gpu_other_processes:
        reasons.append(f"{gpu_other_processes} other process(es) on the GPU")
    return reasons


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask; ``os.cpu_count()`` where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _load_average() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _gpu_other_processes(device: torch.device) -> Optional[int]:
    """Processes other than this one computing on ``device`` (None where NVML is unavailable)."""
    try:
        text = torch.cuda.list_gpu_processes(device)
    except Exception:  # noqa: BLE001 - NVML missing or refusing: unknown, not an error of the run
        return None
    return other_gpu_processes(text, os.getpid())


def other_gpu_processes(listing: str, pid: int) -> Optional[int]:
    """From ``torch.cuda.list_gpu_processes``'s text: how many processes besides ``pid`` compute on the GPU.
    In a container NVML lists host PIDs, so this process may not appear under its own PID: it is then taken
    to be one of those listed (it holds a context on the device while it trains)."""
    if not listing.startswith("GPU:"):
        return None  # "pynvml module not found", "cuda driver can't be loaded", ...
    pids = {int(m) for m in re.findall(r"process\s+(\d+)", listing)}
    return len(pids - {pid}) if pid in pids else max(0, len(pids) - 1)


class _RunQueueClock:
    """Nanoseconds the calling thread has spent runnable but waiting for a CPU (``schedstat`` field 2),
    read with one ``pread`` on a file opened once; ``None`` where the kernel does not provide it."""

    def __init__(self):
        try:
            self.fd: Optional[int] = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
            if self.read() is None:
                self.close()
        except OSError:
            self.fd = None

    def read(self) -> Optional[int]:
        if self.fd is None:
            return None
        try:
            return int(os.pread(self.fd, 128, 0).split()[1])
        except (OSError, IndexError, ValueError):
            return None

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


_TOKEN_KEYS = ("trained_tokens", "padded_tokens", "real_tokens")


class Throughput(L.Callback):
    """Trained and padded tokens per second over the training batches after ``warmup_steps``, and
    what the run got from the machine over the same batches (see the module docstring)."""

    def __init__(self, warmup_steps: int = 2, read_every: int = 64):
        """
        Args:
            warmup_steps: Training batches left out of the figures (compilation, allocator warm-up).
            read_every: On CUDA, batches between reads of the completed timing events (without
                waiting for the device); what is still in flight is read when training ends.
        """
        self.warmup_steps = warmup_steps
        self.read_every = max(1, read_every)
        self._reset()

    def _reset(self) -> None:
        self.batches = 0
        self.timed_batches = 0
        self.step_times: list[float] = []
        # token counts: Python ints, or device tensors on CUDA (added there, read once at the end)
        self._warmup_trained: Any = 0
        self._timed: dict[str, Any] = {k: 0 for k in _TOKEN_KEYS}
        self._events = False
        self._pending: list[tuple[Any, Any]] = []  # CUDA (start, end) event pairs not yet read
        self._t0: Optional[float] = None
        self._start_event: Any = None
        self._in_timed = False
        self._compile_mark = 0.0  # torch's compile seconds when the batch started
        self._compile_at_start = 0.0
        self._batch_t0 = 0.0
        self.compile_batches = 0
        self.compile_batch_seconds = 0.0
        # what the run got, over the timed batches
        self._host = {"wall": 0.0, "cpu": 0.0, "wait_ns": 0}
        self._marks: Optional[tuple[float, float, Optional[int]]] = None
        self._wait_ok = True
        self._runqueue: Optional[_RunQueueClock] = None
        self._device_type = "cpu"
        self._device: Optional[torch.device] = None
        self.threads = torch.get_num_threads()
        self.load_start: Optional[float] = None
        self.load_end: Optional[float] = None
        self.gpu_other: list[int] = []
        self._final: Optional[dict[str, Any]] = None

    # ------------------------------------------------------------------ the timer
    @staticmethod
    def _new_event() -> Any:
        return torch.cuda.Event(enable_timing=True)

    def _read_events(self, wait: bool) -> None:
        """Move the step times of completed event pairs to ``step_times`` (all of them if ``wait``)."""
        if wait and self._pending:
            self._pending[-1][1].synchronize()  # one stream: the last event completes after the others
        still = []
        for start, end in self._pending:
            if not wait and not end.query():
                still.append((start, end))
                continue
            self.step_times.append(start.elapsed_time(end) / 1000.0)
        self._pending = still

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer, pl_module):
        self._reset()
        self._device = pl_module.device
        self._device_type = "cuda" if _cuda(pl_module) else pl_module.device.type
        self._events = self._device_type == "cuda"
        self.threads = torch.get_num_threads()
        self._runqueue = _RunQueueClock()
        self._compile_at_start = compile_seconds()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._compile_mark = compile_seconds()
        self._batch_t0 = time.perf_counter()
        self._in_timed = self.batches >= self.warmup_steps
        if not self._in_timed:
            return
        if self.timed_batches == 0 and self.load_start is None:
            self.load_start = _load_average()
            if self._events:
                self._note_gpu_processes()
        wait = self._runqueue.read() if self._runqueue is not None else None
        self._marks = (time.perf_counter(), time.process_time(), wait)
        if self._events:
            self._start_event = self._new_event()
            self._start_event.record()
        self._t0 = self._marks[0]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if compile_seconds() > self._compile_mark:  # torch compiled in this batch: not a steady step
            self.compile_batches += 1
            self.compile_batch_seconds += time.perf_counter() - self._batch_t0
            if self._in_timed:
                self._in_timed, self._marks, self._start_event = False, None, None
        timed = self._in_timed and self._marks is not None
        if timed:
            if self._events:
                end = self._new_event()
                end.record()
                self._pending.append((self._start_event, end))
            now, cpu = time.perf_counter(), time.process_time()
            wait = self._runqueue.read() if self._runqueue is not None else None
            w0, c0, q0 = self._marks
            self._host["wall"] += now - w0
            self._host["cpu"] += cpu - c0
            if wait is not None and q0 is not None:
                self._host["wait_ns"] += wait - q0
            else:
                self._wait_ok = False
            if not self._events:
                self.step_times.append(now - w0)
        self._count(outputs if isinstance(outputs, dict) else {}, timed)
        self.batches += 1
        self._marks = None
        if self._events and self.batches % self.read_every == 0:
            self._read_events(wait=False)

    def _count(self, outputs: dict[str, Any], timed: bool) -> None:
        """Add the batch's token counts: on CPU as ints; on CUDA tensors stay tensors, added on the
        device (a kernel launch, no host read) and read once when training ends."""
        def add(acc: Any, value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                return acc + value.detach() if self._events else acc + int(value)
            return acc + int(value or 0)

        if timed:
            self.timed_batches += 1
            for k in _TOKEN_KEYS:
                self._timed[k] = add(self._timed[k], outputs.get(k, 0))
        else:
            self._warmup_trained = add(self._warmup_trained, outputs.get("trained_tokens", 0))

    def on_train_end(self, trainer, pl_module):
        self._finish()

    def _finish(self) -> None:
        if self._final is not None:
            return
        if self._events:
            self._read_events(wait=True)
            self._note_gpu_processes()
        self.load_end = _load_average() if self.timed_batches else None
        if self._runqueue is not None:
            self._runqueue.close()
        self._final = {k: int(v) for k, v in self._timed.items()}
        self._final["warmup_trained_tokens"] = int(self._warmup_trained)

    def _note_gpu_processes(self) -> None:
        n = _gpu_other_processes(self._device) if self._device is not None else None
        if n is not None:
            self.gpu_other.append(n)

    # ------------------------------------------------------------------ results
    @property
    def time(self) -> float:
        """Seconds of the timed batches (on CUDA: of those whose events have been read)."""
        return float(sum(self.step_times))

    @property
    def trained_tokens(self) -> int:
        """Trained tokens of the timed batches (read from the device when training ended)."""
        self._finish()
        return self._final["trained_tokens"]

    def contention_fields(self) -> dict[str, Any]:
        """What the run got over its timed batches, and the verdict of :func:`contention`."""
        wall, cpu = self._host["wall"], self._host["cpu"]
        util = cpu / (wall * self.threads) if wall > 0 and self.threads else None
        wait = self._host["wait_ns"] / 1e9 / wall if wall > 0 and self._wait_ok and self.timed_batches else None
        loads = [x for x in (self.load_start, self.load_end) if x is not None]
        cpus = usable_cpus()
        gpu_other = max(self.gpu_other) if self.gpu_other else None
        reasons = contention(self._device_type, cpu_utilisation=util, load_average=max(loads) if loads else None,
                             usable_cpus=cpus, runqueue_wait_fraction=wait, gpu_other_processes=gpu_other)
        return {
            "timing": "cuda events" if self._events else "perf_counter",
            "host_seconds": wall, "cpu_seconds": cpu, "torch_threads": self.threads, "cpu_utilisation": util,
            "runqueue_wait_fraction": wait, "load_average_start": self.load_start, "load_average_end": self.load_end,
            "cpu_count": os.cpu_count(), "usable_cpus": cpus,
            "gpu_other_processes": gpu_other, "contended": bool(reasons), "contended_reasons": reasons,
        }

    def summary(self) -> dict[str, Any]:
        self._finish()
        f = self._final
        t = self.time
        times = sorted(self.step_times)
        return {
            "warmup_batches": min(self.warmup_steps, self.batches),
            "timed_batches": self.timed_batches,
            "timed_seconds": t,
            "trained_tokens": f["trained_tokens"] + f["warmup_trained_tokens"],
            "trained_tokens_per_s": f["trained_tokens"] / t if t > 0 else None,
            "padded_tokens_per_s": f["padded_tokens"] / t if t > 0 else None,
            "padding_fraction": 1 - f["real_tokens"] / f["padded_tokens"] if f["padded_tokens"] else None,
            "step_time_mean_s": t / len(times) if times else None,
            "step_time_median_s": times[len(times) // 2] if times else None,
            "compile_seconds": compile_seconds() - self._compile_at_start,
            "compile_batches": self.compile_batches,
            "compile_batch_seconds": self.compile_batch_seconds,
            **self.contention_fields(),
        }
