"""APOLLO and APOLLO-Mini (Zhu et al., 2025) from ``apollo-torch``: Adam's moments kept for a
random rank-``rank`` projection of each target weight's gradient (the projection a seeded Gaussian
matrix, redrawn every ``update_proj_gap`` steps), used only to scale the raw gradient channel by
channel (``scale_type: channel``) or as a whole (``tensor``). For an m x n weight with m >= n the state
is the r x n projector and two r x n moments (m x r each when m < n), plus the norm-growth limiter's
scalar. APOLLO-Mini is rank 1 with a tensor-wise scale and ``scale`` 128 (configs/optim/apollo_mini.yaml).
Every other trainable parameter trains with plain Adam in the same optimizer."""

from __future__ import annotations

from typing import Literal, Optional

from ftbench.errors import ConfigError
import torch

from ftbench.optimizers import ATTENTION_AND_MLP, named_parameters, optional, projected, require

apollo_torch = optional("apollo_torch")


class APOLLOAdamW(apollo_torch.APOLLOAdamW if apollo_torch else torch.optim.Optimizer):
    """apollo-torch's ``APOLLOAdamW`` on the 2-D weights of ``target_modules``."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, rank: int = 256, update_proj_gap: int = 200, scale: float = 1.0,
                 scale_type: Literal["channel", "tensor"] = "channel", proj: Literal["random", "svd"] = "random",
                 proj_type: Literal["std", "reverse_std", "left", "right"] = "std",
                 target_modules: Optional[list[str]] = None, scale_front: bool = False, disable_nl: bool = False):
        """
        Args:
            params: The trainable parameters by name (``optimization`` hands them over).
            lr: Learning rate (the tuner's ``lr`` replaces it).
            betas: Adam's betas.
            eps: Adam's epsilon.
            weight_decay: Decoupled weight decay.
            rank: Rank of the projection (APOLLO 256; APOLLO-Mini 1).
            update_proj_gap: Steps between redraws of the projection.
            scale: Factor sqrt(scale) on the scaled gradient (APOLLO 1; APOLLO-Mini 128).
            scale_type: ``channel`` (APOLLO) or ``tensor`` (APOLLO-Mini) gradient scaling.
            proj: ``random`` (APOLLO: a seeded Gaussian) or ``svd`` (GaLore's projector).
            proj_type: Which side is projected (``std``: the smaller).
            target_modules: Names of the modules whose 2-D weights are projected (default: attention and MLP).
            scale_front: Apply sqrt(scale) before the norm-growth limiter instead of after.
            disable_nl: Turn the norm-growth limiter off.
        """
        require(apollo_torch, "apollo-torch", "APOLLOAdamW")
        if rank < 1:
            raise ConfigError(f"model.init_args.optimizer.init_args.rank: APOLLO needs rank >= 1, got {rank}")
        low_rank, rest = projected(named_parameters(params, "APOLLOAdamW"), target_modules or ATTENTION_AND_MLP,
                                   "APOLLOAdamW")
        groups = [{"params": rest}] if rest else []
        groups.append({"params": low_rank, "rank": rank, "proj": proj, "scale_type": scale_type,
                       "update_proj_gap": update_proj_gap, "scale": scale, "proj_type": proj_type})
        super().__init__(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, scale_front=scale_front,
                         disable_nl=disable_nl)
