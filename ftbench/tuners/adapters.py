"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020): the backbone is frozen and a
small down-project / nonlinearity / up-project module with a residual connection is inserted after
sublayers of every transformer block.

* ``houlsby``: after the attention and after the MLP sublayer of every block (2 adapters a block).
* ``pfeiffer``: after the MLP sublayer only (1 adapter a block).

An adapter maps the sublayer output ``h`` to ``h + W_up f(W_down h + b_down) + b_up``; ``W_up`` and
``b_up`` start at zero, so before training the model computes exactly what the backbone computes.
Parameters per adapter: ``2*d*m + d + m`` for hidden size ``d`` and bottleneck ``m``.

peft has no bottleneck adapter, so this module places them itself, without per-model code: the
decoder blocks are found through the model's ``_no_split_modules`` class names (the block class
transformers never splits across devices, e.g. ``LlamaDecoderLayer``, ``Qwen2DecoderLayer``,
``GPT2Block``), falling back to the ``ModuleList`` with ``num_hidden_layers`` entries; the attention
and MLP sublayers by their common attribute names (``self_attn``/``attn``/``attention``,
``mlp``/``feed_forward``/``ffn``). Each adapter is registered as a child named ``bottleneck_adapter``
of the sublayer it follows (so it moves with the model, shows in ``parameters()`` and is saved by
name) and applied with a forward hook on that sublayer (tuple outputs such as attention's
``(hidden, weights)`` keep their other entries).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Literal, Optional

import torch
from torch import nn

if TYPE_CHECKING:
    from ftbench.backbone import Backbone

from ftbench.errors import ConfigError, FTBenchError
from ftbench.tuners.base import Tuner, freeze_backbone

ADAPTER_ATTR = "bottleneck_adapter"
ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn")
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"


class AdapterPlacementError(FTBenchError):
    """The model's architecture has no place this module knows how to put adapters in."""


class BottleneckAdapter(nn.Module):
    """``h + up(f(down(h)))`` with ``up`` initialised to zero (the identity at the start).

    The adapter keeps its own dtype (float32 by default, like peft's adapters) and casts the hidden
    states to it and the result back, so it also trains on a bfloat16 or 4-bit backbone.
    """

    def __init__(self, hidden: int, bottleneck: int, nonlinearity: str = "relu", dropout: float = 0.0):
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck)
        self.act = ACTIVATIONS[nonlinearity]()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.enabled = True  # off inside Adapters.reference(): the sublayer's output passes unchanged

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return h
        x = h.to(self.down.weight.dtype)
        return h + self.up(self.dropout(self.act(self.down(x)))).to(h.dtype)


def _apply_adapter(module: nn.Module, args, output):
    adapter = getattr(module, ADAPTER_ATTR)
    if isinstance(output, tuple):
        return (adapter(output[0]),) + tuple(output[1:])
    if isinstance(output, torch.Tensor):
        return adapter(output)
    raise AdapterPlacementError(
        f"bottleneck adapter after {type(module).__name__}: its output is a {type(output).__name__}, "
        "not a tensor or a tuple starting with the hidden states"
    )


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``model``, in order."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None) if config is not None else None
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0 and (n is None or len(m) == n):
            return list(m)
    raise AdapterPlacementError(
        f"adapters: cannot find the transformer blocks of {type(model).__name__} (no module class named in "
        f"_no_split_modules={sorted(names)} and no ModuleList of num_hidden_layers={n} blocks)"
    )


def _child(block: nn.Module, candidates: tuple[str, ...], what: str) -> nn.Module:
    for name in candidates:
        child = getattr(block, name, None)
        if isinstance(child, nn.Module):
            return child
    children = [name for name, _ in block.named_children()]
    raise AdapterPlacementError(
        f"adapters: {type(block).__name__} has no {what} sublayer under any of the names "
        f"{', '.join(candidates)} (its children: {', '.join(children) or 'none'}); "
        "this architecture is not supported"
    )


def hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    d = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or getattr(config, "d_model", None)
    if not d:
        raise AdapterPlacementError(f"adapters: cannot read the hidden size of {type(model).__name__} from its config")
    return int(d)


class Adapters(Tuner):
    """Bottleneck adapters after the attention and MLP sublayers (Houlsby) or the MLP only
    (Pfeiffer); the backbone is frozen and only the adapters (and optionally the norms) train.
    The reference is the same model with every adapter switched off (no second copy)."""

    name = "adapters"
    saved_kind = "adapters"  # adapter_config.json with a placement + the adapter weights

    def __init__(
        self,
        placement: Literal["houlsby", "pfeiffer"] = "houlsby",
        reduction_factor: int = 16,
        bottleneck_size: Optional[int] = None,
        nonlinearity: Literal["relu", "gelu", "silu", "tanh"] = "relu",
        dropout: float = 0.0,
        train_norms: bool = False,
        **kwargs,
    ):
        """
        Args:
            placement: ``houlsby`` (after attention and MLP of every block) or ``pfeiffer`` (after
                the MLP only).
            reduction_factor: Bottleneck size as hidden size // reduction_factor (ignored when
                ``bottleneck_size`` is given).
            bottleneck_size: Bottleneck width m (overrides ``reduction_factor``).
            nonlinearity: Between the down- and up-projection: ``relu``, ``gelu``, ``silu`` or ``tanh``.
            dropout: Dropout on the bottleneck activations.
            train_norms: Also train the layer norms of the backbone (saved with the adapters).
        """
        super().__init__(**kwargs)
        if bottleneck_size is None and reduction_factor < 1:
            raise ConfigError(f"adapters: reduction_factor must be >= 1, got {reduction_factor}")
        if bottleneck_size is not None and bottleneck_size < 1:
            raise ConfigError(f"adapters: bottleneck_size must be >= 1, got {bottleneck_size}")
        self.placement = placement
        self.reduction_factor = reduction_factor
        self.bottleneck_size = bottleneck_size
        self.nonlinearity = nonlinearity
        self.dropout = dropout
        self.train_norms = train_norms

    # ------------------------------------------------------------------ placement
    def bottleneck(self, hidden: int) -> int:
        return self.bottleneck_size or max(1, hidden // self.reduction_factor)

    def sublayers(self, block: nn.Module) -> list[nn.Module]:
        """The sublayers of one block that get an adapter after them."""
        mlp = _child(block, MLP_NAMES, "MLP")
        if self.placement == "pfeiffer":
            return [mlp]
        return [_child(block, ATTENTION_NAMES, "attention"), mlp]

    def prepare(self, model: nn.Module, backbone: "Backbone") -> nn.Module:
        model = freeze_backbone(model, backbone)
        d = hidden_size(model)
        m = self.bottleneck(d)
        targets = [s for block in decoder_blocks(model) for s in self.sublayers(block)]
        for sub in targets:
            if hasattr(sub, ADAPTER_ATTR):
                raise AdapterPlacementError(f"adapters: {type(sub).__name__} already has an adapter")
            sub.add_module(ADAPTER_ATTR, BottleneckAdapter(d, m, self.nonlinearity, self.dropout))
            sub.register_forward_hook(_apply_adapter)
        if self.train_norms:
            for mod in model.modules():
                if "norm" in type(mod).__name__.lower():
                    mod.requires_grad_(True)
        return model

    @contextlib.contextmanager
    def reference(self, model: nn.Module) -> Iterator[nn.Module]:
        adapters = [m for m in model.modules() if isinstance(m, BottleneckAdapter)]
        if self.train_norms:
            raise RuntimeError("tuner adapters: with train_norms the backbone's norms train, so switching the "
                               "adapters off is not the untouched backbone; use train_norms: false for a reference")
        for a in adapters:
            a.enabled = False
        try:
            yield model
        finally:
            for a in adapters:
                a.enabled = True

    # ------------------------------------------------------------------ saving
    def adapter_modules(self, model: nn.Module) -> nn.Module:
        return nn.ModuleDict({
            name.replace(".", "__"): mod for name, mod in model.named_modules()
            if name.endswith("." + ADAPTER_ATTR)
        })

    def adapter_config(self, model: nn.Module) -> dict:
        return {"method": self.name, "placement": self.placement,
                "reduction_factor": self.reduction_factor, "bottleneck_size": self.bottleneck(hidden_size(model)),
                "nonlinearity": self.nonlinearity, "dropout": self.dropout, "train_norms": self.train_norms}

    def save(self, model: nn.Module, path: str | Path) -> Path:
        """Save only the adapter (and trained norm) weights as safetensors, with their config."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {n: t.contiguous().cpu() for n, t in self.trained_state_dict(model).items()}
        save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
        (path / CONFIG_NAME).write_text(json.dumps(self.adapter_config(model), indent=2) + "\n")
        return path

    @classmethod
    def load_saved(cls, model: nn.Module, path: Path, backbone: "Backbone", merge: bool = True) -> nn.Module:
        """The adapters placed again as they were saved and loaded; they stay as frozen modules."""
        saved = json.loads((Path(path) / CONFIG_NAME).read_text())
        tuner = cls(placement=saved["placement"], bottleneck_size=saved["bottleneck_size"],
                    nonlinearity=saved["nonlinearity"], dropout=saved.get("dropout", 0.0),
                    train_norms=saved.get("train_norms", False))
        model = tuner.prepare(model, backbone)
        if getattr(model, "ftbench_head", None) == "score":  # a reward run trains and saves its head too
            from ftbench.backbone import score_module

            score_module(model).requires_grad_(True)
        tuner.load(model, path)
        model.requires_grad_(False)
        return model

    def load(self, model: nn.Module, path: str | Path) -> None:
        """Load adapter weights saved by :meth:`save` into ``model`` (prepared by this tuner)."""
        from safetensors.torch import load_file

        path = Path(path)
        saved = json.loads((path / CONFIG_NAME).read_text())
        mine = self.adapter_config(model)
        if any(saved.get(k) != mine[k] for k in ("placement", "bottleneck_size", "train_norms")):
            raise ConfigError(f"adapters: weights in {str(path)!r} were saved with {saved}, this tuner is {mine}")
        tensors = load_file(str(path / WEIGHTS_NAME))
        expected = set(self.trained_state_dict(model))
        if set(tensors) != expected:
            missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
            raise ConfigError(f"adapters: weights in {str(path)!r} do not match the model "
                             f"(missing {missing[:3]}, unexpected {extra[:3]})")
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, t in tensors.items():
                params[name].copy_(t.to(params[name].dtype))
