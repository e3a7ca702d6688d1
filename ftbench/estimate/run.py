"""One estimate: a backbone x tuner x objective on the meta device, stepped as a run steps it.

The model is built from its config on meta (:mod:`ftbench.estimate.meta`), the tuner prepares it
(``Tuner.prepare``: the one way a method is applied, through the objective's ``configure_model``), the
objective takes one training step on a full batch (every token real and trained), backward runs, and
the optimizer, made as a run's ``configure_optimizers`` makes it, takes one step on meta tensors (so its
state is the optimizer's own: 8-bit ones, GaLore's and APOLLO's projectors, BAdam's largest block). Each part is then read by the same functions :class:`ftbench.bench.memory.MemoryBreakdown`
uses on a real run.

Activations are what one step saves for a batch of ``batch_size`` x ``seq_len`` tokens with no
padding (a padded batch saves a boolean attention mask besides).
"""

from __future__ import annotations

import copy
import sys
import time
from typing import Any, Callable, Optional

import torch
import torch.fx.experimental._config as fx_config

from ftbench.bench.memory import (ActivationMeter, gradient_breakdown, optimizer_breakdown, predicted_peak,
                                  sharded_parts, weight_breakdown, SHARDED_PARTS)
from ftbench.errors import EstimateError, FTBenchError
from ftbench.estimate.meta import (MetaKernels, convert_true_precision, loading_on_meta, meta_model,
                                  optimizer_on_meta, precision_context, reward_runs_on_meta, sized_config)
from ftbench.estimate.options import optimizer_factory

PRECISIONS = {"32-true": "32-true", "32": "32-true", "fp32": "32-true", "bf16-mixed": "bf16-mixed",
              "bf16-true": "bf16-true", "bf16": "bf16-true"}

def check_sharding(strategy: str, world_size: int, quantization: str) -> None:
    """The strategy is known, N >= 1, and a quantized backbone is not sharded by FSDP (as a run refuses it:
    :func:`ftbench.objectives.sharding.check_shardable`)."""
    if strategy not in SHARDED_PARTS:
        raise EstimateError(f"estimate: --strategy {strategy!r} is not one of {', '.join(SHARDED_PARTS)}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise EstimateError(f"estimate: --world_size must be an integer >= 1, got {world_size!r}")
    if strategy == "fsdp" and world_size > 1 and quantization != "none":
        from ftbench.objectives.sharding import check_shardable

        try:
            check_shardable(quantization)
        except FTBenchError as err:
            raise EstimateError(f"estimate: --strategy fsdp: {err}") from None


def default_objective(backbone, tuner, optimizer: Callable):
    from ftbench.objectives.sft import SFT

    return SFT(backbone=backbone, tuner=tuner, optimizer=optimizer)


def full_batch(objective, batch_size: int, seq_len: int, device: str | torch.device = "meta") -> dict[str, Any]:
    """A batch of ``batch_size`` rows of ``seq_len`` real, trained tokens (an objective may say its
    own with ``memory_batch(batch_size, seq_len, device)``)."""
    maker = getattr(objective, "memory_batch", None)
    if callable(maker):
        return maker(batch_size, seq_len, device)
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.zeros_like(ids)}


class MetaRun:
    """One backbone x tuner x objective on the meta device, ready to take steps of any batch size."""

    def __init__(self, backbone, tuner, objective=None, optimizer: Any = "adamw", precision: str = "bf16-mixed",
                 strategy: str = "ddp", world_size: int = 1):
        if precision not in PRECISIONS:
            raise EstimateError(f"estimate: precision {precision!r} is not one of {', '.join(PRECISIONS)}")
        check_sharding(strategy, world_size, backbone.quantization)
        self.strategy, self.world_size = strategy, world_size  # one rank's share (sharded_parts) when N > 1
        self.precision = PRECISIONS[precision]
        self.backbone = backbone
        self.optimizer_factory = optimizer_factory(optimizer)
        self.objective = objective if objective is not None else default_objective(backbone, tuner,
                                                                                  self.optimizer_factory)
        config = sized_config(backbone)  # refused before anything is built when it cannot be a real model
        # what a tuner adds is made on meta too; reward runs (PPO's reward model and critic) stand in on meta
        with loading_on_meta(backbone, config), reward_runs_on_meta(backbone, config), torch.device("meta"):
            self.objective.configure_model()
        if self.precision == "bf16-true":
            convert_true_precision(self.objective, torch.bfloat16)
        self.objective.check_finite = lambda *a, **k: None  # reads the loss's value
        self.objective.log = lambda *a, **k: None  # no trainer to log to
        # as a run: the optimizer is made after the model and before the first step (BAdam leaves only its
        # first block trainable, so the weights' split, the gradients and the activations follow it)
        self.optimizer = meta_optimizer(self.objective, self.optimizer_factory)
        held = self.objective.held_models()
        if self.objective.holds_reward_model and not any(role.startswith("reward_model") for role in held):
            # a run loads it at its first score (GRPO's reward functions): the backbone with a score head,
            # frozen, stands for it here
            held["reward_model"] = meta_model(backbone, head="score", config=config).requires_grad_(False)
        self.weights = weight_breakdown(self.objective, held)
        self.params = self.objective.parameter_counts()
        self._optimizer: Optional[dict[str, Any]] = None
        self._block_gradients: Optional[dict[str, Any]] = None

    @property
    def model(self) -> torch.nn.Module:
        return self.objective.model

    def step(self, batch_size: int, seq_len: int) -> dict[str, Any]:
        """Forward and backward of one full batch: activations, largest transient, gradients."""
        obj = self.objective
        for p in obj.parameters():
            p.grad = None
        batch = full_batch(obj, batch_size, seq_len)
        kernels = MetaKernels(torch.bfloat16 if self.precision == "bf16-mixed" else None)
        meter = ActivationMeter(list(obj.parameters()) + list(obj.buffers()))
        # masks select with boolean indexing (the RL losses' metrics), which meta can size only by assuming
        # every element is selected: true of this batch, where every token is real and trained
        with precision_context(self.precision, kernels), fx_config.patch(meta_nonzero_assume_all_nonzero=True):
            meter.start()
            try:
                out = obj.training_step(batch, 0)
            finally:
                kernels.end_forward()
                parts = meter.stop()
            loss = out["loss"] if isinstance(out, dict) else out
            _backward(loss)  # in the mode too: checkpointed blocks recompute with the same kernels and casts
        del out, loss
        parts = dict(parts)
        parts["gradients"] = gradient_breakdown(obj.parameters())
        return parts

    def optimizer_state(self) -> dict[str, Any]:
        """The optimizer's state after its first step on the gradients of the last :meth:`step` (BAdam:
        the largest over its blocks, see :func:`step_on_meta`)."""
        if self._optimizer is None:
            if self.optimizer is None:
                self._optimizer = optimizer_breakdown([])
            else:
                opt = self.optimizer
                self._optimizer, self._block_gradients = step_on_meta(opt)
                self._optimizer["class"] = f"{type(opt).__module__}.{type(opt).__name__}"
        return self._optimizer

    def breakdown(self, batch_size: int, seq_len: int) -> dict[str, Any]:
        """The same dict :class:`~ftbench.bench.memory.MemoryBreakdown` records for a real run."""
        parts = self.step(batch_size, seq_len)
        parts["optimizer"] = self.optimizer_state()
        if self._block_gradients is not None and self._block_gradients["bytes"] > parts["gradients"]["bytes"]:
            parts["gradients"] = self._block_gradients  # BAdam: the largest block's, as a run's breakdown keeps
        parts["weights"] = self.weights
        parts["device"] = "meta"
        parts["batch_shape"] = [batch_size, seq_len]
        parts["params"] = self.params
        parts["predicted_peak_bytes"] = predicted_peak(parts)
        if self.world_size > 1:
            parts = sharded_parts(parts, self.strategy, self.world_size)
        return parts

    def largest_batch(self, seq_len: int, budget: int, known: Optional[tuple[int, int]] = None,
                      limit: int = 1 << 16) -> int:
        """The largest batch size whose predicted peak fits in ``budget`` bytes (0 if none).

        The peak is affine in the batch size (every part that grows, grows by what one row saves; on
        the tiny and 1B models the line holds to a few kB): two steps give the line (``known`` is a
        (batch size, peak) already computed), one step at the answer confirms it, and a neighbour is
        stepped to only where the line leaves less than 1% of a row's bytes of doubt."""
        cache: dict[int, int] = {}
        if known is not None:
            cache[known[0]] = known[1]

        def peak(b: int) -> int:
            if b not in cache:
                cache[b] = self.breakdown(b, seq_len)["predicted_peak_bytes"]
            return cache[b]

        if peak(1) > budget:
            return 0
        other = known[0] if known is not None and known[0] > 1 else 2
        slope = (peak(other) - peak(1)) / (other - 1)
        if slope <= 0:
            return limit
        b = min(limit, 1 + int((budget - peak(1)) // slope))
        while b > 1 and peak(b) > budget:
            b -= 1
        while b < limit and budget - (peak(b) + slope) > -0.01 * slope and peak(b + 1) <= budget:
            b += 1
        return b


def meta_optimizer(objective, factory: Callable) -> Optional[torch.optim.Optimizer]:
    """The optimizer a run's ``configure_optimizers`` makes (named parameters, the tuner's grouping and
    rate: :func:`ftbench.objectives.optim.make_optimizer`), or None when nothing trains."""
    from ftbench.objectives.optim import make_optimizer

    if not any(p.requires_grad for p in objective.model.parameters()):
        return None
    opt = make_optimizer(objective.model, objective.tuner, factory, objective.method_label,
                         objective.trained_beside_policy())
    if getattr(opt, "is_paged", False):
        # bitsandbytes' paged states are CUDA unified memory of the same dtypes and shapes; there is
        # none on meta (or without CUDA), so they are made as plain tensors here
        opt.is_paged = False
    return opt


def step_on_meta(opt: torch.optim.Optimizer) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
    """Step ``opt`` on the gradients it has and read its state as a run's breakdown does, before and after
    the step, the largest kept. badam's BlockOptimizer is stepped on through every block
    (``switch_block_every`` steps each, empty gradients for the active block), since a run keeps the
    largest block's state and gradients over its timed steps; the second value is the largest block's
    gradients (else None). The model's trainable flags are put back after (later steps see the first block)."""
    reads = [optimizer_breakdown([opt])]
    with optimizer_on_meta():
        opt.step()
    reads.append(optimizer_breakdown([opt]))
    badam = sys.modules.get("badam")
    block_grads: Optional[dict[str, Any]] = None
    if badam is not None and isinstance(opt, badam.BlockOptimizer):
        params = [p for group in opt.param_groups for p in group["params"]]
        trainable = [p.requires_grad for p in params]
        for _ in range(opt.block_num * opt.switch_block_every):
            for p in params:
                p.grad = torch.empty_like(p) if p.requires_grad else None
            grads = gradient_breakdown(params)
            if block_grads is None or grads["bytes"] > block_grads["bytes"]:
                block_grads = grads
            reads.append(optimizer_breakdown([opt]))
            with optimizer_on_meta():
                opt.step()
            reads.append(optimizer_breakdown([opt]))
        for p, flag in zip(params, trainable):
            p.requires_grad_(flag)
            p.grad = None
    return max(reads, key=lambda r: r["bytes"]), block_grads


def _backward(loss: torch.Tensor) -> None:
    """``loss.backward()`` with the torch-function mode still active (``Tensor.backward`` would hand
    itself to the mode, which runs it with the mode off, and checkpoint recomputation needs it on)."""
    from torch.autograd.graph import _engine_run_backward

    _engine_run_backward((loss,), (torch.ones_like(loss),), False, False, (), allow_unreachable=True,
                         accumulate_grad=True)


def estimate(backbone, tuner, objective=None, *, batch_size: int = 1, seq_len: int = 512,
             precision: str = "bf16-mixed", optimizer: Any = "adamw",
             gradient_checkpointing: Optional[bool] = None, gpu_memory: Optional[int] = None,
             strategy: str = "ddp", world_size: int = 1) -> dict[str, Any]:
    """The memory breakdown of one training step of ``tuner`` on ``backbone`` (no weights read): with
    ``world_size`` N > 1, one rank's share under ``strategy`` (``ddp``, ``zero1``, ``zero2``, ``zero3``,
    ``fsdp``: :data:`~ftbench.bench.memory.SHARDED_PARTS`; ``batch_size`` is then per rank).

    Returns the dict a run records as ``train_info.memory_breakdown`` (bytes), plus ``method``,
    ``params`` (trainable/total), the settings, and with ``gpu_memory`` (bytes) ``max_batch_size``.
    """
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise EstimateError(f"estimate: {name} must be an integer >= 1, got {value!r}")
    if gpu_memory is not None and not gpu_memory > 0:
        raise EstimateError(f"estimate: gpu_memory must be > 0 bytes, got {gpu_memory!r}")
    if gradient_checkpointing is not None and gradient_checkpointing != backbone.gradient_checkpointing:
        backbone = copy.copy(backbone)
        backbone.gradient_checkpointing = gradient_checkpointing
    t0 = time.perf_counter()
    run = MetaRun(backbone, tuner, objective, optimizer=optimizer, precision=precision, strategy=strategy,
                  world_size=world_size)
    out = run.breakdown(batch_size, seq_len)
    out["method"] = getattr(run.objective, "method_label", None) or getattr(tuner, "name", "?")
    out["settings"] = {"batch_size": batch_size, "seq_len": seq_len, "precision": run.precision,
                       "optimizer": out["optimizer"].get("class"), "dtype": backbone.dtype,
                       "quantization": backbone.quantization, "double_quant": backbone.double_quant,
                       "gradient_checkpointing": backbone.gradient_checkpointing, "model": backbone.model,
                       "liger_kernel": backbone.liger_kernel}
    if gpu_memory is not None:
        out["gpu_memory_bytes"] = gpu_memory
        out["max_batch_size"] = run.largest_batch(seq_len, gpu_memory, known=(batch_size, out["predicted_peak_bytes"]))
    out["seconds"] = time.perf_counter() - t0
    return out


