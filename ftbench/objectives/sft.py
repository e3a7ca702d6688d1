"""Supervised fine-tuning: next-token loss on the response tokens (labels != -100).

Evaluation: token-weighted loss and perplexity, and the data set's answer metrics (default: exact
match of the greedy answer against the reference answer, recorded as ``accuracy``; see
:mod:`ftbench.evaluation.metrics`), overall and per task (with macro averages) when rows carry a task.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ftbench.data.base import IGNORE_INDEX
from ftbench.objectives.base import Objective
from ftbench.objectives.step import TrainingLoss


def sequence_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence summed next-token loss (float32) and trained-token count (labels != -100 after the shift).

    Position t predicts label t+1: the labels are shifted left (the last position gets -100) rather
    than the logits sliced, which would copy the B x T x vocabulary logits (as transformers'
    ForCausalLMLoss does it too)."""
    return target_losses(logits, F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX))


def target_losses(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence summed cross-entropy (float32) of ``logits[:, t]`` against ``targets[:, t]`` (no
    shift), and the count of targets that are not -100."""
    loss = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="none",
    ).view(targets.shape)
    mask = targets != IGNORE_INDEX
    return (loss * mask).sum(1), mask.sum(1)


class SFT(Objective):
    """Next-token cross-entropy on the response tokens, averaged over the batch's trained tokens."""

    name = "sft"
    needs_reference = holds_reward_model = holds_critic = False  # nothing in memory besides the policy
    # preference data too: its batches carry the chosen sequence under the plain names
    data_regimes = ("instruction", "domain", "multitask", "preference")
    data_needs = "supervised rows (instruction rows, domain text, a task mixture or preference pairs)"
    # packed rows (data.packing): the loss is the same sum over the same trained tokens (ftbench.data.packing)
    packed_regimes = ("instruction", "multitask")
    packing_refusal = ("a packed pair batch holds chosen and rejected sequences together, and SFT trains on the "
                       "chosen ones alone (pack instruction rows instead)")

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean loss over the batch's trained tokens, per-row summed losses, per-row token counts)."""
        logits = self(batch["input_ids"], batch["attention_mask"], batch.get("position_ids"))
        loss_sum, n_tok = sequence_losses(logits, batch["labels"])
        return loss_sum.sum() / n_tok.sum().clamp(min=1), loss_sum, n_tok

    def fused_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss over the batch's trained tokens, their count) by a fused linear cross-entropy
        (``backbone.liger_kernel``): the model runs up to its final hidden states and the loss takes them
        with the output layer's weight, a chunk of rows at a time (:func:`ftbench.levers.fused_linear_cross_entropy`),
        so the B x T x vocabulary logits are never made whole. The same mean as :meth:`loss`'s."""
        from ftbench.levers import fused_linear_cross_entropy, head_bypassed

        with head_bypassed(self.model) as weight:
            hidden = self(batch["input_ids"], batch["attention_mask"], batch.get("position_ids"))
        shift_labels = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
        loss = fused_linear_cross_entropy(hidden.reshape(-1, hidden.size(-1)), weight, shift_labels.reshape(-1))
        return loss, (shift_labels != IGNORE_INDEX).sum()

    def training_loss(self, batch: dict[str, Any]) -> TrainingLoss:
        if self.backbone.liger_kernel:
            loss, trained = self.fused_loss(batch)
        else:
            loss, _, n_tok = self.loss(batch)
            trained = n_tok.sum()
        # a packed batch's rows: its segments (several rows in a block), not its blocks
        rows = batch["segments"].shape[0] if "segments" in batch else batch["input_ids"].shape[0]
        return TrainingLoss(loss, trained, batch["input_ids"], batch["attention_mask"], rows)

    def evaluate(self, batch: dict[str, Any], stage: str) -> None:
        # the answer tokens' logits only, from one forward whose cache generation continues (the same
        # loss within float rounding; ftbench.evaluation.answer_forward), where the batch allows it
        answer = self.evaluator.answer_forward(batch, stage)
        if answer is None:
            _, loss_sum, n_tok = self.loss(batch)
            self.evaluator.update(batch, stage, {"loss": loss_sum}, weights={"loss": n_tok})
            return
        loss_sum, n_tok = target_losses(answer.logits, answer.targets)
        self.evaluator.update(batch, stage, {"loss": loss_sum}, weights={"loss": n_tok},
                              prompt_cache=answer.prompt_cache)

    def derived_metrics(self, results: dict[str, float], stage: str) -> None:
        import math

        for name in list(results):
            if name.endswith("/loss"):
                results[name[: -len("loss")] + "perplexity"] = math.exp(min(results[name], 50.0))
