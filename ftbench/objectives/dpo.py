"""Direct Preference Optimization (Rafailov et al. 2023) and its variants, against a reference policy.

Log-probabilities
    A sequence's log-prob is the SUM of its completion tokens' log-probs (labels != -100 after the
    causal shift; the prompt and padding are left out), with the log-softmax in float32
    (:func:`ftbench.objectives.losses.sequence_logps`), as TRL, torchtune and LLaMA-Factory compute it.
    Chosen and rejected go through ONE forward: ``cat([chosen, rejected])``, padded to one width (with
    ``data.packing``, their packed blocks: :mod:`ftbench.objectives.pair_forward`).

Losses (:func:`ftbench.objectives.losses.dpo_batch_loss`: every loss type of TRL 1.16, formulas in
:mod:`ftbench.objectives.losses`), with ``D = (pi_c - ref_c) - (pi_r - ref_r)``:
    * ``sigmoid``: ``-logsig(beta * D)``; with ``label_smoothing`` e > 0, conservative DPO,
      ``-(1 - e) logsig(beta * D) - e logsig(-beta * D)``, as TRL <= 0.28, LLaMA-Factory and torchtune
      define it. **TRL 1.x ignores label_smoothing for sigmoid** (it reads it only in robust, exo_pair
      and aot): ftbench applies it and says so in one warning line, so the numbers agree with TRL 1.x
      only at e = 0.
    * ``ipo`` (Azar et al. 2023): ``((c / len_c - r / len_r) - 1 / (2 beta))^2``: with ``sigmoid_norm``
      the only losses that AVERAGE the log-ratios per completion token. Its logged ``rewards/*`` are
      beta x the SUMMED log-ratios, as TRL 1.16 logs them for every loss type (TRL 0.x and ftbench before
      logged the per-token averages, smaller by about the completion length).
    * ``hinge`` (SLiC), ``robust``, ``exo_pair`` (needs 0 < e < 1), ``nca_pair``, ``bco_pair``,
      ``sppo_hard``, ``apo_zero``, ``apo_down``, ``discopop`` (``discopop_tau``), ``sigmoid_norm``: per pair;
      ``aot``, ``aot_unpaired`` (sorted over the batch) and ``sft`` (the chosen tokens' NLL, one token
      mean over the batch): on the batch.
    * a list of loss types with ``loss_weights`` (TRL's MPO: ``[sigmoid, bco_pair, sft]``,
      ``[0.8, 0.2, 1.0]``): ``sum_k w_k mean(loss_k)``.
    * ``sft_weight`` w > 0 adds ``w`` x the mean negative log-likelihood per token of the chosen
      responses of the batch (token-weighted, as the SFT objective's loss; TRL 0.x's ``rpo_alpha``,
      LLaMA-Factory's ``pref_ftx``; the same term as the ``sft`` loss type).

The reference policy, and what each option costs
    * default (``precompute_reference: false``): the reference log-probs come from the tuner's
      :meth:`~ftbench.tuners.base.Tuner.reference` under ``no_grad``, every step. LoRA, any peft method
      and bottleneck adapters switch themselves off (no second copy of anything; one extra no-grad
      forward per step, about a third more compute). Full and freeze tuning keep a frozen copy of the
      whole model, made before the first step: one more set of weights in memory (SmolLM2-135M in
      float32: 538 MB), and the extra forward. The copy is a submodule of the objective
      (``reference_model``), so Lightning moves it to the device, a checkpoint keeps it and the record's
      memory breakdown counts it with the weights; it stays in eval mode.
    * ``precompute_reference: true``: one no-grad pass over every split of the data module (train,
      val and test) before training stores the reference log-probs, 8 bytes a pair, matched to each
      row by a hash of its tokens (never by batch position: the training order is shuffled). After it
      no reference model is held (full and freeze make no frozen copy) and a training step is one
      forward and backward. The table is cached on disk (``reference_cache_dir``), keyed by the
      backbone, the tuner and its initial trainable weights, the precision and the data
      (:mod:`ftbench.objectives.reference_cache`), written atomically, and reused by the next run with
      the same key. For full and freeze tuning the pass reads the model itself, so it must run before
      any step: a model restored from a checkpoint with no cache file for it is refused.
    * a batch that carries ``ref_chosen_logps`` and ``ref_rejected_logps`` (``(pairs,)``, as TRL's
      precomputed datasets do) is taken at its word, whatever the option. ``ftbench estimate`` steps
      DPO on such batches (:meth:`DPO.memory_batch`) when ``precompute_reference`` is on.

Metrics, under TRL's names and meanings, for ``train/`` (per step), ``val/`` and ``test/`` (over the
set): ``loss`` (the preference loss; ``sft_loss`` separately when ``sft_weight`` > 0),
``rewards/chosen`` = mean of ``beta (pi_c - ref_c)``, ``rewards/rejected``, ``rewards/accuracies``
(fraction of pairs with chosen reward > rejected, strict), ``rewards/margins``, ``logps/chosen``,
``logps/rejected`` (means of the summed policy log-probs). Evaluation adds ``pairwise_accuracy``
(= ``rewards/accuracies``, the reward model's name for it) and, for batches whose rows carry an exact
answer (the built-in pairs do), the data set's answer metrics as SFT computes them
(the run's :class:`~ftbench.evaluation.evaluator.Evaluator`; by default ``accuracy``: exact match of the
greedy answer). Training logs ``train/loss`` every step and the other metrics every
``trainer.log_every_n_steps`` steps and at the last.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Union

import torch
from lightning.pytorch.utilities import rank_zero_info

from ftbench.data.pairs import concatenate_pairs, pair_memory_batch, split_pairs
from ftbench.errors import ConfigError
from ftbench.objectives.base import Objective
from ftbench.objectives.pair_forward import is_packed, model_inputs, packed_token_logps
from ftbench.objectives.step import TrainingLoss
from ftbench.objectives.losses import (DPO_LOSS_TYPES, DPO_PAIR_LOSS_TYPES, dpo_batch_loss, dpo_loss, dpo_metrics,
                                       sequence_logps, token_logps)
from ftbench.objectives.reference_cache import (ReferenceTable, cache_meta, cache_path, data_fingerprint,
                                                default_cache_dir, row_keys, weights_hash)

SPLITS = ("train", "val", "test")


#: the loss types that read label_smoothing (TRL 1.16: robust, exo_pair, aot, aot_unpaired; ftbench also sigmoid)
SMOOTHED_TYPES = ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired")

DPOLossType = Literal["sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
                      "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]


def loss_types(loss_type: "str | list[str]") -> list[str]:
    """The loss types of a setting: one name or a list."""
    return [loss_type] if isinstance(loss_type, str) else list(loss_type)


def check_settings(beta: float, loss_type: "str | list[str]", label_smoothing: float, sft_weight: float,
                   loss_weights: Optional[list[float]] = None, discopop_tau: float = 0.05) -> None:
    """The DPO options that cannot work, each a one-line :class:`~ftbench.errors.ConfigError` naming
    the option (the same rules :func:`~ftbench.objectives.losses.dpo_loss` holds its arguments to)."""
    types = loss_types(loss_type)
    if not types:
        raise ConfigError("objective dpo: loss_type is an empty list; give a loss type or a list of them")
    for name in types:
        if name not in DPO_LOSS_TYPES:
            raise ConfigError(f"objective dpo: unknown loss_type {name!r}; expected one of {', '.join(DPO_LOSS_TYPES)}")
    if len(set(types)) != len(types):
        raise ConfigError(f"objective dpo: loss_type lists a type twice: {types}")
    if isinstance(beta, bool) or not (isinstance(beta, (int, float)) and 0 < beta < float("inf")):
        raise ConfigError(f"objective dpo: beta must be a positive finite number, got {beta!r}")
    eps = float(label_smoothing)
    for name in types:
        if name == "sigmoid" and not 0.0 <= eps <= 0.5:
            raise ConfigError(f"objective dpo: label_smoothing must be in [0, 0.5] for loss_type 'sigmoid', got {eps}")
        if name in ("robust", "aot", "aot_unpaired") and not 0.0 <= eps < 0.5:
            raise ConfigError(f"objective dpo: label_smoothing must be in [0, 0.5) for loss_type {name!r}, got {eps}")
        if name == "exo_pair" and not 0.0 < eps < 1.0:
            raise ConfigError(f"objective dpo: loss_type 'exo_pair' needs label_smoothing in (0, 1) (its log(e) term), got {eps}")
    if eps != 0.0 and not any(name in SMOOTHED_TYPES for name in types):
        what = repr(types[0]) if len(types) == 1 else f"any of {types}"
        raise ConfigError(f"objective dpo: label_smoothing is not used by loss_type {what}; set it to 0 (got {eps})")
    if loss_weights is not None:
        if len(loss_weights) != len(types):
            raise ConfigError(f"objective dpo: loss_weights has {len(loss_weights)} weights for the {len(types)} loss "
                              f"types {types}; give one weight per type")
        if not all(w >= 0 for w in loss_weights):
            raise ConfigError(f"objective dpo: loss_weights must be >= 0, got {list(loss_weights)}")
    if "discopop" in types and not discopop_tau > 0:
        raise ConfigError(f"objective dpo: discopop_tau must be > 0, got {discopop_tau}")
    if not sft_weight >= 0:
        raise ConfigError(f"objective dpo: sft_weight must be >= 0, got {sft_weight}")


class ConservativeDPOWarning(UserWarning):
    """Conservative DPO (sigmoid with label smoothing), which TRL 1.x would silently not apply."""


class DPO(Objective):
    """DPO and its variants (``loss_type``) against the untouched backbone as the reference policy."""

    name = "dpo"
    data_regimes = ("preference",)
    data_needs = "preference pairs (chosen and rejected answers)"
    packed_regimes = ("preference",)  # each sequence's log-probs gathered from its segment

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: Union[DPOLossType, list[DPOLossType]] = "sigmoid",
        label_smoothing: float = 0.0,
        loss_weights: Optional[list[float]] = None,
        discopop_tau: float = 0.05,
        sft_weight: float = 0.0,
        precompute_reference: bool = False,
        reference_cache_dir: Optional[str] = None,
        **kwargs,
    ):
        """
        Args:
            beta: Strength of the tie to the reference policy (IPO's tau). TRL's default 0.1.
            loss_type: A TRL 1.16 loss type (``sigmoid``: DPO, conservative DPO with ``label_smoothing``;
                ``ipo``, ``hinge``, ``robust``, ``exo_pair``, ``nca_pair``, ``bco_pair``, ``sppo_hard``, ``aot``,
                ``aot_unpaired``, ``apo_zero``, ``apo_down``, ``discopop``, ``sft``, ``sigmoid_norm``) or a
                list of them, weighted by ``loss_weights`` (MPO: ``[sigmoid, bco_pair, sft]``).
            label_smoothing: e, the assumed rate of flipped preference labels: ``sigmoid`` [0, 0.5]
                (applied, unlike TRL 1.x: a warning says so), ``robust``/``aot``/``aot_unpaired`` [0, 0.5),
                ``exo_pair`` (0, 1); must be 0 when no listed type reads it.
            loss_weights: One weight per loss type of the list (default 1.0 each); the batch loss is
                ``sum_k w_k mean(loss_k)``.
            discopop_tau: ``discopop``'s temperature (TRL's default 0.05).
            sft_weight: Weight of the chosen responses' mean NLL per token added to the loss (RPO,
                LLaMA-Factory's ``pref_ftx``); 0 = none.
            precompute_reference: Compute the reference log-probs once before training (cached on
                disk) and hold no reference model while training; see the module docstring.
            reference_cache_dir: Where precomputed reference log-probs are cached (default
                ``$FTBENCH_CACHE/reference_logps``, i.e. ``~/.cache/ftbench/reference_logps``).
        """
        super().__init__(**kwargs)
        check_settings(beta, loss_type, label_smoothing, sft_weight, loss_weights, discopop_tau)
        self.beta, self.loss_type, self.label_smoothing = float(beta), loss_type, float(label_smoothing)
        self.loss_types = loss_types(loss_type)
        self.loss_weights = None if loss_weights is None else [float(w) for w in loss_weights]
        self.discopop_tau = float(discopop_tau)
        if "sigmoid" in self.loss_types and self.label_smoothing > 0:
            warnings.warn(f"objective dpo: label_smoothing {self.label_smoothing} with loss_type sigmoid is conservative "
                          "DPO (as TRL <= 0.28, LLaMA-Factory and torchtune compute it); TRL 1.x ignores label_smoothing "
                          "for sigmoid, so its numbers differ", ConservativeDPOWarning, stacklevel=2)
        self.sft_weight = float(sft_weight)
        self.precompute_reference = precompute_reference
        self.reference_cache_dir = reference_cache_dir
        self.reference_table: Optional[ReferenceTable] = None
        #: ``cache`` (read from disk) or ``computed`` once the precomputed table is there
        self.reference_source: Optional[str] = None
        self.reference_cache_file: Optional[Path] = None
        self._initial_weights: Optional[str] = None

    def memory_batch(self, batch_size: int, seq_len: int, device: str | torch.device = "meta") -> dict[str, torch.Tensor]:
        """``ftbench estimate``'s batch: ``batch_size`` pairs of two ``seq_len``-token sequences; with
        ``precompute_reference`` it carries the reference log-probs (a step then runs no reference)."""
        batch = pair_memory_batch(batch_size, seq_len, device)
        if self.precompute_reference:
            batch["ref_chosen_logps"] = batch["ref_rejected_logps"] = torch.zeros(batch_size, device=device)
        return batch

    @property
    def needs_reference(self) -> bool:
        return not self.precompute_reference

    def configure_model(self) -> None:
        fresh = self.model is None
        super().configure_model()
        if not fresh:
            return
        if self.precompute_reference:
            # before a checkpoint is restored or a step taken: these are the weights the reference starts
            # from (ftbench estimate builds the model on meta: no data, nothing to hash)
            if not any(p.is_meta for p in self.model.parameters()):
                self._initial_weights = weights_hash(self.model)

    # ------------------------------------------------------------------ log-probs
    def _precision_context(self):
        trainer = self._trainer
        return trainer.precision_plugin.forward_context() if trainer is not None else contextlib.nullcontext()

    def sequence_logps(self, cat: dict[str, torch.Tensor], model: Optional[torch.nn.Module] = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed completion log-probs and completion lengths of the concatenated rows, ``(2 pairs,)``."""
        logits = self(cat["input_ids"], cat["attention_mask"], model=model)
        return sequence_logps(logits, cat["labels"])

    def reference_logps(self, batch: dict[str, Any], cat: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's summed log-probs of the chosen and rejected completions, ``(pairs,)`` each:
        from the batch when it carries them (``ref_chosen_logps``/``ref_rejected_logps``, as TRL's
        precomputed datasets do), else from the precomputed table, else from the reference model."""
        device = cat["input_ids"].device
        if "ref_chosen_logps" in batch and "ref_rejected_logps" in batch:
            return (torch.as_tensor(batch["ref_chosen_logps"], dtype=torch.float32, device=device),
                    torch.as_tensor(batch["ref_rejected_logps"], dtype=torch.float32, device=device))
        if self.precompute_reference:
            if self.reference_table is None:
                self.ensure_reference_table()
            return self.reference_table.lookup(row_keys(batch), device)
        with torch.no_grad(), self.tuner.reference(self.model) as ref:
            if is_packed(batch):
                logps = packed_token_logps(self, batch, batch["packed_labels"], cat["labels"].shape[1], model=ref)[0].sum(-1)
            else:
                logps, _ = self.sequence_logps(cat, model=ref)
        return split_pairs(logps, batch["chosen_input_ids"].shape[0])

    def compute(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Policy and reference log-probs, the batch loss, the per-pair losses and the implicit rewards."""
        n = batch["chosen_input_ids"].shape[0]
        cat = concatenate_pairs(batch, ("input_ids", "attention_mask", "labels"))
        ref_c, ref_r = self.reference_logps(batch, cat)  # first: its no-grad activations are gone before the policy's
        if is_packed(batch):  # the blocks' log-probs laid out as the concatenated rows' (ftbench.objectives.pair_forward)
            tokens, mask = packed_token_logps(self, batch, batch["packed_labels"], cat["labels"].shape[1])
        else:
            logits = self(cat["input_ids"], cat["attention_mask"])
            tokens, mask = token_logps(logits, cat["labels"])
        logps, lengths = tokens.sum(-1), mask.sum(-1)  # = sequence_logps
        (pol_c, pol_r), (len_c, len_r) = split_pairs(logps, n), split_pairs(lengths, n)
        loss = dpo_batch_loss(pol_c, pol_r, ref_c, ref_r, self.beta, self.loss_types, self.label_smoothing, len_c, len_r,
                              self.discopop_tau, self.loss_weights, tokens[:n], mask[:n])
        losses = self.pair_losses(pol_c, pol_r, ref_c, ref_r, len_c, len_r, loss)
        return {"cat": cat, "loss": loss, "losses": losses,
                "chosen_rewards": self.beta * (pol_c - ref_c).detach(),
                "rejected_rewards": self.beta * (pol_r - ref_r).detach(),
                "policy_chosen": pol_c, "policy_rejected": pol_r, "lengths": lengths,
                # the chosen responses' NLL per token over the batch (the SFT term)
                "sft_loss": -pol_c.sum() / len_c.sum().clamp(min=1), "sft_rows": -pol_c, "sft_tokens": len_c}

    def pair_losses(self, pol_c, pol_r, ref_c, ref_r, len_c, len_r, batch_loss) -> torch.Tensor:
        """One loss value per pair (what evaluation averages, per task too): the weighted per-pair losses
        of the per-pair types; a type defined on the batch (aot, aot_unpaired, sft) gives every pair of
        the batch its batch value. Their mean over the pairs is the batch loss."""
        weights = self.loss_weights or [1.0] * len(self.loss_types)
        if all(t in DPO_PAIR_LOSS_TYPES for t in self.loss_types):
            total = 0.0
            for name, w in zip(self.loss_types, weights):
                losses, _, _ = dpo_loss(pol_c, pol_r, ref_c, ref_r, self.beta, name, self.label_smoothing, len_c, len_r,
                                        self.discopop_tau)
                total = total + w * losses
            return total
        return batch_loss.detach().expand(pol_c.shape[0])

    # ------------------------------------------------------------------ training
    def training_loss(self, batch: dict[str, Any]) -> TrainingLoss:
        out = self.compute(batch)
        loss = out["loss"]
        if self.sft_weight > 0:
            loss = loss + self.sft_weight * out["sft_loss"]

        def metrics() -> dict[str, torch.Tensor]:
            logged = dpo_metrics(out["chosen_rewards"], out["rejected_rewards"], out["policy_chosen"],
                                 out["policy_rejected"])
            if self.sft_weight > 0:
                logged["sft_loss"] = out["sft_loss"].detach()
            return logged

        ids, mask = model_inputs(batch, out["cat"])
        return TrainingLoss(loss, out["lengths"].sum(), ids, mask, out["losses"].shape[0], metrics=metrics)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, batch: dict[str, Any], stage: str) -> None:
        out = self.compute(batch)
        rc, rr = out["chosen_rewards"], out["rejected_rewards"]
        right = (rc > rr).float()
        values = {"loss": out["losses"], "rewards/chosen": rc, "rewards/rejected": rr, "rewards/accuracies": right,
                  "rewards/margins": rc - rr, "logps/chosen": out["policy_chosen"],
                  "logps/rejected": out["policy_rejected"], "pairwise_accuracy": right}
        weights = {}
        if self.sft_weight > 0:
            values["sft_loss"], weights["sft_loss"] = out["sft_rows"], out["sft_tokens"]
        self.evaluator.update(batch, stage, values, weights)

    # ------------------------------------------------------------------ precomputed reference
    def on_fit_start(self) -> None:
        if self.precompute_reference:
            self.ensure_reference_table()

    def on_validation_start(self) -> None:
        if self.precompute_reference:
            self.ensure_reference_table()

    def on_test_start(self) -> None:
        if self.precompute_reference:
            self.ensure_reference_table()

    def _preference_batches(self, dm=None) -> Iterator[dict[str, Any]]:
        """Every pair of the data module's splits, in batches (no shuffling, no RNG drawn)."""
        if dm is None and self._trainer is not None:
            dm = self.trainer.datamodule
        if dm is None:
            raise RuntimeError("objective dpo: precompute_reference needs a data module (trainer.fit(model, datamodule=...))")
        splits = getattr(dm, "splits", None)
        if splits and hasattr(dm, "collator"):
            collate = dm.collator(generation=False)
            size = getattr(dm, "eval_batch_size", None) or getattr(dm, "batch_size", None) or 8
            for name in SPLITS:
                items = splits.get(name) or []
                for i in range(0, len(items), size):
                    yield collate(items[i:i + size])
            return
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        for name in SPLITS:
            try:
                loader = getattr(dm, f"{name}_dataloader")()
            except (MisconfigurationException, NotImplementedError):
                continue
            yield from loader

    def ensure_reference_table(self, datamodule=None) -> ReferenceTable:
        """The reference log-probs of every pair of the data: read from the cache file made for this
        backbone, tuner, precision and data, or computed now by one no-grad pass and written there.

        Called by the hooks with the trainer's data module; ``datamodule`` (set up) lets it run without a
        trainer, after :meth:`configure_model` (the precision is then ``32-true``)."""
        if self.reference_table is not None:
            return self.reference_table
        assert self.model is not None, "configure_model() first"
        keys = [k for batch in self._preference_batches(datamodule) for k in row_keys(batch)]
        if not keys:
            raise RuntimeError("objective dpo: precompute_reference: the data module has no preference pairs")
        if self._initial_weights is None:
            self._initial_weights = weights_hash(self.model)
        precision = str(self._trainer.precision) if self._trainer is not None else "32-true"
        meta = cache_meta(self.backbone, self.tuner, self._initial_weights, precision, data_fingerprint(keys))
        path = cache_path(self.reference_cache_dir or default_cache_dir(), meta)
        table = ReferenceTable.load(path, meta)
        if table is not None and table.covers(keys):
            self.reference_source = "cache"
        else:
            table = self._compute_reference_table(meta, datamodule)
            if self._trainer is None or self.trainer.is_global_zero:
                table.save(path)
            self.reference_source = "computed"
        self.reference_table, self.reference_cache_file = table, path
        took = f"computed in {table.seconds:.1f} s" if table.seconds is not None else "computed"
        how = took if self.reference_source == "computed" else f"read from the cache ({took} by an earlier run)"
        rank_zero_info(f"dpo: reference log-probs of {len(table)} pairs {how}: {path}")
        return table

    @torch.no_grad()
    def _compute_reference_table(self, meta: dict[str, Any], datamodule=None) -> ReferenceTable:
        copy_tuner = self.tuner.trains_backbone_weights
        if copy_tuner and weights_hash(self.model) != self._initial_weights:
            raise RuntimeError(
                f"objective dpo: precompute_reference: tuner {self.tuner.name} changes the backbone's own weights and "
                "they have changed already (restored from a checkpoint?), so the model is no longer the reference; "
                "run the reference pass before training (the cache file of the first run is reused), or use "
                "precompute_reference: false")
        t0 = time.perf_counter()
        keys, chosen, rejected = [], [], []
        was_training = self.model.training
        self.model.eval()  # no dropout: the reference is deterministic
        try:
            with contextlib.ExitStack() as stack:
                # full/freeze: before any step the model is the untouched backbone; others switch off
                ref = self.model if copy_tuner else stack.enter_context(self.tuner.reference(self.model))
                stack.enter_context(self._precision_context())
                for batch in self._preference_batches(datamodule):
                    cat = {k: v.to(self.device) for k, v in
                           concatenate_pairs(batch, ("input_ids", "attention_mask", "labels")).items()}
                    logps, _ = self.sequence_logps(cat, model=ref)
                    keys += row_keys(batch)
                    c, r = split_pairs(logps.float().cpu(), batch["chosen_input_ids"].shape[0])
                    chosen.append(c)
                    rejected.append(r)
        finally:
            self.model.train(was_training)
        return ReferenceTable(keys, torch.cat(chosen), torch.cat(rejected), meta, time.perf_counter() - t0)
