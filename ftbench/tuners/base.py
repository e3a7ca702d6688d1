"""What trains: a tuner takes the loaded backbone model and decides which weights train.

A tuner is a plain object (its typed ``__init__`` is its config) with four duties:

* :meth:`Tuner.prepare` freezes, wraps or adds modules and returns the module to train;
* :meth:`Tuner.parameter_counts` counts trainable and total parameters;
* :meth:`Tuner.save` writes only what it trained (safetensors);
* :meth:`Tuner.reference` is a context manager under which a module computes exactly what the
  untouched backbone computes (DPO's reference policy, GRPO's KL anchor): peft's
  ``disable_adapter()``, the bottleneck adapters switched off, or, for tuners that change the
  backbone's own weights, a frozen copy taken by :meth:`Tuner.keep_reference` before training.

The objective (``ftbench.objectives``) owns the loss; nothing here knows about it. The learning rate
lives with the tuner (``lr``) because methods train at very different rates (full 5e-5, LoRA 1e-3,
prompt tuning 3e-2), as in PEFT's method-comparison suite, where each method's experiment folder
carries its own optimizer settings.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional

import torch
from torch import nn

from ftbench.errors import ConfigError
from ftbench.storage import numel

if TYPE_CHECKING:
    from ftbench.backbone import Backbone


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable and total parameters (shared tensors such as tied embeddings counted once)."""
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(numel(p) for p in model.parameters())
    return {"trainable": trainable, "total": total}


def freeze_backbone(model: nn.Module, backbone: "Backbone") -> nn.Module:
    """Freeze every weight; for a quantized backbone first apply peft's k-bit preparation unless
    ``backbone.prepare_kbit`` is off.

    ``prepare_model_for_kbit_training`` upcasts the unquantized weights (embeddings, norms, head) to
    float32 and, with gradient checkpointing, makes the input embeddings' output require grad. With a
    float32 backbone the upcast is a no-op; with bfloat16/float16 it costs memory, which is why it can
    be turned off.
    """
    if backbone.quantization != "none" and backbone.prepare_kbit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=backbone.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    model.requires_grad_(False)
    return model


def refuse_quantized(tuner: "Tuner", backbone: "Backbone") -> None:
    if tuner.trains_backbone_weights and backbone.quantization != "none":
        raise ConfigError(
            f"tuner {tuner.name}: a {backbone.quantization} backbone cannot train its own weights "
            "(quantized weights take no gradient); use backbone.quantization: none, or LoRA on it (QLoRA)"
        )


#: the tuner class that reads each kind of saved folder back (:mod:`ftbench.tuners.saved`), registered
#: by each class that sets ``saved_kind``
SAVED_KINDS: dict[str, type["Tuner"]] = {}


class Tuner:
    """Base of the tuners. Subclasses implement :meth:`prepare` and say what differs."""

    #: the tuner part of the method label (``ftbench.naming``): ``full``, ``lora``, ``adapters``, ...
    name = "tuner"
    #: whether it trains the backbone's own weights (full, freeze) rather than added modules: then it
    #: cannot train a quantized backbone, and its reference (:meth:`reference`) is a frozen copy
    trains_backbone_weights = False
    #: the kind of folder :meth:`save` writes (:func:`ftbench.tuners.saved.saved_kind` tells it by its
    #: files); the class that sets it reads such a folder back (:meth:`load_saved`)
    saved_kind: Optional[str] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("saved_kind"):
            SAVED_KINDS[cls.saved_kind] = cls

    def __init__(self, lr: Optional[float] = None):
        """
        Args:
            lr: Learning rate this method trains with; when set it replaces the optimizer's ``lr``
                (the optimizer config holds the rest: betas, weight decay, 8-bit state).
        """
        if lr is not None and not (lr > 0 and math.isfinite(lr)):
            raise ConfigError(f"tuner.lr must be a positive finite number, got {lr}")
        self.lr = lr
        self._reference: Optional[nn.Module] = None

    @classmethod
    def label_for(cls, init_args: dict[str, Any]) -> str:
        """The tuner part of the method label of this class with these ``init_args`` (a serialised
        config mapping, as :func:`ftbench.config_reading.label_of` reads it): its ``name``."""
        return cls.name

    # ------------------------------------------------------------------ what trains
    def prepare(self, model: nn.Module, backbone: "Backbone") -> nn.Module:
        """Decide what trains: freeze, wrap, add modules. Returns the module to train."""
        raise NotImplementedError

    #: whether :meth:`initialise_from_data` needs training batches before the first step (EVA)
    initialises_from_data = False

    def initialise_from_data(self, model: nn.Module, batches: Iterable[dict[str, Any]]) -> None:
        """Set what trains from training batches, after :meth:`prepare` and before the optimizer is
        made (a data-driven initialisation). Default: nothing."""

    def parameter_counts(self, model: nn.Module) -> dict[str, int]:
        return count_parameters(model)

    def trained_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """What this tuner trained, by parameter name in ``model``."""
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def save(self, model: nn.Module, path: str | Path) -> Path:
        """Save what this tuner trained as safetensors (the default: the whole model)."""
        path = Path(path)
        model.save_pretrained(path, safe_serialization=True)
        return path

    @classmethod
    def load_saved(cls, model: nn.Module, path: Path, backbone: "Backbone", merge: bool = True) -> nn.Module:
        """``model`` with what a tuner of this class saved at ``path`` applied, frozen (a pipeline's
        later stage starts from it); ``merge=False`` keeps added modules apart where they can be
        merged (for inference only). Returns the model (a new object where the method wraps it)."""
        raise NotImplementedError(f"tuner {cls.name}: saves no folder of its own kind")

    # ------------------------------------------------------------------ the untouched backbone
    def keep_reference(self, model: nn.Module) -> Optional[nn.Module]:
        """Called by an objective that needs :meth:`reference`, once, before the first step. A tuner
        that trains the backbone's own weights keeps a frozen copy here and returns it (the objective
        holds it); the others need nothing (None)."""
        if self.trains_backbone_weights:
            self._frozen_copy(model)
        return self._reference

    @contextlib.contextmanager
    def reference(self, model: nn.Module) -> Iterator[nn.Module]:
        """A module that computes what the untouched backbone computes, for the ``with`` block."""
        if self._reference is None:
            raise RuntimeError(f"tuner {self.name}: reference() needs keep_reference(model) before training "
                               "(a frozen copy of the weights as they were)")
        yield self._reference

    def _frozen_copy(self, model: nn.Module) -> None:
        import copy

        if self._reference is None:
            ref = copy.deepcopy(model)
            ref.requires_grad_(False)
            ref.eval()
            self._reference = ref

    # ------------------------------------------------------------------ the optimizer
    def optimizer(self, model: nn.Module, named_parameters: list[tuple[str, nn.Parameter]],
                  make: Any) -> torch.optim.Optimizer:
        """The optimizer ``make`` builds on what this tuner trains (``named_parameters``: the trainable
        ones by name). A tuner that sets rates per group (LoRA+) builds the groups here."""
        return make(named_parameters)

    # ------------------------------------------------------------------ hooks of the shared loop
    def align_logits(self, logits: torch.Tensor, input_length: int) -> torch.Tensor:
        """Logits for exactly the ``input_length`` input positions (prompt tuning prepends some)."""
        return logits

    def regularization(self, model: nn.Module) -> Optional[torch.Tensor]:
        """A term this tuner adds to the training loss (AdaLoRA's orthogonality penalty), or None."""
        return None

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        """Called once per optimizer step, after it and before ``zero_grad``."""

    def merge_for_evaluation(self, model: nn.Module, backbone: "Backbone") -> bool:
        """Fold what trains into the backbone's weights for an evaluation, where that computes the same
        model faster (peft's ``merge_adapter``); True when it merged (then
        :meth:`unmerge_after_evaluation` follows the evaluation). Default: nothing to merge."""
        return False

    def unmerge_after_evaluation(self, model: nn.Module) -> None:
        """Undo :meth:`merge_for_evaluation` before training goes on or weights are saved."""

    #: whether :meth:`generate` continues a KV cache the caller computed for the prompts
    #: (``cache`` in ``sampling``; :mod:`ftbench.evaluation.answer_forward`)
    reuses_prompt_cache = True

    def generate(self, model: nn.Module, tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 max_new_tokens: int, **sampling: Any) -> torch.Tensor:
        """New tokens (B x <= max_new_tokens, right-padded with the pad id) after left-padded prompts
        (``sampling`` goes to ``generate``: ``do_sample``, a ``cache``, ...)."""
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                             use_cache=True, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, **sampling)
        return out[:, input_ids.shape[1]:]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "lr": self.lr}
