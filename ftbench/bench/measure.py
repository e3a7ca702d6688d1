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
  ``real_tokens``): each objective knows its own batch keys.
"""

from __future__ import annotations

import re
import resource
import time
from typing import Any, Optional

import lightning as L
import torch


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


class Throughput(L.Callback):
    """Trained and padded tokens per second over the training batches after ``warmup_steps``."""

    def __init__(self, warmup_steps: int = 2):
        self.warmup_steps = warmup_steps
        self.batches = 0
        self.timed_batches = 0
        self.time = 0.0
        self.trained_tokens = 0
        self.padded_tokens = 0
        self.real_tokens = 0
        self.total_trained_tokens = 0
        self.step_times: list[float] = []
        self._t0: Optional[float] = None

    def _sync(self, pl_module):
        if _cuda(pl_module):
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._sync(pl_module)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._sync(pl_module)
        dt = time.perf_counter() - (self._t0 or time.perf_counter())
        outputs = outputs if isinstance(outputs, dict) else {}
        trained = int(outputs.get("trained_tokens", 0))
        self.batches += 1
        self.total_trained_tokens += trained
        if self.batches > self.warmup_steps:
            self.timed_batches += 1
            self.time += dt
            self.trained_tokens += trained
            self.padded_tokens += int(outputs.get("padded_tokens", 0))
            self.real_tokens += int(outputs.get("real_tokens", 0))
            self.step_times.append(dt)

    def summary(self) -> dict[str, Any]:
        t = self.time
        times = sorted(self.step_times)
        return {
            "warmup_batches": min(self.warmup_steps, self.batches),
            "timed_batches": self.timed_batches,
            "timed_seconds": t,
            "trained_tokens": self.total_trained_tokens,
            "trained_tokens_per_s": self.trained_tokens / t if t > 0 else None,
            "padded_tokens_per_s": self.padded_tokens / t if t > 0 else None,
            "padding_fraction": 1 - self.real_tokens / self.padded_tokens if self.padded_tokens else None,
            "step_time_mean_s": t / self.timed_batches if self.timed_batches else None,
            "step_time_median_s": times[len(times) // 2] if times else None,
        }
