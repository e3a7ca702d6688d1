"""GaLore (Zhao et al., 2024) from ``galore-torch``: Adam whose moments live in a rank-``rank``
projection of each target weight's gradient, the projection refreshed from the gradient's SVD every
``update_proj_gap`` steps. For an m x n weight (``proj_type: std``) the state is the projector
(r x n when m >= n, else m x r) and two moments of the projected gradient's shape (m x r or r x n),
instead of AdamW's two m x n moments. Every other trainable parameter (embeddings, norms, head,
biases) trains with the same optimizer unprojected, as in the paper's scripts."""

from __future__ import annotations

import contextlib
from typing import Literal, Optional, Sequence
from unittest import mock

import torch

from ftbench.errors import ConfigError
from ftbench.optimizers import ATTENTION_AND_MLP, named_parameters, optional, projected, require

galore_torch = optional("galore_torch")

ProjType = Literal["std", "reverse_std", "right", "left", "full"]


def galore_groups(params, optimizer: str, target_modules: Optional[Sequence[str]], rank: int, update_proj_gap: int,
                  scale: float, proj_type: str) -> list[dict]:
    """The package's two groups: every other parameter, and the projected ones with GaLore's settings."""
    if rank < 1:
        raise ConfigError(f"model.init_args.optimizer.init_args.rank: {optimizer} needs rank >= 1, got {rank}")
    if update_proj_gap < 1:
        raise ConfigError(f"model.init_args.optimizer.init_args.update_proj_gap: must be >= 1, got {update_proj_gap}")
    low_rank, rest = projected(named_parameters(params, optimizer), target_modules or ATTENTION_AND_MLP, optimizer)
    groups = [{"params": rest}] if rest else []
    groups.append({"params": low_rank, "rank": rank, "update_proj_gap": update_proj_gap, "scale": scale,
                   "proj_type": proj_type})
    return groups


class GaLoreAdamW(galore_torch.GaLoreAdamW if galore_torch else torch.optim.Optimizer):
    """galore-torch's ``GaLoreAdamW`` on the 2-D weights of ``target_modules``."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, rank: int = 128, update_proj_gap: int = 200, scale: float = 0.25,
                 proj_type: ProjType = "std", target_modules: Optional[list[str]] = None):
        """
        Args:
            params: The trainable parameters by name (``optimization`` hands them over).
            lr: Learning rate (the tuner's ``lr`` replaces it).
            betas: Adam's betas.
            eps: Adam's epsilon.
            weight_decay: Decoupled weight decay.
            rank: Rank of the projection (the paper: 128 for 1B, 256 for 7B pre-training; LLaMA-Factory 16).
            update_proj_gap: Steps between refreshes of the projection (an SVD of the gradient).
            scale: Factor on the projected-back update (the paper's alpha, 0.25).
            proj_type: Which side is projected: ``std`` the smaller one, ``reverse_std`` the larger,
                ``left``/``right`` always that side, ``full`` both.
            target_modules: Names of the modules whose 2-D weights are projected (default: attention and
                MLP, ``q_proj k_proj v_proj o_proj gate_proj up_proj down_proj``).
        """
        require(galore_torch, "galore-torch", "GaLoreAdamW")
        super().__init__(galore_groups(params, "GaLoreAdamW", target_modules, rank, update_proj_gap, scale, proj_type),
                         lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, no_deprecation_warning=True)


class GaLoreAdamW8bit(galore_torch.GaLoreAdamW8bit if galore_torch else torch.optim.Optimizer):
    """galore-torch's ``GaLoreAdamW8bit`` (bitsandbytes' blockwise 8-bit moments of the projected
    gradients) on the 2-D weights of ``target_modules``."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, rank: int = 128, update_proj_gap: int = 200, scale: float = 0.25,
                 proj_type: ProjType = "std", target_modules: Optional[list[str]] = None, min_8bit_size: int = 4096):
        """
        Args:
            params: The trainable parameters by name (``optimization`` hands them over).
            lr: Learning rate (the tuner's ``lr`` replaces it).
            betas: Adam's betas.
            eps: Adam's epsilon.
            weight_decay: Decoupled weight decay.
            rank: Rank of the projection.
            update_proj_gap: Steps between refreshes of the projection (an SVD of the gradient).
            scale: Factor on the projected-back update (the paper's alpha, 0.25).
            proj_type: Which side is projected (see :class:`GaLoreAdamW`).
            target_modules: Names of the modules whose 2-D weights are projected (default: attention and MLP).
            min_8bit_size: Moments of tensors with fewer elements stay 32-bit (bitsandbytes' rule).
        """
        require(galore_torch, "galore-torch", "GaLoreAdamW8bit")
        super().__init__(galore_groups(params, "GaLoreAdamW8bit", target_modules, rank, update_proj_gap, scale,
                                       proj_type),
                         lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, min_8bit_size=min_8bit_size)
        # galore-torch 1.0 passes (min_8bit_size, percentile_clipping=100, block_wise=True) by position to
        # bitsandbytes' Optimizer2State, whose parameters there are now (min_8bit_size, max_unorm,
        # skip_zeros): that would clip every update at 100 x the weight's norm and skip zero gradients.
        # bitsandbytes' own AdamW8bit has neither; so neither has this
        self.args.max_unorm = 0.0
        self.args.skip_zeros = False

    @torch.no_grad()
    def step(self, closure=None):
        # galore-torch 1.0's 8-bit step calls torch.cuda.synchronize() after each tensor, also where
        # there is no CUDA (a CPU build raises "Torch not compiled with CUDA enabled"); without CUDA
        # there is nothing to wait for
        with contextlib.nullcontext() if torch.cuda.is_available() else mock.patch("torch.cuda.synchronize"):
            return super().step(closure)
