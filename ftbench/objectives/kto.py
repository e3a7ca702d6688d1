"""KTO (Ethayarajh et al. 2024) on unpaired thumbs-up / thumbs-down data, as TRL 1.16's ``KTOTrainer``
(:func:`ftbench.objectives.losses.kto_loss`).

Data: :class:`~ftbench.data.unpaired.UnpairedData` (``configs/data/unpaired.yaml``): prompt, completion and
a boolean label per row; paired preference data is unpaired into a desirable and an undesirable row.

Per row, ``rho = pi - ref`` (summed completion log-probs, as DPO's). The KL estimate
``z = max(0, mean_batch(KL - refKL))`` is read from mismatched completions inside the batch: row ``i``'s
prompt with the previous row's completion (cyclic), under the policy and the reference, with no
gradient (TRL computes the policy's KL log-probs under ``no_grad`` too); a training batch of one row
has none and is refused. ``kto``: desirable ``1 - sig(beta (rho - z))``, undesirable
``1 - sig(beta (z - rho))``; ``apo_zero_unpaired``: ``1 - sig(beta rho)`` / ``sig(beta rho)``, no KL.
Each row's loss is weighted by ``desirable_weight`` or ``undesirable_weight`` and the batch loss is
their plain mean. Before training, a training set with only one kind of label when the weights need
both is refused, and a desirable:undesirable ratio after weighting outside TRL's recommended 1 to 4/3
is warned about once, with the numbers.

What it holds: the reference as DPO's on-the-fly reference (the tuner's
:meth:`~ftbench.tuners.base.Tuner.reference`: LoRA, peft and adapters switch themselves off, full and
freeze keep a frozen copy, ``reference_model``). A step runs three forwards: the policy on the rows
(with gradient), and with no gradient the policy on the KL rows and the reference on both. There is no
``precompute_reference`` (DPO's): the KL rows pair each prompt with whichever row precedes it in the
shuffled batch, so their reference log-probs cannot be computed before training.

Metrics, under TRL's names: ``loss``, ``kl`` (= z), ``rewards/chosen`` and ``logps/chosen`` (means of
``beta * rho`` and ``pi`` over the desirable rows; only when the batch has one), the same ``/rejected``,
``rewards/margins`` (only when both kinds are present). In evaluation the means run over the set, a
batch of one row has ``z = 0``, and the data set's answer metrics are added.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional

import torch
from lightning.pytorch.utilities import rank_zero_warn

from ftbench.data.base import IGNORE_INDEX
from ftbench.data.unpaired import UnpairedData
from ftbench.errors import ConfigError
from ftbench.objectives.base import Objective
from ftbench.objectives.losses import KTO_LOSS_TYPES, kto_loss, sequence_logps
from ftbench.objectives.step import TrainingLoss

#: TRL's recommended range of (desirable_weight x desirable rows) / (undesirable_weight x undesirable rows)
RECOMMENDED_RATIO = (1.0, 4.0 / 3.0)


def check_settings(beta: float, loss_type: str, desirable_weight: float, undesirable_weight: float) -> None:
    """The KTO options that cannot work, each a one-line :class:`~ftbench.errors.ConfigError` naming the option."""
    if loss_type not in KTO_LOSS_TYPES:
        raise ConfigError(f"model.init_args.loss_type: unknown {loss_type!r}; expected one of {', '.join(KTO_LOSS_TYPES)}")
    if isinstance(beta, bool) or not (isinstance(beta, (int, float)) and 0 < beta < float("inf")):
        raise ConfigError(f"model.init_args.beta: must be a positive finite number, got {beta!r}")
    for name, w in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
        if not 0 <= w < float("inf"):
            raise ConfigError(f"model.init_args.{name}: must be a finite number >= 0, got {w}")
    if desirable_weight == 0 and undesirable_weight == 0:
        raise ConfigError("model.init_args.desirable_weight: and undesirable_weight are both 0: nothing to learn from")


def weighting_warning(desirable: int, undesirable: int, desirable_weight: float,
                      undesirable_weight: float) -> Optional[str]:
    """TRL's advice, with the numbers, when ``desirable_weight * desirable / (undesirable_weight * undesirable)``
    is outside 1 to 4/3 (both kinds present, both weights > 0); None when inside."""
    if not (desirable and undesirable and desirable_weight and undesirable_weight):
        return None
    d, u = desirable_weight * desirable, undesirable_weight * undesirable
    low, high = RECOMMENDED_RATIO
    if low <= d / u <= high:
        return None
    return (f"kto: desirable:undesirable after weighting is {desirable} x {desirable_weight:g} : {undesirable} x "
            f"{undesirable_weight:g} = {d / u:.3f}, outside TRL's recommended 1 to 4/3; e.g. desirable_weight in "
            f"[{u / desirable:.3f}, {high * u / desirable:.3f}] or undesirable_weight in "
            f"[{d / (high * undesirable):.3f}, {d / undesirable:.3f}] (not both)")


class KTO(Objective):
    """KTO against the untouched backbone as the reference, on unpaired rows (:mod:`ftbench.data.unpaired`)."""

    needs_reference = True  # the tuner's reference, as DPO's on-the-fly one (see the module doc)

    name = "kto"
    data_regimes = ("unpaired",)
    data_needs = "unpaired rows (prompt, completion, label; configs/data/unpaired.yaml unpairs preference pairs)"

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: Literal["kto", "apo_zero_unpaired"] = "kto",
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        **kwargs,
    ):
        """
        Args:
            beta: Strength of the tie to the reference policy (TRL's default 0.1).
            loss_type: ``kto`` (with the in-batch KL estimate) or ``apo_zero_unpaired`` (no KL).
            desirable_weight: Weight of a desirable row's loss (TRL's default 1.0).
            undesirable_weight: Weight of an undesirable row's loss; keep
                ``desirable_weight x desirable rows / (undesirable_weight x undesirable rows)`` in 1 to 4/3.
        """
        super().__init__(**kwargs)
        check_settings(beta, loss_type, desirable_weight, undesirable_weight)
        self.beta, self.loss_type = float(beta), loss_type
        self.desirable_weight, self.undesirable_weight = float(desirable_weight), float(undesirable_weight)

    def memory_batch(self, batch_size: int, seq_len: int, device: str | torch.device = "meta") -> dict[str, torch.Tensor]:
        """``ftbench estimate``'s batch: ``batch_size`` rows of ``seq_len`` tokens and their KL rows."""
        ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
        batch = {"kto_labels": torch.arange(batch_size, device=device) % 2 == 0}
        for prefix in ("", "kl_"):
            batch.update({f"{prefix}input_ids": ids, f"{prefix}attention_mask": torch.ones_like(ids),
                          f"{prefix}labels": torch.zeros_like(ids)})
        return batch

    # ------------------------------------------------------------------ before training
    def on_fit_start(self) -> None:
        dm = self.trainer.datamodule
        if not isinstance(dm, UnpairedData):
            return
        if self.loss_type == "kto" and dm.batch_size < 2:
            raise ConfigError(f"data.init_args.batch_size: KTO's KL estimate pairs each prompt with another row's "
                              f"completion of its batch and needs at least 2 rows, got {dm.batch_size}",
                              hint="or model.init_args.loss_type: apo_zero_unpaired (no KL estimate)")
        counts = dm.labels_count
        if self.desirable_weight > 0 and self.undesirable_weight > 0:
            option = ("model.init_args.undesirable_weight: 0" if counts["undesirable"] == 0
                      else "model.init_args.desirable_weight: 0")
            dm.check_labels(True, True, option)
        message = weighting_warning(counts["desirable"], counts["undesirable"], self.desirable_weight,
                                    self.undesirable_weight)
        if message is not None:
            rank_zero_warn(message)

    # ------------------------------------------------------------------ the loss
    def compute(self, batch: dict[str, Any], training: bool) -> dict[str, Any]:
        labels = torch.as_tensor(batch["kto_labels"], device=batch["input_ids"].device)
        rows = labels.shape[0]
        has_kl = "kl_input_ids" in batch
        if self.loss_type == "kto" and not has_kl and training:
            raise ConfigError(f"data.init_args.batch_size: KTO's KL estimate needs at least 2 rows in a training batch, "
                              f"got a batch of {rows}")
        fields = [("input_ids", "attention_mask", "labels")]
        if has_kl and self.loss_type == "kto":
            fields.append(("kl_input_ids", "kl_attention_mask", "kl_labels"))
        cat = _stack([[batch[f] for f in names] for names in fields])
        with torch.no_grad(), self.tuner.reference(self.model) as ref:  # first: its activations are gone before the policy's
            ref_logps, _ = sequence_logps(self(cat[0], cat[1], model=ref), cat[2])
        policy_logps, lengths = sequence_logps(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        if len(fields) == 2:
            with torch.no_grad():  # detached anyway (z carries no gradient), as TRL
                kl_logps, _ = sequence_logps(self(batch["kl_input_ids"], batch["kl_attention_mask"]), batch["kl_labels"])
            ref_kl = ref_logps[rows:]
        else:  # apo_zero_unpaired reads no KL; an evaluation batch of one row: z = 0
            kl_logps = ref_kl = torch.zeros_like(policy_logps) if self.loss_type == "kto" else None
        losses, kl, metrics = kto_loss(policy_logps, ref_logps[:rows], labels, kl_logps, ref_kl, self.beta,
                                       self.loss_type, self.desirable_weight, self.undesirable_weight)
        return {"losses": losses, "kl": kl, "metrics": metrics, "labels": labels, "policy": policy_logps,
                "rewards": self.beta * (policy_logps - ref_logps[:rows]).detach(), "lengths": lengths}

    def training_loss(self, batch: dict[str, Any]) -> TrainingLoss:
        out = self.compute(batch, training=True)
        return TrainingLoss(out["losses"].mean(), out["lengths"].sum(), batch["input_ids"], batch["attention_mask"],
                            out["losses"].shape[0], metrics=lambda: out["metrics"])

    def evaluate(self, batch: dict[str, Any], stage: str) -> None:
        out = self.compute(batch, training=False)
        good = out["labels"]
        nan = torch.full_like(out["rewards"], math.nan)
        values = {"loss": out["losses"].detach(), "kl": out["kl"].expand(good.shape[0]),
                  "rewards/chosen": torch.where(good, out["rewards"], nan),
                  "rewards/rejected": torch.where(~good, out["rewards"], nan),
                  "logps/chosen": torch.where(good, out["policy"].detach(), nan),
                  "logps/rejected": torch.where(~good, out["policy"].detach(), nan)}
        self.evaluator.update(batch, stage, values)

    def derived_metrics(self, results: dict[str, float], stage: str) -> None:
        chosen, rejected = results.get(f"{stage}/rewards/chosen"), results.get(f"{stage}/rewards/rejected")
        if chosen is not None and rejected is not None:
            results[f"{stage}/rewards/margins"] = chosen - rejected


def _stack(groups: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Rows of several (ids, mask, labels) groups stacked into one batch, right-padded to one width."""
    width = max(g[0].shape[1] for g in groups)
    pads = (0, 0, IGNORE_INDEX)
    out = []
    for k in range(3):
        parts = [torch.nn.functional.pad(g[k], (0, width - g[k].shape[1]), value=pads[k]) for g in groups]
        out.append(torch.cat(parts, dim=0))
    return out
