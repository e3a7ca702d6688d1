"""BAdam (Luo et al., 2024) from ``badam``: block-coordinate Adam. The trainable weights are cut into
blocks (one per transformer layer, by the ``layers.N.`` prefix; optionally the embeddings and the head
and everything else as blocks of their own); only the active block requires grad and has Adam
state, and every ``switch_block_every`` steps the next block (``switch_mode``: descending from the last
layer, ascending, random, or fixed) becomes active and the state starts afresh. BAdam keeps the
active block's weights in float32 (a copy even where they already are) and steps those: its memory is
the active block's gradients, two float32 moments and the float32 copy."""

from __future__ import annotations

from typing import Literal, Optional

import torch

from ftbench.errors import ConfigError
from ftbench.optimizers import PairingError, named_parameters, optional, require

badam = optional("badam")


class BAdam(badam.BlockOptimizer if badam else torch.optim.Optimizer):
    """badam's ``BlockOptimizer`` around ``torch.optim.AdamW``."""

    def __init__(self, params, lr: float = 1e-5, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, switch_block_every: int = 50,
                 switch_mode: Literal["descending", "ascending", "random", "fixed"] = "descending",
                 start_block: Optional[int] = None, include_embedding: bool = False, include_lm_head: bool = False,
                 always_active: Optional[list[str]] = None):
        """
        Args:
            params: The trainable parameters by name (``optimization`` hands them over).
            lr: Learning rate (the tuner's ``lr`` replaces it).
            betas: Adam's betas.
            eps: Adam's epsilon.
            weight_decay: Decoupled weight decay.
            switch_block_every: Optimizer steps before the next block becomes active.
            switch_mode: Block order: ``descending`` (from the last layer, BAdam's default), ``ascending``,
                ``random`` (a fresh permutation each pass), ``fixed`` (always ``start_block``).
            start_block: Index of the first active block (default: the mode's first).
            include_embedding: The embeddings are a block of their own.
            include_lm_head: The head and every parameter outside the layers are one more block (without
                it they stay frozen).
            always_active: Name parts of parameters that train at every step besides the active block
                (BAdam's ``active_modules``; default ``[score.]``: a reward model's new score head, which
                starts random, always trains).
        """
        require(badam, "badam", "BAdam")
        named = named_parameters(params, "BAdam")
        if any("lora_" in n for n, _ in named):  # the package's own "LoRA mode" test
            raise PairingError("BAdam", "it updates the backbone's own weights one block at a time, and LoRA leaves "
                                        "them frozen (LoRA adapters are the trainable parameters here)")
        if switch_block_every < 1:
            raise ConfigError(f"model.init_args.optimizer.init_args.switch_block_every: must be >= 1, got {switch_block_every}")
        base = torch.optim.AdamW([p for _, p in named], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        blocks = self.infer_param_groups([n for n, _ in named], include_embedding, include_lm_head)
        if not blocks:
            raise PairingError("BAdam", "it finds no block (no trainable parameter of a layers.N. block, and neither "
                                        "include_embedding nor include_lm_head)")
        if start_block is not None and not 0 <= start_block < len(blocks):
            raise ConfigError(f"model.init_args.optimizer.init_args.start_block: {start_block} is not one of BAdam's "
                              f"{len(blocks)} blocks (0 to {len(blocks) - 1})")
        active = ["score."] if always_active is None else list(always_active)
        super().__init__(base, named, block_prefix_list=blocks, switch_block_every=switch_block_every,
                         start_block=start_block, switch_mode=switch_mode, active_modules=active, verbose=0)

    def switch_trainable_params(self, verbose: Optional[int] = None) -> None:
        # BlockOptimizer.step calls this with its default verbose=1, which prints the new block's
        # prefixes at every switch; ftbench's runs log instead
        super().switch_trainable_params(self.verbose)

    def step(self, closure=None):
        # BlockOptimizer copies the gradients to its float32 block before it calls the base
        # optimizer's step with the closure, so a closure (Lightning's fp32 loop runs forward and
        # backward in one) must run first
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        super().step()
        return loss

    @property
    def master_weights(self) -> list[torch.Tensor]:
        """The float32 copies of the active block that BAdam steps (kept outside any optimizer state)."""
        return list(self.param_idx2hp.values())
