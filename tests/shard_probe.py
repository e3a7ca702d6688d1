"""A callback the multi-process tests add to a run (``--trainer.callbacks+ shard_probe.ShardProbe``):
each rank writes ``<out>/rank<R>.pt`` with the whole trainable weights at the start (gathered from
the shards), the optimizer's settings, and every training batch it saw with the loss it returned,
so that a test can replay the same global batches in one process and compare the losses."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch


def whole(t: torch.Tensor) -> torch.Tensor:
    """A parameter as one plain tensor (a DTensor's shards gathered: a collective every rank enters)."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


class ShardProbe(L.Callback):
    def __init__(self, out: str):
        """
        Args:
            out: Folder for the per-rank files.
        """
        self.out = out
        self.seen: dict = {"batches": [], "losses": []}

    def on_train_start(self, trainer, pl_module):
        model = pl_module.model
        self.seen["initial"] = {n: whole(p) for n, p in model.named_parameters() if p.requires_grad}
        group = trainer.optimizers[0].param_groups[0]
        self.seen["optimizer"] = {k: group[k] for k in ("lr", "betas", "eps", "weight_decay")}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen["batches"].append({k: v.detach().clone() for k, v in batch.items() if isinstance(v, torch.Tensor)})
        self.seen["losses"].append(float(outputs["loss"]))

    def on_train_end(self, trainer, pl_module):
        Path(self.out).mkdir(parents=True, exist_ok=True)
        torch.save(self.seen, Path(self.out) / f"rank{trainer.global_rank}.pt")
