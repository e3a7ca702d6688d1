"""Tuners that train the backbone's own weights: all of them (``Full``) or the last blocks (``Freeze``)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

import torch
from torch import nn

from ftbench.errors import ConfigError
from ftbench.tuners.base import Tuner, refuse_quantized

if TYPE_CHECKING:
    from ftbench.backbone import Backbone


class Full(Tuner):
    """Full fine-tuning: every weight trains; saves the whole model. The reference is a frozen copy
    of the weights as they were, made only when an objective asks for one."""

    name = "full"
    trains_backbone_weights = True
    saved_kind = "full"  # config.json + *.safetensors: every weight (save_pretrained)

    def prepare(self, model: nn.Module, backbone: "Backbone") -> nn.Module:
        refuse_quantized(self, backbone)
        model.requires_grad_(True)
        return model

    @classmethod
    def load_saved(cls, model: nn.Module, path: Path, backbone: "Backbone", merge: bool = True) -> nn.Module:
        return copy_saved_weights(model, path, every_weight=True)


class Freeze(Tuner):
    """Freeze-tuning (LLaMA-Factory's ``finetuning_type: freeze``): only the last ``trainable_layers``
    transformer blocks train (optionally only some of their sublayers), plus any named extra modules;
    the rest of the backbone stays frozen. Saves only the trained weights."""

    name = "freeze"
    trains_backbone_weights = True
    saved_kind = "partial"  # *.safetensors alone: the trained weights, by name

    def __init__(self, trainable_layers: int = 1, trainable_modules: Optional[list[str]] = None,
                 extra_modules: Optional[list[str]] = None, **kwargs):
        """
        Args:
            trainable_layers: How many of the last transformer blocks train (1 = the last block).
            trainable_modules: Sublayer names inside those blocks that train, e.g. ``[mlp]`` or
                ``[self_attn]``; default: the whole block.
            extra_modules: Modules outside the blocks that train too, by name suffix, e.g.
                ``[norm, lm_head]`` (the final norm and the output head).
        """
        super().__init__(**kwargs)
        if trainable_layers < 1:
            raise ConfigError(f"tuner freeze: trainable_layers must be >= 1, got {trainable_layers}")
        self.trainable_layers = trainable_layers
        self.trainable_modules = trainable_modules
        self.extra_modules = extra_modules

    def prepare(self, model: nn.Module, backbone: "Backbone") -> nn.Module:
        from ftbench.tuners.adapters import decoder_blocks

        refuse_quantized(self, backbone)
        model.requires_grad_(False)
        blocks = decoder_blocks(model)
        if self.trainable_layers > len(blocks):
            raise ConfigError(f"tuner freeze: trainable_layers={self.trainable_layers} but the model has "
                             f"{len(blocks)} blocks")
        for block in blocks[-self.trainable_layers:]:
            if not self.trainable_modules:
                block.requires_grad_(True)
                continue
            for name in self.trainable_modules:
                sub = getattr(block, name, None)
                if not isinstance(sub, nn.Module):
                    children = ", ".join(n for n, _ in block.named_children())
                    raise ConfigError(f"tuner freeze: trainable_modules: {type(block).__name__} has no "
                                     f"{name!r} (its children: {children})")
                sub.requires_grad_(True)
        names = dict(model.named_modules())
        for suffix in self.extra_modules or []:
            found = [m for n, m in names.items() if n == suffix or n.endswith("." + suffix)]
            if not found:
                raise ConfigError(f"tuner freeze: extra_modules: no module named {suffix!r}")
            for m in found:
                m.requires_grad_(True)
        return model

    def save(self, model: nn.Module, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {n: t.contiguous().cpu() for n, t in self.trained_state_dict(model).items()}
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path

    @classmethod
    def load_saved(cls, model: nn.Module, path: Path, backbone: "Backbone", merge: bool = True) -> nn.Module:
        return copy_saved_weights(model, path, every_weight=False)


class NoTuning(Tuner):
    """Nothing trains: the backbone as it is, for the baseline row (``ftbench test``)."""

    name = "none"

    def prepare(self, model: nn.Module, backbone: "Backbone") -> nn.Module:
        model.requires_grad_(False)
        return model

    @contextlib.contextmanager
    def reference(self, model: nn.Module) -> Iterator[nn.Module]:
        yield model  # nothing trained: the model is the backbone


def copy_saved_weights(model: nn.Module, path: Path, every_weight: bool) -> nn.Module:
    """Copy the weights saved at ``path`` into ``model`` by name (``every_weight``: the folder must
    hold all of the backbone's, as a full model does). A reward model started from an LM has no LM head."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(str(f)))
    if getattr(model, "ftbench_head", None) == "score":
        state = {k: v for k, v in state.items() if not k.startswith("lm_head.")}
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise ConfigError(f"backbone.init_from: {str(path)!r} has weights this backbone does not: {unknown[:3]}")
    if every_weight:
        missing = sorted(k for k in own if k not in state and not _tied(model, k))
        if missing:
            raise ConfigError(f"backbone.init_from: {str(path)!r} lacks weights of this backbone: {missing[:3]}")
    with torch.no_grad():
        for name, tensor in state.items():
            if own[name].shape != tensor.shape:
                raise ConfigError(f"backbone.init_from: {name} is {tuple(tensor.shape)} in {str(path)!r} but "
                                  f"{tuple(own[name].shape)} in the backbone")
            own[name].copy_(tensor.to(own[name].dtype))
    return model


def _tied(model: nn.Module, key: str) -> bool:
    """A weight ``save_pretrained`` leaves out because it is tied to another (the output head)."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return out is not None and bool(getattr(model.config, "tie_word_embeddings", False)) and key.startswith("lm_head")
