"""The shared loop. Every method is this module plus a ``prepare`` that decides what trains.

Loss, token counting, evaluation (loss, perplexity, exact match by greedy generation, per task),
logging and the optimizer/scheduler live here and only here, so that a difference between two
methods in a results table comes from the method and nothing else.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal, Optional

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torchmetrics import MeanMetric

from ftbench.backbone import Backbone
from ftbench.data.base import IGNORE_INDEX


FINITE_CHECK_EVERY = 10  # batches between host reads of the non-finite-loss flag on CUDA


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""

    def __init__(self, step: int, value: float):
        self.step, self.value = step, value
        super().__init__(f"training loss is {value} at step {step}")


def _numel(p: torch.Tensor) -> int:
    """Parameters a tensor stands for: a bitsandbytes 4-bit weight packs two into each byte and
    keeps its real shape in ``quant_state``."""
    quant_state = getattr(p, "quant_state", None)
    shape = getattr(quant_state, "shape", None)
    return int(math.prod(shape)) if shape is not None else p.numel()


def normalize_answer(text: str) -> str:
    """Exact match compares answers with surrounding white space removed and inner runs folded."""
    return " ".join(text.split())


def sequence_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence summed next-token loss and trained-token count (labels != -100)."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="none",
    ).view(shift_labels.shape)
    mask = shift_labels != IGNORE_INDEX
    return (loss * mask).sum(1), mask.sum(1)


class FTMethod(L.LightningModule):
    """Base of every fine-tuning method: the causal-LM step, evaluation, optimizer and scheduler."""

    #: short name used in records and tables
    method_name = "base"

    def __init__(
        self,
        backbone: Optional[Backbone] = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant_with_warmup",
        warmup_steps: int = 0,
        max_new_tokens: Optional[int] = None,
        generate_in_validation: bool = True,
    ):
        """
        Args:
            backbone: The shared backbone (linked from the top-level ``backbone`` by the CLI).
            optimizer: Optimizer class and its arguments, e.g. ``torch.optim.AdamW`` with ``lr``;
                any importable optimizer works (bitsandbytes' 8-bit and paged ones too).
            lr_scheduler: Learning-rate schedule (``transformers.get_scheduler``), stepped per
                optimizer step over ``trainer.estimated_stepping_batches``.
            warmup_steps: Linear warm-up steps of the schedule.
            max_new_tokens: Greedy-generation budget for exact-match evaluation. Default: what the
                data module says its longest reference answer needs (``max_answer_tokens``), else 32.
            generate_in_validation: Also compute exact match during validation (not only test).
        """
        super().__init__()
        self.backbone = backbone or Backbone()
        self.optimizer_factory = optimizer
        self.lr_scheduler = lr_scheduler
        self.warmup_steps = warmup_steps
        self.max_new_tokens = max_new_tokens
        self.generate_in_validation = generate_in_validation
        self.model: Optional[torch.nn.Module] = None
        self._eval_metrics: dict[str, MeanMetric] = {}
        self._nonfinite: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ what trains
    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Decide what trains: freeze, wrap, add modules. Returns the module to train."""
        raise NotImplementedError

    def configure_model(self) -> None:
        if self.model is None:
            self.model = self.prepare(self.backbone.load_model())
            self.model.train()  # from_pretrained returns eval mode; the trainer switches for evaluation

    def parameter_counts(self) -> dict[str, int]:
        """Trainable and total parameters (shared tensors such as tied embeddings counted once)."""
        assert self.model is not None
        trainable = sum(_numel(p) for p in self.model.parameters() if p.requires_grad)
        total = sum(_numel(p) for p in self.model.parameters())
        return {"trainable": trainable, "total": total}

    def trained_modules(self) -> torch.nn.Module:
        """The module whose ``save_pretrained`` saves what this method trained."""
        assert self.model is not None
        return self.model

    def save_trained(self, path: str | Path) -> Path:
        """Save what this method trained (adapter or full weights) as safetensors."""
        path = Path(path)
        self.trained_modules().save_pretrained(path, safe_serialization=True)
        return path

    # ------------------------------------------------------------------ steps
    def forward(self, input_ids, attention_mask=None, labels=None, position_ids=None):
        if position_ids is not None:
            # packed documents: positions restart per document and, with no 2-D mask, transformers
            # builds a block-diagonal causal mask from them (no attention across documents)
            attention_mask = None
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                          position_ids=position_ids, use_cache=False)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self(batch["input_ids"], batch["attention_mask"], batch["labels"], batch.get("position_ids"))
        loss = out.loss
        self._check_finite(loss, batch_idx)
        self.log("train/loss", loss, on_step=True, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def _check_finite(self, loss: torch.Tensor, batch_idx: int) -> None:
        """Raise on a NaN/inf loss. On CUDA the flag stays on the device and is read every
        ``FINITE_CHECK_EVERY`` batches, so the check costs no host sync per step."""
        bad = ~torch.isfinite(loss.detach())
        self._nonfinite = bad if self._nonfinite is None else (self._nonfinite | bad)
        if self.device.type != "cuda" or batch_idx % FINITE_CHECK_EVERY == 0:
            if bool(self._nonfinite):
                raise NonFiniteLossError(self.global_step, float(loss))
            self._nonfinite = None

    def _metric(self, name: str) -> MeanMetric:
        if name not in self._eval_metrics:
            self._eval_metrics[name] = MeanMetric(sync_on_compute=True).to(self.device)
        return self._eval_metrics[name]

    def generation_budget(self) -> int:
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        return int(getattr(dm, "max_answer_tokens", None) or 32)

    @torch.no_grad()
    def generate_answers(self, batch: dict[str, Any]) -> list[str]:
        tok = self.backbone.tokenizer
        ids = batch["gen_input_ids"]
        out = self.model.generate(
            input_ids=ids, attention_mask=batch["gen_attention_mask"], max_new_tokens=self.generation_budget(),
            do_sample=False, use_cache=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        )
        return tok.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)

    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        logits = self(batch["input_ids"], batch["attention_mask"], position_ids=batch.get("position_ids")).logits
        loss_sum, n_tok = sequence_losses(logits, batch["labels"])
        tasks = batch.get("tasks") or [None] * len(n_tok)
        groups: dict[Optional[str], list[int]] = defaultdict(list)
        for i, t in enumerate(tasks):
            groups[t].append(i)
        correct = None
        if "gen_input_ids" in batch and (stage == "test" or self.generate_in_validation):
            preds = self.generate_answers(batch)
            correct = torch.tensor(
                [float(normalize_answer(p) == normalize_answer(a)) for p, a in zip(preds, batch["answers"])],
                device=self.device,
            )
        scopes: list[tuple[Optional[str], list[int]]] = [(None, list(range(len(n_tok))))]
        if any(t is not None for t in tasks):
            scopes += list(groups.items())
        for task, idx in scopes:
            prefix = f"{stage}/" if task is None else f"{stage}/{task}/"
            tok_count = n_tok[idx].sum()
            if tok_count > 0:
                self._metric(prefix + "loss").update(loss_sum[idx].sum() / tok_count, weight=tok_count)
            if correct is not None:
                self._metric(prefix + "accuracy").update(correct[idx])

    def _eval_epoch_end(self, stage: str) -> None:
        results: dict[str, float] = {}
        tasks = set()
        for name, metric in list(self._eval_metrics.items()):
            if not name.startswith(stage + "/") or metric.update_count == 0:
                continue
            results[name] = float(metric.compute())
            parts = name.split("/")
            if len(parts) == 3:
                tasks.add(parts[1])
        for name in list(results):
            if name.endswith("/loss"):
                results[name[: -len("loss")] + "perplexity"] = math.exp(min(results[name], 50.0))
        if tasks:  # macro average over tasks
            for kind in ("loss", "accuracy"):
                vals = [results[f"{stage}/{t}/{kind}"] for t in tasks if f"{stage}/{t}/{kind}" in results]
                if vals:
                    results[f"{stage}/macro_{kind}"] = sum(vals) / len(vals)
        for name, value in results.items():
            self.log(name, value, prog_bar=name in (f"{stage}/loss", f"{stage}/accuracy"), sync_dist=False)

    def _eval_epoch_start(self, stage: str) -> None:
        # fresh metric states in the grad mode of this loop (validate/test run under inference
        # mode, validation inside fit under no_grad; a state made in one cannot be updated in the other)
        self._eval_metrics = {k: v for k, v in self._eval_metrics.items() if not k.startswith(stage + "/")}

    def on_validation_epoch_start(self) -> None:
        self._eval_epoch_start("val")

    def on_test_epoch_start(self) -> None:
        self._eval_epoch_start("test")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        from transformers import get_scheduler

        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"{type(self).__name__}: nothing to train (no parameter requires grad)")
        optimizer = self.optimizer_factory(params)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = get_scheduler(self.lr_scheduler, optimizer, num_warmup_steps=self.warmup_steps, num_training_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
