"""Optimizers that need to know *which* weights they train, each from its own package, none
re-implemented: GaLore (``galore-torch``), APOLLO and APOLLO-Mini (``apollo-torch``), BAdam
(``badam``) and Muon with AdamW (``torch.optim.Muon``). Adafactor (``torch.optim.Adafactor``) and
the AdamW family need nothing of this and are used by their own ``class_path``.

What a class here adds to its package's optimizer is the parameter grouping the package leaves to
the training script: GaLore and APOLLO project the gradients of the 2-D weights of attention and MLP
(chosen by a target list, as peft's ``target_modules``) and train the rest with plain Adam; Muon
orthogonalises the updates of the 2-D hidden weights while AdamW trains the embeddings, the head,
the norms and the biases; BAdam makes its blocks from the ``layers.N.`` prefixes. So each receives
the trainable parameters *by name*: :func:`ftbench.objectives.optim.optimization` hands every
optimizer ``[(name, parameter), ...]``, which torch's own optimizers take as they are (and keep as
``param_names``).

An optimizer that cannot train what the tuner trains (GaLore or APOLLO when none of its target
weights trains, e.g. LoRA on a 4-bit backbone; BAdam with LoRA) raises :class:`PairingError` before
it touches anything; ``optimization`` says it in one line naming the optimizer and the method.

The packages are the optional extra ``ftbench[optim]`` (also in ``dev``); a missing one is one line
saying so when the optimizer is made (:func:`require`).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Iterable, Optional, Sequence

import torch

from ftbench.errors import ConfigError

#: the 2-D weights GaLore and APOLLO project, as their papers (attention and MLP of every block)
ATTENTION_AND_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class PairingError(ConfigError):
    """An optimizer that cannot train what this tuner trains; ``reason`` is the optimizer's side."""

    def __init__(self, optimizer: str, reason: str, hint: str = "use tuner full or freeze"):
        super().__init__(f"{optimizer}: {reason}", hint=hint)
        self.optimizer = optimizer
        self.reason = reason


def optional(module: str) -> Optional[ModuleType]:
    """``import module``, or None where it is not installed (the class that needs it then says so when
    it is made, see :func:`require`: a class path that cannot be imported would reach the user as the
    config parser's many-line error)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def require(module: Optional[ModuleType], package: str, optimizer: str) -> None:
    """One line naming the package and the extra that installs it, where ``module`` is missing."""
    if module is None:
        raise ConfigError(f"model.init_args.optimizer: {optimizer} needs the {package} package: "
                          "pip install 'ftbench[optim]'")


def named_parameters(params: Iterable[Any], optimizer: str) -> list[tuple[str, torch.nn.Parameter]]:
    """``[(name, parameter)]`` from what an optimizer was given: named parameters, or parameter
    groups that carry ``param_names`` (as torch keeps them). Plain tensors have no names to choose by."""
    out: list[tuple[str, torch.nn.Parameter]] = []
    for item in params:
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            out.append(item)
        elif isinstance(item, dict) and "param_names" in item:
            out.extend(zip(item["param_names"], item["params"]))
        else:
            raise PairingError(optimizer, "it chooses its parameter groups by parameter name, and was given "
                                          "unnamed parameters (a tuner that builds its own groups, e.g. LoRA+)",
                               hint="use it with tuner full or freeze, or use another optimizer")
    return out


def module_name(parameter_name: str) -> str:
    """``model.layers.0.self_attn.q_proj.weight`` -> ``q_proj`` (the module that holds the weight)."""
    parts = parameter_name.split(".")
    return parts[-2] if len(parts) >= 2 else ""


def projected(named: Sequence[tuple[str, torch.nn.Parameter]], target_modules: Sequence[str],
              optimizer: str) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(the 2-D weights of ``target_modules``, every other parameter): the first are projected. As
    peft's ``target_modules``, a target matches the name of the module that holds the weight."""
    if not target_modules:
        raise ConfigError(f"model.init_args.optimizer.init_args.target_modules: {optimizer} needs at least one "
                          f"module name (e.g. {ATTENTION_AND_MLP})")
    targets = set(target_modules)
    low_rank = [p for n, p in named if p.ndim == 2 and module_name(n) in targets]
    if not low_rank:
        raise PairingError(optimizer, f"it projects the gradients of the 2-D weights of {list(target_modules)}, and "
                                      "none of them trains here")
    chosen = {id(p) for p in low_rank}
    return low_rank, [p for _, p in named if id(p) not in chosen]
