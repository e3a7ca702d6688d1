"""What a tuner saved, put back onto a freshly loaded backbone (``backbone.init_from``).

A later stage of a pipeline (SFT → DPO, SFT → reward model → GRPO) starts from an earlier run's
result. The earlier run's saved folder (``--save_weights``: ``{out}/{run_id}/weights``) is applied to
the backbone as it loads, so that the new stage's tuner goes on top of it and the new stage's
reference (``tuner.reference()``) *is* the upstream model, not the raw backbone: LoRA's adapter
switched off leaves the upstream model, and a frozen copy for full/freeze is taken after it.

The folder's format says what it holds (each tuner's ``save`` writes one of these, and the tuner class
that sets that ``saved_kind`` reads it back: :meth:`~ftbench.tuners.base.Tuner.load_saved`):

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

from torch import nn

from ftbench.errors import ConfigError
from ftbench.tuners.base import SAVED_KINDS, Tuner

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


def apply_saved(model: nn.Module, path: str | Path, backbone: "Backbone", merge: bool = True) -> nn.Module:
    """``model`` with the weights saved at ``path`` applied by the tuner class that saves that kind
    of folder (:meth:`Tuner.load_saved <ftbench.tuners.base.Tuner.load_saved>`). Returns the model
    (a new object for a peft adapter). ``merge=False`` keeps a peft adapter as a frozen ``PeftModel``
    instead of merging it (exactly the saving run's numbers, for inference only; a quantized backbone
    is then fine)."""
    return saved_tuner(saved_kind(path)).load_saved(model, Path(path), backbone, merge=merge)


def saved_tuner(kind: str) -> type[Tuner]:
    """The tuner class that reads a folder of ``kind`` back."""
    from ftbench.tuners import adapters, full, peft_tuner  # noqa: F401 - each class registers the kind it saves

    return SAVED_KINDS[kind]


def load_backbone(backbone: "Backbone", head: str = "causal_lm") -> nn.Module:
    """``backbone``'s weights with ``head``, and the folder ``backbone.init_from`` names applied
    (merged: this is where a pipeline's later stage starts)."""
    if not backbone.init_from:
        return backbone.load_model(head=head)
    return backbone.load_model(head=head, init=lambda model: apply_saved(model, backbone.init_from, backbone))
