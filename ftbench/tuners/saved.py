"""What a tuner saved, put back onto a freshly loaded backbone (``backbone.init_from``).

A later stage of a pipeline (SFT → DPO, SFT → reward model → GRPO) starts from an earlier run's
result. The earlier run's saved folder (``--save_weights``: ``{out}/{run_id}/weights``) is applied to
the backbone as it loads, so that the new stage's tuner goes on top of it and the new stage's
reference (``tuner.reference()``) *is* the upstream model, not the raw backbone: LoRA's adapter
switched off leaves the upstream model, and a frozen copy for full/freeze is taken after it.

The folder's format says what it holds (each tuner's ``save`` writes one of these):

==================================================  ==============================================
``adapter_config.json`` with a ``peft_type``        a peft adapter: loaded with peft and merged into
                                                    the weights (``merge_and_unload``); on a
                                                    quantized backbone a merge would round the
                                                    update into 4/8 bits, so it is refused
``adapter_config.json`` with a ``placement``        bottleneck adapters: placed again and loaded;
                                                    they stay as frozen modules of the backbone
``config.json`` + ``*.safetensors``                 a whole model (full fine-tuning): every weight
``*.safetensors`` alone                             the weights a freeze tuner trained, by name
==================================================  ==============================================
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ftbench.errors import ConfigError

if TYPE_CHECKING:
    from ftbench.backbone import Backbone


def saved_kind(path: str | Path) -> str:
    """``peft``, ``adapters``, ``full`` or ``partial`` for a folder a tuner saved."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"backbone.init_from: {str(path)!r} is not a folder saved by a run (--save_weights)")
    adapter = path / "adapter_config.json"
    if adapter.is_file():
        config = json.loads(adapter.read_text())
        if "peft_type" in config:
            return "peft"
        if "placement" in config:
            return "adapters"
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        found = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
        raise ConfigError(f"backbone.init_from: {str(path)!r} holds no weights a run saved (found: {found}; expected "
                          "adapter_config.json, or *.safetensors with or without config.json)")
    return "full" if (path / "config.json").is_file() else "partial"


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def apply_saved(model: nn.Module, path: str | Path, backbone: "Backbone", merge: bool = True) -> nn.Module:
    """``model`` with the weights saved at ``path`` applied (see the module doc). Returns the model
    (a new object for a peft adapter). ``merge=False`` keeps a peft adapter as a frozen
    ``PeftModel`` instead of merging it (exactly the saving run's numbers, for inference only; a
    quantized backbone is then fine)."""
    path = Path(path)
    kind = saved_kind(path)
    if kind == "peft":
        from peft import PeftModel

        if not merge:
            return PeftModel.from_pretrained(model, str(path))
        if backbone.quantization != "none":
            raise ConfigError(f"backbone.init_from: merging the peft adapter in {str(path)!r} into a "
                              f"{backbone.quantization} backbone would round it into its quantized weights; "
                              "start from a backbone with quantization: none")
        from peft import PeftConfig

        config = PeftConfig.from_pretrained(str(path))
        if getattr(model, "ftbench_head", None) == "score":
            # an SFT stage's adapter (task CAUSAL_LM) under a reward model: peft's causal-LM wrapper
            # wants generation methods a score-head model lacks; the plain PeftModel merges the same
            # body weights (the adapter never touches the LM head, which the score head replaces)
            config.task_type = None
        return PeftModel.from_pretrained(model, str(path), config=config).merge_and_unload()
    if kind == "adapters":
        from ftbench.tuners.adapters import CONFIG_NAME, Adapters

        saved = json.loads((path / CONFIG_NAME).read_text())
        tuner = Adapters(placement=saved["placement"], bottleneck_size=saved["bottleneck_size"],
                         nonlinearity=saved["nonlinearity"], dropout=saved.get("dropout", 0.0),
                         train_norms=saved.get("train_norms", False))
        model = tuner.prepare(model, backbone)
        if getattr(model, "ftbench_head", None) == "score":  # a reward run trains and saves its head too
            from ftbench.backbone import score_module

            score_module(model).requires_grad_(True)
        tuner.load(model, path)
        model.requires_grad_(False)
        return model
    state = _load_state(path)
    if getattr(model, "ftbench_head", None) == "score":  # a reward model started from an LM: no LM head
        state = {k: v for k, v in state.items() if not k.startswith("lm_head.")}
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise ConfigError(f"backbone.init_from: {str(path)!r} has weights this backbone does not: {unknown[:3]}")
    if kind == "full":
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


def load_backbone(backbone: "Backbone", head: str = "causal_lm") -> nn.Module:
    """``backbone``'s weights with ``head``, and the folder ``backbone.init_from`` names applied
    (merged: this is where a pipeline's later stage starts)."""
    if not backbone.init_from:
        return backbone.load_model(head=head)
    return backbone.load_model(head=head, init=lambda model: apply_saved(model, backbone.init_from, backbone))


def _tied(model: nn.Module, key: str) -> bool:
    """A weight ``save_pretrained`` leaves out because it is tied to another (the output head)."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return out is not None and bool(getattr(model.config, "tie_word_embeddings", False)) and key.startswith("lm_head")
