"""Muon (Jordan et al., 2024; torch.optim.Muon) on the 2-D hidden weights and AdamW on everything
else, as Muon's authors prescribe: the embeddings, the output (or score) head, the norms and the
biases. One optimizer, two parameter groups each stepped by its own torch optimizer. With
``adjust_lr_fn: match_rms_adamw`` (Moonshot's Muon, the default here) Muon's update is rescaled to
AdamW's RMS (0.2 sqrt(max(m, n))), so both groups share one learning rate and one weight decay (the
tuner's ``lr`` sets both). State: one momentum buffer per hidden weight (m x n) and AdamW's two
moments and step for the rest."""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch

from ftbench.optimizers import PairingError, named_parameters

#: parameter-name parts of the 2-D weights that are not hidden layers (they train with AdamW)
NOT_HIDDEN = ["embed", "lm_head", "score", "wte", "wpe"]


class MuonWithAdamW(torch.optim.Optimizer):
    """``torch.optim.Muon`` for the 2-D hidden weights and ``torch.optim.AdamW`` for the rest."""

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5,
                 adjust_lr_fn: Optional[Literal["original", "match_rms_adamw"]] = "match_rms_adamw",
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 adamw_params: Optional[list[str]] = None):
        """
        Args:
            params: The trainable parameters by name (``optimization`` hands them over).
            lr: Learning rate of both groups (the tuner's ``lr`` replaces it).
            weight_decay: Decoupled weight decay of both groups (Moonshot: 0.1).
            momentum: Muon's momentum.
            nesterov: Muon's Nesterov momentum.
            ns_steps: Newton-Schulz iterations of Muon's orthogonalisation.
            adjust_lr_fn: Muon's learning-rate rescaling (``match_rms_adamw``: AdamW's rate works for
                both groups; ``original``: Keller Jordan's, which wants a larger rate than AdamW's).
            betas: AdamW's betas.
            eps: AdamW's epsilon.
            adamw_params: Name parts of the 2-D weights that train with AdamW (default: ``embed``,
                ``lm_head``, ``score``, ``wte``, ``wpe``); every 1-D parameter does too.
        """
        named = named_parameters(params, "MuonWithAdamW")
        not_hidden = NOT_HIDDEN if adamw_params is None else adamw_params
        hidden = [p for n, p in named if p.ndim == 2 and not any(k in n for k in not_hidden)]
        chosen = {id(p) for p in hidden}
        rest = [p for _, p in named if id(p) not in chosen]
        if not hidden:
            raise PairingError("MuonWithAdamW", "it orthogonalises the updates of 2-D hidden weights, and none trains "
                                                "here", hint="use AdamW (configs/optim/adamw.yaml)")
        self.muon = torch.optim.Muon(hidden, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                     ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn)
        self.adamw = torch.optim.AdamW(rest, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay) if rest else None
        super().__init__(self.muon.param_groups + (self.adamw.param_groups if self.adamw else []), {"lr": lr})
        self._share()

    def _share(self) -> None:
        """The two optimizers step the groups and the one state this optimizer shows (so a schedule
        that sets ``lr`` here sets it there, and the state is one dict)."""
        k = len(self.muon.param_groups)
        self.muon.param_groups = self.param_groups[:k]
        self.muon.state = self.state
        if self.adamw is not None:
            self.adamw.param_groups = self.param_groups[k:]
            self.adamw.state = self.state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        if self.adamw is not None:
            self.adamw.step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._share()
