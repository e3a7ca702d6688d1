"""Where a training step's memory goes, measured from the tensors themselves, in bytes.

:class:`MemoryBreakdown` is a Lightning callback; its :attr:`~MemoryBreakdown.results` is what the
record stores as ``train_info.memory_breakdown``. It reads the same numbers on CPU, on CUDA and on the
meta device (where :mod:`ftbench.estimate` runs a step without weights), because it looks at tensors
and storages, never at an allocator:

* **weights** - every parameter and buffer of the module, each storage once (tied embeddings once),
  by storage format (``float32``, ``bfloat16``, ``bnb-nf4``, ``bnb-int8`` ...) and by
  trainable/frozen. A 4-bit weight counts its packed bytes plus its quantisation state (absmax, code,
  and with double quantisation the 8-bit absmax, its offset and the second-level absmax and code); an
  8-bit weight its int8 bytes plus its float32 row scales (``SCB``). ``held``: the bytes of each
  model the objective holds besides the policy (``Objective.held_models``: a frozen reference copy, a
  reward model, a critic), which are in the totals too.
* **gradients** - the ``.grad`` tensors after the backward of the measured batch (read in
  ``on_before_optimizer_step``), each storage once.
* **optimizer** - every tensor the optimizer keeps between steps (:func:`optimizer_state_tensors`):
  AdamW's two moments *and* its ``step`` counters (one float32 scalar per trained tensor, reported as
  ``step_tensors``/``step_bytes``; torch keeps them on the host unless ``capturable``/``fused``),
  bitsandbytes' 8-bit states with their block absmax and quantile maps (maps shared by all tensors
  counted once), paged states at their real size, GaLore's and APOLLO's projection matrices and
  projected moments, BAdam's moments and float32 copy of the active block, Muon's momentum,
  Adafactor's factored moments. It is read before and after every step from ``batch_index`` on and
  the largest is kept (``at_batch``: the batch of that step): where the state changes from step to
  step (BAdam's next block; GaLore's refreshed projector) one step could mislead. The gradients
  likewise (the largest over those steps).
* **activations** - what autograd saves for backward during one training step: a
  ``saved_tensors_hooks`` pack hook is pushed at ``on_train_batch_start`` of batch ``batch_index``
  (after warm-up) and popped at ``on_before_backward``. Each storage is counted once (views and
  ``t()`` of a tensor share it) and only if it is still alive when backward starts; storages of
  parameters and buffers are left out (they are the weights). Under autocast the low-precision copies
  of the weights that matmuls save are activations: they live until backward. With gradient
  checkpointing the checkpointed blocks save only their inputs, which is its saving.
  ``other_live_bytes``: storages the forward created that are not saved for backward but still
  alive when it starts (what the training step keeps, e.g. its outputs).
* **largest_transient** - the largest single storage the forward creates that is neither saved for
  backward nor alive when backward starts (a ``TorchDispatchMode`` sees every op's outputs), e.g. the
  float32 logits a loss upcasts over the whole vocabulary. Backward creates the gradient with respect
  to that tensor, of the same size, at its start, on top of the saved activations.

Under a strategy of several processes every part is what this rank holds (a sharded tensor counts its
local shard: :func:`ftbench.storage.storage_key`), and ``sharding`` says which parts the strategy splits
N ways (:data:`SHARDED_PARTS`: FSDP's FULL_SHARD and ZeRO-3 all three, ZeRO-2 gradients and optimizer
state, DDP none); :func:`sharded_parts` makes a rank's share from a whole-model breakdown (the estimate's).

``predicted_peak_bytes`` is weights + gradients + optimizer state + activations (saved and other
live) + the largest transient: a conservative device peak (a gradient and the activation it
replaces are not both alive in reality; the optimizer's own temporaries are left out). The measured
peak (``memory.peak_bytes``: CUDA's allocated peak, or the host's resident peak on CPU) sits next to
it in the record.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable, Iterator, Optional

import lightning as L
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ftbench.objectives.base import Objective
from ftbench.storage import dtype_name, numel, quant_state_tensors, storage_key, storage_of

try:  # a weak reference to a storage: its address is not reused while we hold it
    from torch.multiprocessing.reductions import StorageWeakRef
except ImportError:  # pragma: no cover - every supported torch has it
    StorageWeakRef = None  # type: ignore[assignment]


# ---------------------------------------------------------------------- storages
def _add(d: dict[str, int], key: str, n: int) -> None:
    d[key] = d.get(key, 0) + n


# ---------------------------------------------------------------------- the parts
def weight_breakdown(model: torch.nn.Module, held: Optional[dict[str, torch.nn.Module]] = None) -> dict[str, Any]:
    """Bytes of every parameter and buffer of ``model``, each storage once, by storage format and
    by trainable/frozen, with quantisation state included in its weight's format.

    ``held``: the models an objective holds besides the policy, by role (``Objective.held_models``):
    ``held`` gives each one's bytes; one that is not part of ``model`` (a reward model a reward
    function keeps) is counted in the totals too."""
    seen: set[int] = set()
    by_format: dict[str, int] = {}
    out = {"trainable_bytes": 0, "frozen_bytes": 0, "trainable_params": 0, "frozen_params": 0,
           "quant_state_bytes": 0, "buffer_bytes": 0}
    for module in [model, *(held or {}).values()]:
        _count_weights(module, seen, by_format, out)
    out["bytes"] = out["trainable_bytes"] + out["frozen_bytes"] + out["buffer_bytes"]
    out["by_format"] = dict(sorted(by_format.items()))
    if held:
        out["held"] = {role: weight_breakdown(module)["bytes"] for role, module in held.items()}
    return out


def _count_weights(model: torch.nn.Module, seen: set[int], by_format: dict[str, int], out: dict[str, Any]) -> None:
    """Add the storages of ``model``'s parameters and buffers not in ``seen`` to ``by_format`` and ``out``."""
    owners = {id(p): mod for mod in model.modules() for p in mod.parameters(recurse=False)}
    for p in model.parameters():
        key, nbytes = storage_key(p)
        if key in seen:
            continue
        seen.add(key)
        fmt, _ = storage_of(p, owners.get(id(p)))
        for t in quant_state_tensors(p, owners.get(id(p))):
            k, n = storage_key(t)
            if k not in seen:
                seen.add(k)
                nbytes += n
                out["quant_state_bytes"] += n
        _add(by_format, fmt, nbytes)
        kind = "trainable" if p.requires_grad else "frozen"
        out[f"{kind}_bytes"] += nbytes
        out[f"{kind}_params"] += numel(p)
    for b in model.buffers():
        key, nbytes = storage_key(b)
        if key not in seen:
            seen.add(key)
            out["buffer_bytes"] += nbytes


def gradient_breakdown(params: Iterable[torch.Tensor]) -> dict[str, Any]:
    """Bytes of the ``.grad`` of ``params``, each storage once, by dtype."""
    seen: set[int] = set()
    by_dtype: dict[str, int] = {}
    tensors = 0
    for p in params:
        g = p.grad
        if g is None:
            continue
        key, nbytes = storage_key(g)
        if key in seen:
            continue
        seen.add(key)
        tensors += 1
        _add(by_dtype, dtype_name(g.dtype), nbytes)
    return {"bytes": sum(by_dtype.values()), "tensors": tensors, "by_dtype": by_dtype}


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor an optimizer keeps from one step to the next, with the name of its state entry:

    * the tensors of ``optimizer.state`` (nested containers too): AdamW's moments and ``step``,
      Muon's ``momentum_buffer``, Adafactor's factored ``row_var``/``col_var``, bitsandbytes' 8-bit
      ``state1``/``state2`` with their absmax and quantile maps, APOLLO's norm-limiter scalar;
    * the tensors held by an object in the state, under that entry's name: GaLore's and APOLLO's
      ``projector`` keeps its projection matrix (``ortho_matrix``, a list of two for GaLore's ``full``);
    * for badam's ``BlockOptimizer``, which wraps its base optimizer and keeps none of its own, the base
      optimizer's state and the float32 copies of the active block it steps (``master_weights``:
      ``param_idx2hp``, outside any state).
    """
    optimizer = getattr(optimizer, "optimizer", optimizer)  # Lightning's LightningOptimizer wraps the real one
    badam = sys.modules.get("badam")  # loaded if (and only if) a BlockOptimizer can exist
    if badam is not None and isinstance(optimizer, badam.BlockOptimizer):
        for t in getattr(optimizer, "param_idx2hp", {}).values():
            yield "master_weights", t
        optimizer = optimizer.base_optimizer
    for state in optimizer.state.values():
        for name, value in state.items():
            for leaf in tree_leaves(value):
                if isinstance(leaf, torch.Tensor):
                    yield name, leaf
                elif hasattr(leaf, "__dict__"):  # e.g. GaLoreProjector: its tensors are attributes
                    for t in tree_leaves(vars(leaf)):
                        if isinstance(t, torch.Tensor):
                            yield name, t


def optimizer_breakdown(optimizers: Iterable[torch.optim.Optimizer]) -> dict[str, Any]:
    """Bytes of every tensor the optimizers keep (:func:`optimizer_state_tensors`), each storage once,
    by dtype, by device and by state entry (``by_entry``: ``exp_avg``, ``projector``, ``master_weights``
    ...); the per-tensor ``step`` counters separately too (they are part of ``bytes``)."""
    seen: set[int] = set()
    by_dtype: dict[str, int] = {}
    by_device: dict[str, int] = {}
    by_entry: dict[str, int] = {}
    tensors = step_tensors = step_bytes = 0
    for opt in optimizers:
        for name, t in optimizer_state_tensors(opt):
            key, nbytes = storage_key(t)
            if key in seen:
                continue
            seen.add(key)
            tensors += 1
            _add(by_dtype, dtype_name(t.dtype), nbytes)
            _add(by_device, t.device.type, nbytes)
            _add(by_entry, name, nbytes)
            if name == "step":
                step_tensors += 1
                step_bytes += nbytes
    return {"bytes": sum(by_dtype.values()), "tensors": tensors, "by_dtype": by_dtype, "by_device": by_device,
            "by_entry": dict(sorted(by_entry.items())), "step_tensors": step_tensors, "step_bytes": step_bytes}


# ---------------------------------------------------------------------- activations
class _Created(TorchDispatchMode):
    """Sees the outputs of every op below autograd; remembers each new storage weakly."""

    def __init__(self, meter: "ActivationMeter"):
        super().__init__()
        self.meter = meter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.meter._created(t, func)
        return out


class ActivationMeter:
    """What one forward leaves for backward: enter before the forward, leave before the backward.

    ``exclude`` are tensors whose storages are not activations (the parameters and buffers: they are
    the weights). Usable as a context manager or with :meth:`start` / :meth:`stop` from two hooks.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = (), track_created: bool = True):
        self._exclude = {storage_key(t)[0] for t in exclude}
        self._track_created = track_created
        self._saved: dict[int, tuple[Any, int]] = {}
        self._made: dict[int, tuple[Any, int, str, tuple, str]] = {}
        self._hooks = None
        self._mode: Optional[_Created] = None
        self.results: Optional[dict[str, Any]] = None

    # the pack hook keeps what autograd saves unchanged; it only notes the storage
    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key, nbytes = storage_key(t)
        if key not in self._exclude and key not in self._saved:
            self._saved[key] = (_weak(t), nbytes)
        return t

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def _created(self, t: torch.Tensor, func) -> None:
        key, nbytes = storage_key(t)
        if key in self._exclude or key in self._made:
            return
        self._made[key] = (_weak(t), nbytes, dtype_name(t.dtype), tuple(t.shape), str(func))

    @property
    def active(self) -> bool:
        return self._hooks is not None

    def start(self) -> None:
        if self.active:
            return
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        if self._track_created:
            self._mode = _Created(self)
            self._mode.__enter__()

    def stop(self) -> dict[str, Any]:
        if not self.active:
            return self.results or {}
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None
        self._hooks.__exit__(None, None, None)
        self._hooks = None
        saved = {k: n for k, (ref, n) in self._saved.items() if _alive(ref)}
        other_live = 0
        transient = {"bytes": 0, "dtype": None, "shape": None, "op": None}
        for k, (ref, n, dtype, shape, op) in self._made.items():
            if k in saved or k in self._saved:
                continue
            if _alive(ref):
                other_live += n
            elif n > transient["bytes"]:
                transient = {"bytes": n, "dtype": dtype, "shape": list(shape), "op": op}
        self.results = {
            "activations": {"bytes": sum(saved.values()), "storages": len(saved), "other_live_bytes": other_live},
            "largest_transient": transient if self._track_created else {"bytes": 0, "op": "not tracked"},
        }
        self._saved.clear()
        self._made.clear()
        return self.results

    def __enter__(self) -> "ActivationMeter":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _weak(t: torch.Tensor):
    try:
        return StorageWeakRef(t.untyped_storage())
    except (RuntimeError, NotImplementedError, TypeError):
        return None  # storage-less tensor: treated as alive (counted, never a transient)


def _alive(ref) -> bool:
    return ref is None or not ref.expired()


# ---------------------------------------------------------------------- several processes, one model
#: which parts of the breakdown a strategy splits across its N data-parallel processes (each rank
#: holds about 1/N of them): DDP none (a full replica per rank); ZeRO-1 the optimizer state; ZeRO-2
#: the gradients too; ZeRO-3 and FSDP's FULL_SHARD (FSDP1 or FSDP2's fully_shard) the weights too;
#: FSDP's SHARD_GRAD_OP as ZeRO-2. Activations are never split: each rank runs its own rows.
SHARDED_PARTS: dict[str, tuple[str, ...]] = {
    "ddp": (), "zero1": ("optimizer",), "zero2": ("gradients", "optimizer"),
    "zero3": ("weights", "gradients", "optimizer"), "fsdp": ("weights", "gradients", "optimizer"),
}


def strategy_kind(strategy: Any) -> Optional[str]:
    """The :data:`SHARDED_PARTS` key of a Lightning strategy object, or None for a single process."""
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    if isinstance(strategy, ModelParallelStrategy):
        return "fsdp"  # ftbench applies fully_shard to every block (ftbench/objectives/sharding.py)
    if isinstance(strategy, FSDPStrategy):
        name = getattr(strategy.sharding_strategy, "name", str(strategy.sharding_strategy))
        return {"NO_SHARD": "ddp", "SHARD_GRAD_OP": "zero2", "_HYBRID_SHARD_ZERO2": "zero2"}.get(name, "fsdp")
    if isinstance(strategy, DeepSpeedStrategy):
        stage = (strategy.config or {}).get("zero_optimization", {}).get("stage", 0)
        return {0: "ddp", 1: "zero1", 2: "zero2", 3: "zero3"}[int(stage)]
    if isinstance(strategy, DDPStrategy):
        return "ddp"
    return None


def sharded_parts(parts: dict[str, Any], kind: str, world_size: int) -> dict[str, Any]:
    """One rank's share of a whole-model breakdown when ``kind`` (:data:`SHARDED_PARTS`) splits it over
    ``world_size`` processes (what ``ftbench estimate --strategy --world_size`` prints).

    A split part is its bytes / N, rounded up. What stays whole on every rank: the buffers (FSDP and
    ZeRO-3 shard parameters only) and the optimizer's per-tensor ``step`` counters (a scalar for each
    parameter's shard). Each tensor split on its first dimension, as FSDP2 does, gives rank 0 up to one
    row more per tensor where N does not divide it (a padded row): ~1/N, not exact, then."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in parts.items()}

    def share(n: int) -> int:
        return -(-int(n) // world_size)

    split = SHARDED_PARTS[kind]
    if "weights" in split and "weights" in out:
        w = out["weights"]
        for key in ("trainable_bytes", "frozen_bytes", "quant_state_bytes"):
            w[key] = share(w.get(key, 0))
        w["by_format"] = {k: share(v) for k, v in (w.get("by_format") or {}).items()}
        w["bytes"] = w["trainable_bytes"] + w["frozen_bytes"] + w.get("buffer_bytes", 0)
    if "gradients" in split and "gradients" in out:
        g = out["gradients"]
        g["by_dtype"] = {k: share(v) for k, v in (g.get("by_dtype") or {}).items()}
        g["bytes"] = sum(g["by_dtype"].values())
    if "optimizer" in split and "optimizer" in out:
        o = out["optimizer"]
        steps = o.get("step_bytes", 0)
        o["bytes"] = share(o["bytes"] - steps) + steps
        o["by_entry"] = {k: (v if k == "step" else share(v)) for k, v in (o.get("by_entry") or {}).items()}
        for key in ("by_dtype", "by_device"):  # the whole model's; by_entry says the rank's share
            o.pop(key, None)
    out["sharding"] = {"strategy": kind, "world_size": world_size, "sharded": list(split)}
    out["predicted_peak_bytes"] = predicted_peak(out)
    return out


# ---------------------------------------------------------------------- the whole step
def predicted_peak(parts: dict[str, Any]) -> int:
    """weights + gradients + optimizer state + activations (saved and other live) + largest transient."""
    act = parts.get("activations") or {}
    return int((parts.get("weights") or {}).get("bytes", 0) + (parts.get("gradients") or {}).get("bytes", 0)
               + (parts.get("optimizer") or {}).get("bytes", 0) + act.get("bytes", 0) + act.get("other_live_bytes", 0)
               + (parts.get("largest_transient") or {}).get("bytes", 0))


class MemoryBreakdown(L.Callback):
    """Weights, gradients, optimizer state, activations and the largest transient of one training
    step, exactly, in bytes (see the module docstring). ``results`` is the record's
    ``train_info.memory_breakdown``; it is complete once a training batch after ``batch_index`` has
    ended (``results["complete"]``).
    """

    def __init__(self, batch_index: int = 1, track_transient: bool = True):
        """
        Args:
            batch_index: Which training batch (counted from 0 over the whole fit) is measured; the
                default leaves the first out as warm-up (lazy initialisations).
            track_transient: Watch every op of the measured forward for the largest transient
                (a ``TorchDispatchMode``: slower for that one forward).
        """
        if batch_index < 0:
            raise ValueError(f"MemoryBreakdown: batch_index must be >= 0, got {batch_index}")
        self.batch_index = batch_index
        self.track_transient = track_transient
        self._batches = 0
        self._meter: Optional[ActivationMeter] = None
        self._parts: dict[str, Any] = {}

    # ------------------------------------------------------------------ hooks
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._batches == self.batch_index and "activations" not in self._parts:
            kind = strategy_kind(trainer.strategy)
            if kind is not None:  # the parts below are this rank's: the split ones are ~1/N of the model's
                self._parts["sharding"] = {"strategy": kind, "world_size": trainer.world_size,
                                           "sharded": list(SHARDED_PARTS[kind]) if trainer.world_size > 1 else []}
            held = pl_module.held_models() if isinstance(pl_module, Objective) else None
            self._parts["weights"] = weight_breakdown(pl_module, held)
            self._parts["device"] = pl_module.device.type
            shape = _batch_shape(batch)
            if shape is not None:
                self._parts["batch_shape"] = shape
            self._meter = ActivationMeter(list(pl_module.parameters()) + list(pl_module.buffers()),
                                          track_created=self.track_transient)
            self._meter.start()

    def on_before_backward(self, trainer, pl_module, loss):
        self._close()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._close()  # a training step that never called backward (manual optimisation)
        if "activations" in self._parts:
            grads = gradient_breakdown(pl_module.parameters())
            if grads["bytes"] >= self._parts.get("gradients", {}).get("bytes", 0):
                self._parts["gradients"] = grads  # the largest over the timed steps (BAdam: per block)
            self._read_optimizer(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._close()
        self._batches += 1
        if "activations" in self._parts:
            self._read_optimizer(trainer, self._batches - 1)

    def _read_optimizer(self, trainer, batch: Optional[int] = None) -> None:
        """Keep the largest optimizer state seen over the timed steps, read before and after each step:
        the state can change from step to step (GaLore's projector refresh; BAdam's switch to another
        block, which happens inside ``step`` and clears the state, so the full state of a block is seen
        before the step that ends it)."""
        opt = optimizer_breakdown(trainer.optimizers)
        if (opt["tensors"] or not _has_state_kind(trainer.optimizers)) and \
                opt["bytes"] > self._parts.get("optimizer", {}).get("bytes", -1):
            opt["at_batch"] = self._batches if batch is None else batch
            self._parts["optimizer"] = opt

    def on_exception(self, trainer, pl_module, exception):
        self._close()

    def teardown(self, trainer, pl_module, stage):
        self._close()

    def _close(self) -> None:
        if self._meter is not None and self._meter.active:
            self._parts.update(self._meter.stop())
            self._meter = None

    # ------------------------------------------------------------------ the result
    @property
    def results(self) -> dict[str, Any]:
        """The breakdown (bytes); ``complete`` is False until every part has been read."""
        parts = dict(self._parts)
        parts["batch_index"] = self.batch_index
        parts["complete"] = all(k in parts for k in ("weights", "gradients", "optimizer", "activations"))
        parts["predicted_peak_bytes"] = predicted_peak(parts)
        return parts


def _batch_shape(batch: Any) -> Optional[list[int]]:
    ids = batch.get("input_ids") if isinstance(batch, dict) else None
    return list(ids.shape) if isinstance(ids, torch.Tensor) else None


def _has_state_kind(optimizers) -> bool:
    """Whether an optimizer keeps state at all (plain SGD without momentum keeps none)."""
    for opt in optimizers:
        opt = getattr(opt, "optimizer", opt)
        defaults = getattr(opt, "defaults", {})
        if isinstance(opt, torch.optim.SGD) and not defaults.get("momentum"):
            continue
        return True
    return False
