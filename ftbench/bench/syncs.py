"""Host-device synchronisations of a training step: how often the CPU waits for the GPU.

A step that reads a value off the GPU (``loss.item()``, ``int(mask.sum())``, a boolean-mask index, a
copy to the CPU) stalls the host until every queued kernel has run, so the next step's kernels are
not queued while this one's run: GPU idle time that no kernel speed-up removes. A framework's step
should have none (Lightning's logging keeps metrics on the device; :class:`~ftbench.bench.measure.
Throughput` counts tokens on the device and reads its CUDA events once per 64 batches).

:class:`HostSyncs` counts them in one training step (``batch_index``: by default the second, after
the first step's lazy initialisations) in two ways, both kept in the record (``train_info.host_syncs``):

* ``cuda_syncs``: on CUDA, PyTorch's own definition of a synchronising operation,
  ``torch.cuda.set_sync_debug_mode("warn")``, which warns at every one (the autograd engine replays
  its worker threads' warnings in the calling thread, so the backward pass counts too); counted from
  the warnings, each with the first Python frame outside torch that caused it (``cuda_sync_sites``).
  None on a CPU (no device to wait for). A library that calls ``cudaStreamSynchronize`` itself,
  below PyTorch, is not seen (torch.profiler's CUDA runtime events would be; they also record the
  profiler's own synchronisation at its stop, which is why they were not chosen).
* ``device_reads`` and ``host_reads``: on every device, the operations that read a tensor's value on
  the host or whose output size depends on its values (``aten._local_scalar_dense``, behind
  ``.item()``, ``float()``, ``int()``, ``bool()``; ``nonzero``; ``masked_select``; ``unique``),
  counted by a ``TorchDispatchMode`` (thread-local state the autograd engine carries into backward),
  split by where the tensor is. A read of a GPU tensor is a synchronisation; a read of a CPU tensor
  is not (AdamW's per-parameter ``step`` counter lives on the CPU). On a CPU every read is a host
  read: the count still shows the step's would-be synchronisations (transformers' packed-sequence
  check reads the position ids), so a test on the tiny CPU model catches one added to the step.
"""

from __future__ import annotations

import traceback
import warnings
from collections import Counter
from typing import Any, Optional

import lightning as L
import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: aten operations that read values on the host (a synchronisation when the tensor is on a GPU)
SCALAR_READS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_consecutive",
                "unique_dim")
_SYNC_WARNING = "synchronizing CUDA operation"


def _site() -> str:
    """The innermost Python frame outside torch and this module: where a read was asked for."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        name = frame.filename.replace("\\", "/")
        if "/torch/" not in name and not name.endswith("ftbench/bench/syncs.py"):
            parts = name.split("/")
            return f"{'/'.join(parts[-2:])}:{frame.lineno}"
    return "?"


class _ScalarReads(TorchDispatchMode):
    """Counts :data:`SCALAR_READS` by the first frame outside torch that asked for each."""

    def __init__(self):
        super().__init__()
        self.sites: Counter[tuple[str, str]] = Counter()  # (the tensor's device type, what read it where)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SCALAR_READS:
            device = args[0].device.type if args and isinstance(args[0], torch.Tensor) else "?"
            self.sites[(device, f"{name} at {_site()}")] += 1
        return func(*args, **(kwargs or {}))


class HostSyncs(L.Callback):
    """Count the host-device synchronisations of one training step (see the module docstring)."""

    def __init__(self, batch_index: int = 1):
        """
        Args:
            batch_index: The training batch counted (0 = the first; by default the second, after the
                first step's lazy initialisations). Leave it out of the timed batches: the counting
                slows the step.
        """
        self.batch_index = batch_index
        self.results: dict[str, Any] = {}
        self._seen = 0
        self._mode: Optional[_ScalarReads] = None
        self._warnings: Optional[warnings.catch_warnings] = None
        self._caught: list = []
        self._cuda = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._seen != self.batch_index:
            return
        self._cuda = pl_module.device.type == "cuda"
        if self._cuda:
            self._warnings = warnings.catch_warnings(record=True)
            self._caught = self._warnings.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        self._mode = _ScalarReads()
        self._mode.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._seen += 1
        if self._mode is None:
            return
        self._mode.__exit__(None, None, None)
        reads, self._mode = self._mode.sites, None
        on_device = Counter({site: n for (device, site), n in reads.items() if device != "cpu"})
        on_host = Counter({site: n for (device, site), n in reads.items() if device == "cpu"})
        result: dict[str, Any] = {"batch_index": self.batch_index, "device": pl_module.device.type,
                                  "device_reads": sum(on_device.values()), "device_read_sites": dict(on_device.most_common(8)),
                                  "host_reads": sum(on_host.values()), "host_read_sites": dict(on_host.most_common(8)),
                                  "cuda_syncs": None, "cuda_sync_sites": None}
        if self._cuda:
            torch.cuda.set_sync_debug_mode("default")
            self._warnings.__exit__(None, None, None)
            syncs = Counter(f"{w.filename.split('/')[-1]}:{w.lineno}" for w in self._caught
                            if _SYNC_WARNING in str(w.message))
            result["cuda_syncs"] = sum(syncs.values())
            result["cuda_sync_sites"] = dict(syncs.most_common(8))
            self._warnings, self._caught = None, []
        self.results = result

    def on_exception(self, trainer, pl_module, exception):
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None
        if self._warnings is not None:
            torch.cuda.set_sync_debug_mode("default")
            self._warnings.__exit__(None, None, None)
            self._warnings = None
