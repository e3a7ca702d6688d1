"""The model of a backbone on the meta device, and what a real device does that meta does not.

The model is built from its config alone (a local folder with ``config.json``, a cached hub id, a GGUF
file's metadata, or the embedded model; no weight is read), then quantized as a load quantizes it
(bitsandbytes' quantize functions on meta tensors give exactly the packed weights, block absmax, codes
and double-quantization state it stores).

What the meta device would get wrong, and is put right here:

* transformers' mask preparation reads tensor values (``.item()``); for a full batch the real run
  passes no mask to the attention (``is_causal``), so on meta the attention runs under an
  implementation name with no mask preparation, same ``sdpa_attention_forward``;
* ``scaled_dot_product_attention`` on meta picks the math kernel, which saves the B x H x T x T
  attention weights; a GPU (and a CPU) runs a fused kernel that saves q, k, v, the output and a
  float32 log-sum-exp. :class:`MetaKernels` calls that fused kernel (PyTorch's CPU flash attention op,
  which has a meta implementation and the same saved tensors). On CUDA, float32 with grouped-query
  attention can fall back to the math kernel; the estimate does not model that fallback;
* autocast ignores meta tensors: for ``bf16-mixed`` the casts autocast makes (inputs of matmuls,
  linear layers and attention to bfloat16; float32 leaves that require grad cast once per step) are
  made by a ``TorchFunctionMode``. Code that asks ``torch.is_autocast_enabled()`` sees False, as on
  a CPU run: peft's LoRA layers on bitsandbytes weights then cast their input to the adapter's
  dtype, which under CUDA autocast they skip (a difference only where that input is not already
  float32, i.e. a bfloat16 backbone with ``prepare_kbit: false``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from ftbench.errors import EstimateError

_META_ATTENTION = "ftbench_meta_{}"


# ---------------------------------------------------------------------- the config, no weights
def read_config(backbone):
    """The model's transformers config, read without touching a weight.

    Where the model is comes from :meth:`Backbone.source <ftbench.backbone.Backbone.source>` (a hub
    GGUF only from the local cache). A GGUF file is read from ftbench's converted cache when that
    exists (its ``config.json``), else from the GGUF metadata (slower: transformers parses the whole
    header, tokenizer included); a hub id from the local cache only (never a network wait).
    """
    from transformers import AutoConfig

    from ftbench import gguf_cache

    kw: dict[str, Any] = {"trust_remote_code": backbone.trust_remote_code}
    kind, where = backbone.source(download=False)
    if kind == "gguf":
        gguf = Path(where)
        cached = gguf_cache.built_folder(gguf, backbone.cache_dir)
        if cached is not None:
            return AutoConfig.from_pretrained(str(cached), **kw)
        return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name, **kw)
    if kind == "folder":
        return AutoConfig.from_pretrained(where, **kw)
    try:
        return AutoConfig.from_pretrained(where, local_files_only=True, revision=backbone.revision, **kw)
    except OSError as err:
        raise EstimateError(f"estimate: no config for {where!r}: not a folder, a .gguf file, or a hub id "
                            f"in the local cache ({err})") from err


#: the config fields that size a model: each must be in the config itself (a config class's defaults
#: describe some default model, e.g. LlamaConfig's a 7B Llama), where the config class has it
SIZING_FIELDS = ("hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads", "intermediate_size")
#: more parameters than any model trained so far (the largest published, ~1.6e12) is a mistyped config
MAX_PARAMETERS = 2 * 10**12


def sized_config(backbone):
    """:func:`read_config`, checked before anything is built: the fields that size the model are in
    the config file (:data:`SIZING_FIELDS`, or the names the config class maps them to), and the
    model it describes has at most :data:`MAX_PARAMETERS` parameters (counted from meta models of one
    and two blocks: the embeddings and head, and what one block adds)."""
    config = read_config(backbone)
    kind, where = backbone.source(download=False)
    if kind != "gguf":  # a GGUF's metadata always gives the sizes (its tensors have them)
        raw, _ = type(config).get_config_dict(where, local_files_only=True, revision=backbone.revision)
        aliases = {canonical: {canonical, alias} for canonical, alias in type(config).attribute_map.items()}
        sub = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else {}
        missing = [f for f in SIZING_FIELDS if hasattr(config, f)
                   and not any(name in raw or name in sub for name in aliases.get(f, {f}))]
        if missing:
            raise EstimateError(f"estimate: the config of {backbone.model!r} lacks {', '.join(missing)}: without "
                                f"them it would describe {type(config).__name__}'s default model, not yours")
    layers = getattr(config, "num_hidden_layers", None)
    if isinstance(layers, int) and layers > 2:
        one, two = (_parameters(config, n, backbone.trust_remote_code) for n in (1, 2))
        total = one + (layers - 1) * (two - one)
        if total > MAX_PARAMETERS:
            raise EstimateError(f"estimate: the config of {backbone.model!r} describes {total:.3g} parameters "
                                f"(num_hidden_layers={layers}), over the bound of {MAX_PARAMETERS:.0e}: "
                                "no such model exists (a mistyped size?)")
    return config


def _parameters(config, layers: int, trust_remote_code: bool = False) -> int:
    """Parameters of the model ``config`` describes, cut to ``layers`` blocks (built on meta)."""
    from transformers import AutoModelForCausalLM

    cut = copy.deepcopy(config)
    cut.num_hidden_layers = layers
    if isinstance(getattr(cut, "layer_types", None), list):
        cut.layer_types = cut.layer_types[:layers]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cut, trust_remote_code=trust_remote_code)
    return sum(p.numel() for p in model.parameters())


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


def meta_model(backbone, head: str = "causal_lm", config=None) -> torch.nn.Module:
    """The backbone's model as :meth:`Backbone.load_model` returns it, on the meta device
    (``config``: the one :func:`read_config` read, when the caller has it already)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = copy.deepcopy(config) if config is not None else read_config(backbone)
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
def reward_runs_on_meta(backbone, config=None) -> Iterator[None]:
    """Within the block, the reward runs an objective reads (PPO's reward model and critic start, a
    ``RewardModel`` reward function) are the backbone with a score head on meta, and any folder is
    taken for one: what a run's saved weights change is values, not sizes, so an estimate needs no reward
    run on disk. Left out: a peft reward run's adapter, which a run keeps unmerged on its reward model
    (its LoRA matrices and the score head's trained copy; at r 16 on every linear layer 4.9M parameters,
    3.6 % of SmolLM2-135M)."""
    from ftbench.objectives import ppo, rewards
    from ftbench.tuners import saved

    def bind_on_meta(reward_model: rewards.RewardModel, objective) -> None:
        reward_model.backbone = reward_model.backbone or objective.backbone
        reward_model._policy_tokenizer = objective.backbone.tokenizer
        reward_model.model = meta_model(backbone, head="score", config=config).requires_grad_(False).eval()
        reward_model.device = torch.device("meta")

    replaced = {(ppo, "reward_run_problem"): lambda path: None,
                (saved, "apply_saved"): lambda model, path, backbone, merge=True: model,
                (rewards.RewardModel, "bind"): bind_on_meta}
    kept = {key: getattr(*key) for key in replaced}
    for (module, name), value in replaced.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for (module, name), value in kept.items():
            setattr(module, name, value)


@contextlib.contextmanager
def loading_on_meta(backbone, config=None) -> Iterator[None]:
    """Within the block, ``backbone.load_model`` builds the model on meta (so an objective's
    ``configure_model`` applies the tuner to it exactly as in a run)."""
    backbone.load_model = functools.partial(meta_model, backbone, config=config)
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


# ---------------------------------------------------------------------- an optimizer's step on meta
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
    import sys
    from unittest import mock

    with contextlib.ExitStack() as stack:
        stack.enter_context(MetaValues())
        if sys.modules.get("apollo_torch") is not None:
            def empty_randn(shape, seed, device=None, dtype=torch.float32):
                return torch.empty(shape, device=device, dtype=dtype)

            stack.enter_context(mock.patch("apollo_torch.random_projector.stable_randn", empty_randn))
        yield
