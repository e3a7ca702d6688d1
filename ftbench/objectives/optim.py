"""The optimizer and learning-rate schedule of a run, from the objective's settings and the tuner."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from ftbench.errors import ConfigError
from ftbench.optimizers import PairingError

if TYPE_CHECKING:
    from ftbench.tuners.base import Tuner


def make_optimizer(model: torch.nn.Module, tuner: "Tuner", factory: Callable, method: str,
                   extra: Sequence[tuple[str, torch.nn.Parameter]] = ()) -> torch.optim.Optimizer:
    """The optimizer ``factory`` makes on what ``tuner`` trains in ``model``, at the tuner's ``lr`` when
    it has one. The factory receives the trainable parameters by name, ``[(name, parameter), ...]``
    (torch's optimizers take them as they are; GaLore, APOLLO, BAdam and Muon choose their groups by
    name, see :mod:`ftbench.optimizers`); a tuner that groups them itself (LoRA+) does so in
    :meth:`Tuner.optimizer`. ``extra``: trainable parameters outside ``model`` that the same optimizer
    steps (PPO's critic). ``method`` (the method label) names the run in a refusal."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad] + list(extra)
    if not named:
        raise ConfigError(f"{method}: nothing to train (no parameter requires grad)")
    make = factory if tuner.lr is None else functools.partial(factory, lr=tuner.lr)
    try:
        return tuner.optimizer(model, named, make)
    except PairingError as err:
        raise ConfigError(f"model.init_args.optimizer: {err.optimizer} cannot train {method}: {err.reason}",
                          hint=err.hint) from None
    except ConfigError:
        raise
    except ValueError as err:  # torch's own checks: "Invalid learning rate: -0.1", ...
        raise ConfigError(f"model.init_args.optimizer: {err}") from None


def optimization(model: torch.nn.Module, tuner: "Tuner", factory: Callable, method: str, schedule: str,
                 warmup_steps: int, total_steps: int, extra: Sequence[tuple[str, torch.nn.Parameter]] = ()) -> dict:
    """Lightning's ``configure_optimizers`` answer: :func:`make_optimizer`'s optimizer, and
    ``transformers.get_scheduler``'s ``schedule`` stepped per optimizer step over ``total_steps`` (every
    parameter group's rate follows it, each from its own: LoRA+'s B matrices stay at their ratio)."""
    from transformers import get_scheduler

    optimizer = make_optimizer(model, tuner, factory, method, extra)
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
