"""``ftbench estimate``: the memory breakdown of a training step for any model, without its weights.

The model is built from its config alone on the meta device (a local folder with ``config.json``, a
cached hub id, a GGUF file's metadata, or the embedded model; no weight is read), then treated as a
run treats it: the backbone's quantization is applied by bitsandbytes itself (its quantize functions
on meta tensors give exactly the packed weights, block absmax, codes and double-quantization state it
stores), the tuner prepares it (``Tuner.prepare``: the one way a method is applied), the objective
takes one training step on a full batch (every token real and trained), backward runs, and the
optimizer takes one step on meta tensors (so its state is the optimizer's own, 8-bit ones included).
Each part is then read by the same functions :class:`ftbench.bench.memory.MemoryBreakdown` uses on
a real run.

What the meta device would get wrong, and is put right here:

* transformers' mask preparation reads tensor values (``.item()``); for a full batch the real run
  passes no mask to the attention (``is_causal``), so on meta the attention runs under an
  implementation name with no mask preparation, same ``sdpa_attention_forward``;
* ``scaled_dot_product_attention`` on meta picks the math kernel, which saves the B x H x T x T
  attention weights; a GPU (and a CPU) runs a fused kernel that saves q, k, v, the output and a
  float32 log-sum-exp. The estimate calls that fused kernel (PyTorch's CPU flash attention op,
  which has a meta implementation and the same saved tensors). On CUDA, float32 with grouped-query
  attention can fall back to the math kernel; the estimate does not model that fallback;
* autocast ignores meta tensors: for ``bf16-mixed`` the casts autocast makes (inputs of matmuls,
  linear layers and attention to bfloat16; float32 leaves that require grad cast once per step) are
  made by a ``TorchFunctionMode``. Code that asks ``torch.is_autocast_enabled()`` sees False, as on
  a CPU run: peft's LoRA layers on bitsandbytes weights then cast their input to the adapter's
  dtype, which under CUDA autocast they skip (a difference only where that input is not already
  float32, i.e. a bfloat16 backbone with ``prepare_kbit: false``).

Activations are what one step saves for a batch of ``batch_size`` x ``seq_len`` tokens with no
padding (a padded batch saves a boolean attention mask besides).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from ftbench.bench.memory import (ActivationMeter, gradient_breakdown, optimizer_breakdown, predicted_peak,
                                  weight_breakdown)

ROOT = Path(__file__).resolve().parent.parent
PRECISIONS = {"32-true": "32-true", "32": "32-true", "fp32": "32-true", "bf16-mixed": "bf16-mixed",
              "bf16-true": "bf16-true", "bf16": "bf16-true"}
OPTIMIZERS = {
    "adamw": ("torch.optim.AdamW", {"lr": 1e-3, "weight_decay": 0.0}),
    "adamw8bit": ("bitsandbytes.optim.AdamW8bit", {"lr": 1e-3, "weight_decay": 0.0}),
    "paged_adamw8bit": ("bitsandbytes.optim.PagedAdamW8bit", {"lr": 1e-3, "weight_decay": 0.0}),
    "sgd": ("torch.optim.SGD", {"lr": 1e-3}),
    "sgd_momentum": ("torch.optim.SGD", {"lr": 1e-3, "momentum": 0.9}),
}
_META_ATTENTION = "ftbench_meta_{}"
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class EstimateError(ValueError):
    """An estimate that cannot be made as asked."""


# ---------------------------------------------------------------------- the config, no weights
def read_config(backbone):
    """The model's transformers config, read without touching a weight.

    A GGUF file (``embedded``, a ``.gguf`` path, or ``gguf_file`` in a folder or cached hub repo)
    is read from ftbench's converted cache when that exists (its ``config.json``), else from the
    GGUF metadata (slower: transformers parses the whole header, tokenizer included).
    """
    from transformers import AutoConfig

    from ftbench import gguf_cache
    from ftbench.backbone import EMBEDDED
    from ftbench.errors import BackboneError

    kw: dict[str, Any] = {"trust_remote_code": backbone.trust_remote_code}
    path = Path(backbone.model).expanduser()
    gguf: Optional[Path] = None
    if backbone.model == EMBEDDED:
        gguf = gguf_cache.embedded_gguf()
    elif path.suffix == ".gguf":
        gguf = path
    elif backbone.gguf_file:
        if path.exists():
            gguf = path / backbone.gguf_file
        else:
            from huggingface_hub import try_to_load_from_cache

            local = try_to_load_from_cache(backbone.model, backbone.gguf_file, revision=backbone.revision)
            if not isinstance(local, str):
                raise EstimateError(f"estimate: {backbone.gguf_file!r} of hub id {backbone.model!r} is not in "
                                    "the local cache (the estimate never downloads)")
            gguf = Path(local)
    if gguf is not None:
        if not gguf.is_file():
            raise EstimateError(f"estimate: GGUF file {str(gguf)!r} does not exist")
        root = Path(backbone.cache_dir).expanduser() if backbone.cache_dir else gguf_cache.default_cache_dir()
        cached = root / "models" / f"{gguf.stem}-{gguf_cache._fingerprint(gguf.resolve())}"
        if gguf_cache._valid(cached):
            return AutoConfig.from_pretrained(str(cached), **kw)
        return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name, **kw)
    if path.exists():
        if not (path / "config.json").is_file():
            raise BackboneError(f"backbone.model: {str(path)!r} is not a model folder (no config.json in it)")
        return AutoConfig.from_pretrained(str(path), **kw)
    try:  # a hub id: only from the local cache (never a network wait)
        return AutoConfig.from_pretrained(backbone.model, local_files_only=True, revision=backbone.revision, **kw)
    except OSError as err:
        raise EstimateError(f"estimate: no config for {backbone.model!r}: not a folder, a .gguf file, or a hub id "
                            f"in the local cache ({err})") from err


def _register_meta_attention(name: str) -> str:
    """An attention implementation name with no mask preparation (see the module docstring) that
    runs transformers' own ``sdpa`` (or ``eager``) attention function."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if name == "eager":
        from transformers.models.llama.modeling_llama import eager_attention_forward as fn
    else:  # sdpa, flash attention and kernels all save about what a fused kernel saves
        name, fn = "sdpa", sdpa_attention_forward
    key = _META_ATTENTION.format(name)
    AttentionInterface.register(key, fn)
    return key


def meta_model(backbone, head: str = "causal_lm") -> torch.nn.Module:
    """The backbone's model as :meth:`Backbone.load_model` returns it, on the meta device."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = read_config(backbone)
    if head == "score":
        config.num_labels = 1
    elif head != "causal_lm":
        raise EstimateError(f"estimate: unknown head {head!r} (causal_lm or score)")
    auto = AutoModelForSequenceClassification if head == "score" else AutoModelForCausalLM
    attn = _register_meta_attention(backbone.attn_implementation or "sdpa")
    with torch.device("meta"):
        model = auto.from_config(config, dtype=backbone.torch_dtype, attn_implementation=attn,
                                 trust_remote_code=backbone.trust_remote_code)
    qconfig = backbone.quantization_config()
    if qconfig is not None:
        quantize_on_meta(model, qconfig)
    if backbone.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.ftbench_head = head
    return model


def quantize_on_meta(model: torch.nn.Module, qconfig) -> torch.nn.Module:
    """Quantize ``model`` (on meta) as a quantized load does: transformers chooses and replaces the
    linear layers (its quantizer, so the same layers stay unquantized), and bitsandbytes quantizes
    each weight on the meta device (packed weight, absmax, code, double-quant state, int8 row scales
    with exactly the shapes and dtypes it stores)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_functional
    from transformers.quantizers import AutoHfQuantizer

    from ftbench.quantization import after_quantized_load

    with torch.device("cpu"):  # as in a real load: bitsandbytes' own tensors default to the host
        if "dynamic" not in bnb_functional.name2qmap:
            # double quantization caches its quantile map on the first input's device, for the whole
            # process: made here on the host, a later real load never finds a meta map there
            bnb_functional.name2qmap["dynamic"] = bnb_functional.create_dynamic_map()
        quantizer = AutoHfQuantizer.from_config(qconfig, pre_quantized=False)
        quantizer.preprocess_model(model, device_map=None)
        for module in model.modules():
            if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
                module.weight._quantize("meta")
            if isinstance(module, bnb.nn.Linear8bitLt):
                # LLM.int8()'s outlier columns depend on the activations' values, which meta tensors do
                # not have: no outlier decomposition here (bitsandbytes keeps those columns' inputs in
                # ctx attributes, which autograd's saved-tensor hooks do not see in a real run either)
                module.state.threshold = 0.0
    quantizer.postprocess_model(model)
    model.hf_quantizer = quantizer
    return after_quantized_load(model)


@contextlib.contextmanager
def loading_on_meta(backbone) -> Iterator[None]:
    """Within the block, ``backbone.load_model`` builds the model on meta (so an objective's
    ``configure_model`` applies the tuner to it exactly as in a run)."""
    backbone.load_model = functools.partial(meta_model, backbone)
    try:
        yield
    finally:
        del backbone.load_model


# ---------------------------------------------------------------------- kernels on meta
_LOWER_PRECISION = {  # autocast's lower-precision ops (CUDA and CPU lists) as Python sees them
    F.linear, F.bilinear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
    F.conv_transpose3d, F.prelu, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__,
    torch.Tensor.__rmatmul__, torch.mm, torch.Tensor.mm, torch.bmm, torch.Tensor.bmm, torch.addmm,
    torch.Tensor.addmm, torch.baddbmm, torch.Tensor.baddbmm, torch.addbmm, torch.Tensor.addbmm,
    torch.mv, torch.Tensor.mv, torch.einsum, torch.chain_matmul, torch.linalg.multi_dot,
}


class MetaKernels(TorchFunctionMode):
    """What a real device does and meta does not: the fused attention kernel, and (``autocast``
    set) autocast's casts to that dtype, with its per-step cache for float32 leaves that require grad."""

    def __init__(self, autocast: Optional[torch.dtype] = None):
        super().__init__()
        self.autocast = autocast
        self._cache: dict[int, torch.Tensor] = {}

    def end_forward(self) -> None:
        """Autocast drops its cast cache when its region ends (before backward)."""
        self._cache.clear()

    def _cast(self, x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dtype in (self.autocast, torch.float64):
            return x
        if x.dtype == torch.float32 and x.is_leaf and x.requires_grad and not x._is_view():
            if id(x) not in self._cache:  # autocast casts such a weight once and keeps it (until backward)
                self._cache[id(x)] = x.to(self.autocast)
            return self._cache[id(x)]
        return x.to(self.autocast)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self._attention(*args, **kwargs)
        if self.autocast is not None and func in _LOWER_PRECISION:
            args, kwargs = tree_map(self._cast, (args, kwargs))
        return func(*args, **kwargs)

    def _attention(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False):
        if self.autocast is not None:
            query, key, value = (self._cast(t) for t in (query, key, value))
        if not enable_gqa and key.shape[1] != query.shape[1]:
            raise EstimateError("estimate: grouped-query attention without enable_gqa")
        out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)
        return out


@contextlib.contextmanager
def precision_context(precision: str, kernels: MetaKernels) -> Iterator[None]:
    """Lightning's forward context for ``precision`` on meta: autocast casts (bf16-mixed), the default
    dtype of tensors created in the forward (bf16-true)."""
    old = torch.get_default_dtype()
    if precision == "bf16-true":
        torch.set_default_dtype(torch.bfloat16)
    try:
        with kernels:
            yield
    finally:
        torch.set_default_dtype(old)


def convert_true_precision(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """What Lightning's ``bf16-true`` does to the module (``module.to(dtype)``: floating parameters and
    buffers), leaving bitsandbytes' quantized weights as they are."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and p.is_floating_point() and type(p).__name__ not in ("Params4bit", "Int8Params"):
                p.data = p.data.to(dtype)
        for name, b in list(sub._buffers.items()):
            if b is not None and b.is_floating_point():
                sub._buffers[name] = b.to(dtype)


# ---------------------------------------------------------------------- one estimate
def optimizer_factory(name_or_factory: Any) -> Callable:
    """An optimizer factory from a short name (``adamw``, ``adamw8bit``, ``paged_adamw8bit``, ``sgd``,
    ``sgd_momentum``, or a shipped config's: ``galore``, ``badam``, ``muon``, ...), a ``class_path`` YAML
    (``configs/optim/*.yaml``), or a callable."""
    if callable(name_or_factory):
        return name_or_factory
    spec = str(name_or_factory)
    shipped = ROOT / "configs" / "optim" / f"{spec}.yaml"
    if spec in OPTIMIZERS:
        class_path, init_args = OPTIMIZERS[spec]
    else:
        cfg = _load_yaml(str(shipped) if shipped.is_file() and not Path(spec).is_file() else spec)
        class_path, init_args = cfg["class_path"], cfg.get("init_args") or {}
    module, _, cls = class_path.rpartition(".")
    import importlib

    return functools.partial(getattr(importlib.import_module(module), cls), **init_args)


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

    def __init__(self, backbone, tuner, objective=None, optimizer: Any = "adamw", precision: str = "bf16-mixed"):
        if precision not in PRECISIONS:
            raise EstimateError(f"estimate: precision {precision!r} is not one of {', '.join(PRECISIONS)}")
        self.precision = PRECISIONS[precision]
        self.backbone = backbone
        self.optimizer_factory = optimizer_factory(optimizer)
        self.objective = objective if objective is not None else default_objective(backbone, tuner,
                                                                                  self.optimizer_factory)
        with loading_on_meta(backbone), torch.device("meta"):  # what a tuner adds is made on meta too
            self.objective.configure_model()
        if self.precision == "bf16-true":
            convert_true_precision(self.objective, torch.bfloat16)
        self.objective.check_finite = lambda *a, **k: None  # reads the loss's value
        self.objective.log = lambda *a, **k: None  # no trainer to log to
        # as a run: the optimizer is made after the model and before the first step (BAdam leaves only its
        # first block trainable, so the weights' split, the gradients and the activations follow it)
        self.optimizer = meta_optimizer(self.objective, self.optimizer_factory)
        self.weights = weight_breakdown(self.objective)
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
        with precision_context(self.precision, kernels):
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
    opt = make_optimizer(objective.model, objective.tuner, factory, objective.method_label)
    if getattr(opt, "is_paged", False):
        # bitsandbytes' paged states are CUDA unified memory of the same dtypes and shapes; there is
        # none on meta (or without CUDA), so they are made as plain tensors here
        opt.is_paged = False
    return opt


class MetaValues(TorchFunctionMode):
    """A value read from a meta tensor during an optimizer's step is 1 (Adafactor reads its step count
    with ``.item()``, APOLLO compares its norm-growth limiter): values decide no state's size."""

    _READS = {torch.Tensor.item: 1.0, torch.Tensor.__float__: 1.0, torch.Tensor.__int__: 1, torch.Tensor.__bool__: True}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self._READS and args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            return self._READS[func]
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def optimizer_on_meta() -> Iterator[None]:
    """An optimizer's step on meta tensors: values read are 1 (:class:`MetaValues`), and APOLLO's seeded
    Gaussian projection (a ``torch.Generator`` has no meta device) is an empty meta tensor of its shape."""
    from unittest import mock

    with contextlib.ExitStack() as stack:
        stack.enter_context(MetaValues())
        if sys.modules.get("apollo_torch") is not None:
            def empty_randn(shape, seed, device=None, dtype=torch.float32):
                return torch.empty(shape, device=device, dtype=dtype)

            stack.enter_context(mock.patch("apollo_torch.random_projector.stable_randn", empty_randn))
        yield


def step_on_meta(opt: torch.optim.Optimizer) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
    """Step ``opt`` on the gradients it has and read its state as a run's breakdown does, before and after
    the step, the largest kept. badam's BlockOptimizer is stepped on through every block (``switch_block_every``
    steps each, gradients made empty for the active block), since a run keeps the largest block's state
    and gradients over its timed steps; the second value is the largest block's gradients (else None)."""
    reads = [optimizer_breakdown([opt])]
    with optimizer_on_meta():
        opt.step()
    reads.append(optimizer_breakdown([opt]))
    badam = sys.modules.get("badam")
    block_grads: Optional[dict[str, Any]] = None
    if badam is not None and isinstance(opt, badam.BlockOptimizer):
        params = [p for group in opt.param_groups for p in group["params"]]
        trainable = [p.requires_grad for p in params]  # put back after: later steps see the first block
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
             gradient_checkpointing: Optional[bool] = None, gpu_memory: Optional[int] = None) -> dict[str, Any]:
    """The memory breakdown of one training step of ``tuner`` on ``backbone`` (no weights read).

    Returns the dict a run records as ``train_info.memory_breakdown`` (bytes), plus ``method``,
    ``params`` (trainable/total), the settings, and with ``gpu_memory`` (bytes) ``max_batch_size``.
    """
    if gradient_checkpointing is not None and gradient_checkpointing != backbone.gradient_checkpointing:
        backbone = copy.copy(backbone)
        backbone.gradient_checkpointing = gradient_checkpointing
    t0 = time.perf_counter()
    run = MetaRun(backbone, tuner, objective, optimizer=optimizer, precision=precision)
    out = run.breakdown(batch_size, seq_len)
    out["method"] = getattr(run.objective, "method_label", None) or getattr(tuner, "name", "?")
    out["settings"] = {"batch_size": batch_size, "seq_len": seq_len, "precision": run.precision,
                       "optimizer": out["optimizer"].get("class"), "dtype": backbone.dtype,
                       "quantization": backbone.quantization, "double_quant": backbone.double_quant,
                       "gradient_checkpointing": backbone.gradient_checkpointing, "model": backbone.model}
    if gpu_memory is not None:
        out["gpu_memory_bytes"] = gpu_memory
        out["max_batch_size"] = run.largest_batch(seq_len, gpu_memory, known=(batch_size, out["predicted_peak_bytes"]))
    out["seconds"] = time.perf_counter() - t0
    return out


# ---------------------------------------------------------------------- CLI
def parse_bytes(text: str) -> int:
    """``24GiB``, ``24 GB``, ``80e9``, ``1024`` -> bytes (GiB = 2**30, GB = 10**9)."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 24GiB, 80GB, 16e9)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _load_yaml(path: str) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise EstimateError(f"estimate: no such file {path!r}")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise EstimateError(f"estimate: {path} is not a YAML mapping")
    return data


def instantiate_config(kind: str, spec: str, base: type):
    """A tuner or objective from a config YAML (``class_path`` + ``init_args``, as ``ftbench fit``
    takes it) or a shipped config's name (``lora`` -> ``configs/<kind>/lora.yaml``)."""
    from jsonargparse import ArgumentParser

    path = Path(spec)
    if not path.is_file():
        shipped = ROOT / "configs" / kind / f"{spec}.yaml"
        if not shipped.is_file():
            names = sorted(p.stem for p in (ROOT / "configs" / kind).glob("*.yaml"))
            raise EstimateError(f"estimate: --{kind} {spec!r} is neither a file nor a shipped config "
                                f"({', '.join(names)})")
        path = shipped
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument(f"--{kind}", type=base)
    cfg = parser.parse_object({kind: _load_yaml(str(path))})
    return getattr(parser.instantiate_classes(cfg), kind)


def _backbone(args, spec: Optional[str]):
    from ftbench.backbone import Backbone

    values: dict[str, Any] = _load_yaml(spec) if spec else {}
    if "init_args" in values:  # a class_path form
        values = values["init_args"] or {}
    for key in ("model", "dtype", "double_quant", "prepare_kbit", "compute_dtype", "attn_implementation"):
        if getattr(args, key, None) is not None:
            values[key] = getattr(args, key)
    return Backbone(**values)


def _gib(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def _count(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def table(rows: list[dict[str, Any]]) -> str:
    """The breakdowns as a text table (GiB = 2**30 bytes)."""
    head = ["method", "trainable", "weights", "grads", "optimizer", "activations", "transient", "total"]
    if any("max_batch_size" in r for r in rows):
        head.append("max batch")
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append([r["method"], f"error: {r['error']}"])
            continue
        act = r["activations"]
        line = [r["method"], _count(r["params"]["trainable"]), _gib(r["weights"]["bytes"]),
                _gib(r["gradients"]["bytes"]), _gib(r["optimizer"]["bytes"]),
                _gib(act["bytes"] + act.get("other_live_bytes", 0)), _gib(r["largest_transient"]["bytes"]),
                _gib(r["predicted_peak_bytes"])]
        if "max_batch_size" in r:
            line.append(str(r["max_batch_size"]))
        lines.append(line)
    widths = [max(len(line[i]) for line in lines if len(line) == len(head)) for i in range(len(head))]
    out = []
    for i, line in enumerate(lines):
        if len(line) < len(head):
            out.append(f"{line[0]:<{widths[0]}}  {line[1]}")
            continue
        out.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(line, widths))))
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="ftbench estimate",
        description="Memory of a training step (weights, gradients, optimizer state, activations) for any "
                    "model from its config alone: no weights read, no GPU.")
    ap.add_argument("--backbone", action="append", default=None, metavar="FILE.yaml",
                    help="backbone config as ftbench fit takes it (repeatable: one row set per backbone)")
    ap.add_argument("--model", help="shortcut for backbone.model: a folder with config.json, a cached hub id, "
                                    "a .gguf file, or 'embedded'")
    ap.add_argument("--tuner", action="append", default=None, metavar="FILE.yaml|NAME",
                    help="tuner config (class_path + init_args) or a shipped one's name (configs/tuner/NAME.yaml); "
                         "repeatable (default: full and lora)")
    ap.add_argument("--objective", default=None, metavar="FILE.yaml|NAME", help="objective config (default: sft)")
    ap.add_argument("--quantization", nargs="+", default=None, choices=["none", "nf4", "fp4", "int8"],
                    help="backbone quantization(s); several cross with the tuners (full on a quantized backbone is "
                         "skipped: it cannot train)")
    ap.add_argument("--double_quant", type=_bool, default=None)
    ap.add_argument("--prepare_kbit", type=_bool, default=None)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    ap.add_argument("--compute_dtype", choices=["float32", "bfloat16", "float16"], default=None)
    ap.add_argument("--attn_implementation", default=None)
    ap.add_argument("--batch_size", type=int, default=1)
    ap.add_argument("--seq_len", type=int, default=512, help="tokens per row (every one real and trained)")
    ap.add_argument("--precision", default="bf16-mixed", choices=sorted(PRECISIONS),
                    help="trainer precision: 32-true (fp32), bf16-mixed (autocast), bf16-true")
    ap.add_argument("--optimizer", default="adamw",
                    help=f"{', '.join(OPTIMIZERS)}, or an optimizer YAML (configs/optim/*.yaml)")
    ap.add_argument("--gradient_checkpointing", type=_bool, default=None)
    ap.add_argument("--gpu_memory", type=parse_bytes, default=None,
                    help="e.g. 24GiB: also print the largest batch size whose predicted peak fits")
    ap.add_argument("--json", default=None, metavar="FILE", help="write the breakdowns as JSON")
    return ap


def _bool(text: str) -> bool:
    if str(text).lower() in ("1", "true", "yes", "on"):
        return True
    if str(text).lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


def main(argv: Optional[list[str]] = None) -> int:
    """``ftbench estimate ...``; returns the exit status."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait for the network: configs come from disk
    args = build_parser().parse_args(argv)
    from ftbench.naming import method_label
    from ftbench.objectives.base import Objective
    from ftbench.tuners.base import Tuner

    try:
        backbones = [_backbone(args, spec) for spec in (args.backbone or [None])]
        tuners = [instantiate_config("tuner", spec, Tuner) for spec in (args.tuner or ["full", "lora"])]
        objective_spec = args.objective
    except Exception as err:  # noqa: BLE001 - a config that cannot be read is the user's error to see
        print(f"ftbench estimate: {err}", file=sys.stderr)
        return 2
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for backbone in backbones:
        for quant in args.quantization or [backbone.quantization]:
            bb = copy.copy(backbone)
            bb.quantization = quant
            if quant not in ("nf4", "fp4"):
                bb.double_quant = False  # a 4-bit setting: crossed with int8 or none it does not apply
            for tuner in tuners:
                label = method_label("sft" if not objective_spec else Path(objective_spec).stem,
                                     getattr(tuner, "name", "tuner"), quant)
                if quant != "none" and type(tuner).__name__ in ("Full", "Freeze"):
                    continue  # these train the backbone's own weights: not on a quantized one
                tuner = copy.deepcopy(tuner)
                objective = None
                try:
                    if objective_spec:
                        objective = instantiate_config("objective", objective_spec, Objective)
                        objective.backbone, objective.tuner = bb, tuner
                        objective.optimizer_factory = optimizer_factory(args.optimizer)
                    r = estimate(bb, tuner, objective, batch_size=args.batch_size, seq_len=args.seq_len,
                                 precision=args.precision, optimizer=args.optimizer,
                                 gradient_checkpointing=args.gradient_checkpointing, gpu_memory=args.gpu_memory)
                except Exception as err:  # noqa: BLE001 - one method failing leaves the others' rows
                    r = {"method": label, "error": f"{type(err).__name__}: {err}"}
                rows.append(r)
    first = next((r for r in rows if "settings" in r), None)
    if first:
        s = first["settings"]
        print(f"model {s['model']}: batch {s['batch_size']} x {s['seq_len']} tokens, precision {s['precision']}, "
              f"dtype {s['dtype']}, optimizer {s['optimizer']}, gradient checkpointing "
              f"{'on' if s['gradient_checkpointing'] else 'off'}; GiB = 2^30 bytes; total = predicted peak")
    print(table(rows))
    if args.gpu_memory is not None:
        print(f"max batch: the largest batch size (x {args.seq_len} tokens) whose predicted peak fits in "
              f"{args.gpu_memory / 2**30:.2f} GiB (CUDA context and allocator slack not included)")
    print(f"({time.perf_counter() - t0:.1f} s)")
    if args.json:
        from ftbench.bench.record import write_json_atomic

        write_json_atomic(args.json, {"rows": rows})
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
