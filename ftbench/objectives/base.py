"""The shared loop of every objective: model set-up through the tuner, the training-step skeleton,
the optimizer and schedule, evaluation metrics by task, and generation.

An objective (``sft``, ``reward``, ``dpo``, ``grpo``) is a subclass that says only what differs: its
settings (checked in its ``__init__``, each error a :class:`~ftbench.errors.ConfigError` naming the
option), its loss (:meth:`Objective.training_loss`, returning a :class:`TrainingLoss`) and its
evaluation (:meth:`Objective.evaluate`). The step around the loss is one, here
(:meth:`Objective.training_step`): the tuner's regularization (AdaLoRA's orthogonality penalty) added,
the non-finite check, ``train/loss`` logged every step and the objective's other training metrics every
``trainer.log_every_n_steps`` steps and at the last (or every step, when the objective asks), and the
token counts the throughput callback reads. What trains is the tuner's business (``ftbench.tuners``), so
a difference between two rows of a results table comes from the tuner or the objective and nothing else.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torchmetrics import MeanMetric

from ftbench.errors import ConfigError
from ftbench.tuners.saved import load_backbone
from ftbench.backbone import Backbone, Head
from ftbench.naming import method_label
from ftbench.tuners.base import Tuner

FINITE_CHECK_EVERY = 10  # batches between host reads of the non-finite-loss flag on CUDA


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""

    def __init__(self, step: int, value: float):
        self.step, self.value = step, value
        super().__init__(f"training loss is {value} at step {step}")


@dataclass
class TrainingLoss:
    """What an objective's :meth:`~Objective.training_loss` gives the shared step.

    ``loss`` is what is backpropagated (before the tuner's regularization); ``trained_tokens`` the
    tokens it is computed on (torchtune's tokens/s counts these); ``input_ids``/``attention_mask`` the
    batch the model saw (padded and real token counts); ``rows`` the batch size the metrics are logged
    with; ``metrics`` a callable returning the other training metrics (logged under ``train/``, called
    only on a step that logs them); ``prog_bar`` the names among them shown in the progress bar;
    ``metrics_every_step``: log them at every step, not only every ``log_every_n_steps``."""

    loss: torch.Tensor
    trained_tokens: torch.Tensor | int
    input_ids: torch.Tensor
    attention_mask: Optional[torch.Tensor]
    rows: int
    metrics: Optional[Callable[[], dict[str, Any]]] = None
    prog_bar: tuple[str, ...] = ()
    metrics_every_step: bool = False


class Objective(L.LightningModule):
    """Base of the objectives: what is optimised, on whatever the tuner makes trainable."""

    #: the objective part of the method label (``ftbench.naming``)
    name = "objective"
    #: the backbone head this objective trains (``causal_lm`` or ``score``)
    head: Head = "causal_lm"

    def __init__(
        self,
        backbone: Optional[Backbone] = None,
        tuner: Optional[Tuner] = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant_with_warmup",
        warmup_steps: int = 0,
    ):
        """
        Args:
            backbone: The shared backbone (linked from the top-level ``backbone`` by the CLI).
            tuner: What trains (linked from the top-level ``tuner`` by the CLI).
            optimizer: Optimizer class and its arguments (``configs/optim/*.yaml``); any importable
                optimizer works (bitsandbytes' 8-bit and paged ones too). The tuner's ``lr``, when
                set, replaces the ``lr`` given here.
            lr_scheduler: Learning-rate schedule (``transformers.get_scheduler``), stepped per
                optimizer step over ``trainer.estimated_stepping_batches``.
            warmup_steps: Linear warm-up steps of the schedule.
        """
        super().__init__()
        if warmup_steps < 0:
            raise ConfigError(f"objective: warmup_steps must be >= 0, got {warmup_steps}")
        self.backbone = backbone or Backbone()
        self.tuner = tuner
        self.optimizer_factory = optimizer
        self.lr_scheduler = lr_scheduler
        self.warmup_steps = warmup_steps
        self.model: Optional[torch.nn.Module] = None
        self._eval_metrics: dict[str, MeanMetric] = {}
        self._eval_tasks: dict[str, set[str]] = defaultdict(set)  # stage -> tasks seen (for macro averages)
        self._predictions: dict[str, list[dict[str, Any]]] = defaultdict(list)  # stage -> evaluated rows
        self._nonfinite: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ identity
    @property
    def method_label(self) -> str:
        """``objective+tuner[+quantization]``, as :func:`ftbench.naming.method_label` defines it."""
        return method_label(self.name, self.tuner.name if self.tuner else "none", self.backbone.quantization)

    @property
    def needs_reference(self) -> bool:
        """Whether this objective reads the untouched backbone (the tuner then keeps what it needs)."""
        return False

    # ------------------------------------------------------------------ what trains
    def configure_model(self) -> None:
        if self.model is not None:
            return
        if self.tuner is None:
            raise ConfigError(f"objective {self.name}: no tuner (give --tuner, e.g. configs/tuner/lora.yaml)")
        if self._trainer is not None and self.trainer.state.fn == "fit":
            self.tuner.total_steps = int(self.trainer.estimated_stepping_batches)
        model = self.tuner.prepare(load_backbone(self.backbone, head=self.head), self.backbone)
        if self.head == "score":
            self.train_new_head(model)
        self.model = model
        self.model.train()  # from_pretrained returns eval mode; the trainer switches for evaluation
        if self.needs_reference:
            self.tuner.keep_reference(self.model)

    def train_new_head(self, model: torch.nn.Module) -> None:
        """A score head is new (randomly initialised): it trains under every tuner, and is saved with
        what the tuner trained (peft: as a ``modules_to_save`` layer; others: it requires grad)."""
        from ftbench.backbone import score_module

        if not any(p.requires_grad for p in score_module(model).parameters()):
            score_module(model).requires_grad_(True)

    def parameter_counts(self) -> dict[str, int]:
        """Trainable and total parameters (shared tensors such as tied embeddings counted once)."""
        assert self.model is not None
        return self.tuner.parameter_counts(self.model)

    def save_trained(self, path: str | Path) -> Path:
        """Save what the tuner trained (adapter, trained blocks or full weights) as safetensors."""
        assert self.model is not None
        return self.tuner.save(self.model, path)

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, model: Optional[torch.nn.Module] = None) -> torch.Tensor:
        """Logits for exactly the input positions (``model``: e.g. the reference; default the trained one)."""
        if position_ids is not None:
            # packed documents: positions restart per document and, with no 2-D mask, transformers
            # builds a block-diagonal causal mask from them (no attention across documents)
            if getattr(self.tuner, "is_prompt_learning", False):
                raise ConfigError(f"tuner {self.tuner.name}: packed batches (position ids restarting per document) "
                                  "are not supported: peft's prompt learning ignores position_ids, so documents "
                                  "would attend to each other", hint="set data.init_args.packing: false")
            attention_mask = None
        out = (model or self.model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                    use_cache=False)
        return self.tuner.align_logits(out.logits, input_ids.shape[1])

    # ------------------------------------------------------------------ the training step
    def training_loss(self, batch: dict[str, Any]) -> TrainingLoss:
        """The objective's loss on one training batch, and what it logs (see :class:`TrainingLoss`)."""
        raise NotImplementedError

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """The step every objective shares around its :meth:`training_loss`. Returns the loss and the
        token counts the throughput callback reads (trained: those the loss is computed on; padded: the
        whole batch; real: the attention mask's ones)."""
        out = self.training_loss(batch)
        loss = out.loss
        extra = self.tuner.regularization(self.model)  # e.g. AdaLoRA's orthogonality penalty
        if extra is not None:
            loss = loss + extra
        self.check_finite(loss, batch_idx)
        self.log("train/loss", loss, on_step=True, prog_bar=True, batch_size=out.rows)
        if out.metrics is not None and (out.metrics_every_step or self.should_log_step()):
            metrics = out.metrics()
            for name in out.prog_bar:
                self.log(f"train/{name}", metrics.pop(name), on_step=True, prog_bar=True, batch_size=out.rows)
            self.log_dict({f"train/{k}": v for k, v in metrics.items()}, on_step=True, batch_size=out.rows)
        ids, mask = out.input_ids, out.attention_mask
        real = mask.sum() if mask is not None else ids.numel()
        return {"loss": loss, "trained_tokens": out.trained_tokens, "padded_tokens": ids.numel(), "real_tokens": real}

    def step_time_split(self) -> Optional[dict[str, Optional[float]]]:
        """Seconds of training spent per phase of the step, for objectives whose step has phases (online
        RL: ``generation_s``, ``optimisation_s``, ``reward_s``); the record keeps it as
        ``train_info.step_time_split``. None: one phase."""
        return None

    def check_finite(self, loss: torch.Tensor, batch_idx: int) -> None:
        """Raise on a NaN/inf loss. On CUDA the flag stays on the device and is read every
        ``FINITE_CHECK_EVERY`` batches, so the check costs no host sync per step."""
        bad = ~torch.isfinite(loss.detach())
        self._nonfinite = bad if self._nonfinite is None else (self._nonfinite | bad)
        if self.device.type != "cuda" or batch_idx % FINITE_CHECK_EVERY == 0:
            if bool(self._nonfinite):
                raise NonFiniteLossError(self.global_step, float(loss))
            self._nonfinite = None

    def should_log_step(self) -> bool:
        """Whether this training step logs its metrics: every ``trainer.log_every_n_steps`` steps and
        the last one. A ``self.log`` costs ~0.7 ms (5 % of a small model's step on a CPU) and, with the
        progress bar on, a device sync on CUDA; Lightning writes to its loggers at that interval anyway."""
        if self._trainer is None:
            return True
        step, every = self.trainer.global_step, max(1, int(self.trainer.log_every_n_steps or 1))
        last = self.trainer.max_steps is not None and self.trainer.max_steps > 0 and step + 1 >= self.trainer.max_steps
        return step % every == 0 or last

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        accumulate = max(1, int(getattr(self.trainer, "accumulate_grad_batches", 1) or 1))
        if (batch_idx + 1) % accumulate == 0:  # once per optimizer step, after it and before zero_grad
            self.tuner.after_optimizer_step(self.model, self.global_step)

    # ------------------------------------------------------------------ generation
    def generation_budget(self, max_new_tokens: Optional[int] = None) -> int:
        """``max_new_tokens`` when given, else what the data module says its longest reference answer
        needs (``max_answer_tokens``), else 32."""
        if max_new_tokens is not None:
            return max_new_tokens
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        return int(getattr(dm, "max_answer_tokens", None) or 32)

    @torch.no_grad()
    def generate_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                       **sampling: Any) -> list[str]:
        """Continuations of left-padded prompts, decoded without special tokens (greedy by default)."""
        tok = self.backbone.tokenizer
        sampling.setdefault("do_sample", False)
        new = self.tuner.generate(self.model, tok, input_ids, attention_mask, max_new_tokens, **sampling)
        return tok.batch_decode(new, skip_special_tokens=True)

    def predict_answers(self, batch: dict[str, Any], max_new_tokens: Optional[int] = None) -> list[str]:
        """The greedy answers to the batch's generation prompts (``gen_input_ids``)."""
        return self.generate_texts(batch["gen_input_ids"], batch["gen_attention_mask"],
                                   self.generation_budget(max_new_tokens))

    def exact_match(self, batch: dict[str, Any], max_new_tokens: Optional[int] = None) -> torch.Tensor:
        """1.0 per row whose greedy answer equals the reference answer (white space folded)."""
        from ftbench.evaluation.metrics import default_metrics

        exact = default_metrics()[0]  # exact_match, white space folded (ftbench.evaluation.metrics)
        preds = self.predict_answers(batch, max_new_tokens)
        return torch.tensor(exact.row_values(preds, list(batch["answers"])), dtype=torch.float32, device=self.device)

    # ------------------------------------------------------------------ answer metrics (ftbench.evaluation)
    def metrics_for(self, task: Optional[str]) -> list:
        """The answer metrics of ``task``'s rows: what the data module names (``data.metrics``, per task
        in a mixture), else ``[exact_match]`` (:mod:`ftbench.evaluation.metrics`)."""
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and hasattr(dm, "metrics_for"):
            return dm.metrics_for(task)
        from ftbench.evaluation.metrics import default_metrics

        return default_metrics()

    def choice_scores(self, batch: dict[str, Any]) -> list[Optional[list[float]]]:
        """Per row, the summed log-probability of each option (``choice_ids``) after the row's generation
        prompt; None for a row without options (:mod:`ftbench.evaluation.choices`)."""
        from ftbench.evaluation.choices import score_choices

        ids, mask = batch["gen_input_ids"], batch["gen_attention_mask"]
        prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
        return score_choices(lambda i, a: self(i, a), prompts, batch["choice_ids"],
                             self.backbone.tokenizer.pad_token_id, ids.device)

    def answer_metrics(self, batch: dict[str, Any], stage: str, max_new_tokens: Optional[int] = None,
                       predictions: Optional[list[str]] = None) -> dict[str, torch.Tensor]:
        """Each row's answer metrics (the metrics of its task), for :meth:`update_by_task`: a tensor per
        metric name, NaN for rows whose task does not have it. Generates only when a metric needs a
        generation (``predictions``: the greedy answers of every row, generated already by the caller),
        scores options only when one needs them; corpus-level metrics (BLEU, chrF) are updated here and
        not returned; every row goes to the predictions file (:meth:`prediction_rows`)."""
        answers = list(batch["answers"])
        n = len(answers)
        tasks = batch.get("tasks") or [None] * n
        groups: dict[Optional[str], list[int]] = defaultdict(list)
        for i, t in enumerate(tasks):
            groups[t].append(i)
        suites = {t: self.metrics_for(t) for t in groups}
        gen_rows = [i for t, idx in groups.items() if any(m.needs_generation for m in suites[t]) for i in idx]
        preds: list[Optional[str]] = [None] * n
        if predictions is not None:
            for i in gen_rows:
                preds[i] = predictions[i]
        elif len(gen_rows) == n:
            preds = list(self.predict_answers(batch, max_new_tokens))
        elif gen_rows:
            sel = torch.tensor(sorted(gen_rows), device=batch["gen_input_ids"].device)
            texts = self.generate_texts(batch["gen_input_ids"][sel], batch["gen_attention_mask"][sel],
                                        self.generation_budget(max_new_tokens))
            for i, text in zip(sorted(gen_rows), texts):
                preds[i] = text
        scores: list[Optional[list[float]]] = [None] * n
        if batch.get("choice_ids") is not None and any(m.needs_choices for s in suites.values() for m in s):
            scores = self.choice_scores(batch)
        rows = [self._prediction_row(batch, i, stage, preds[i]) for i in range(n)]
        values: dict[str, list[float]] = {}
        for t, idx in groups.items():
            for m in suites[t]:
                col = [math.nan] * n
                if m.needs_choices:
                    for i in idx:
                        if scores[i] is None:
                            continue
                        picked = m.pick(scores[i], batch["choices"][i])
                        col[i] = float(picked == batch["gold"][i])
                        rows[i].setdefault("picked", {})[m.name] = picked
                        if rows[i]["prediction"] is None:
                            rows[i]["prediction"] = batch["choices"][i][picked]
                else:
                    p, r = [preds[i] for i in idx], [answers[i] for i in idx]
                    for i, v in zip(idx, m.row_values(p, r)):
                        col[i] = v
                    if m.corpus:
                        self.update_corpus(stage, t, m, p, r)
                for i in idx:
                    if not math.isnan(col[i]):
                        rows[i]["metrics"][m.name] = col[i]
                if not m.corpus:
                    prev = values.get(m.name)
                    values[m.name] = col if prev is None else [a if math.isnan(b) else b for a, b in zip(prev, col)]
        self._predictions[stage].extend(rows)
        return {name: torch.tensor(col, dtype=torch.float32, device=self.device) for name, col in values.items()}

    def update_corpus(self, stage: str, task: Optional[str], metric, predictions: list[str], references: list[str]) -> None:
        """Feed a corpus-level metric (torchmetrics' BLEU, chrF) under ``{stage}/{name}`` and, for rows with
        a task, ``{stage}/{task}/{name}``."""
        preds, refs = metric.corpus_inputs(predictions, references)
        for prefix in [f"{stage}/"] + ([f"{stage}/{task}/"] if task is not None else []):
            key = prefix + metric.name
            if key not in self._eval_metrics:
                self._eval_metrics[key] = metric.corpus_metric().to(self.device)
            self._eval_metrics[key].update(preds, refs)

    def _prediction_row(self, batch: dict[str, Any], i: int, stage: str, prediction: Optional[str]) -> dict[str, Any]:
        prompts = batch.get("prompts")
        if prompts is not None and prompts[i] is not None:
            prompt = prompts[i]
        else:
            ids, mask = batch["gen_input_ids"][i], batch["gen_attention_mask"][i]
            prompt = self.backbone.tokenizer.decode(ids[mask.bool()].tolist(), skip_special_tokens=False)
        tasks = batch.get("tasks")
        row: dict[str, Any] = {"stage": stage, "step": int(self.global_step) if self._trainer is not None else 0,
                               "task": tasks[i] if tasks else None, "prompt": prompt,
                               "reference": batch["answers"][i], "prediction": prediction, "metrics": {}}
        if batch.get("choices") is not None and batch["choices"][i] is not None:
            row["choices"], row["gold"] = batch["choices"][i], batch["gold"][i]
        return row

    def prediction_rows(self, stage: str) -> list[dict[str, Any]]:
        """The rows of this stage's latest evaluation, from every rank (a collective under DDP: every
        rank calls it)."""
        rows = list(self._predictions.get(stage, []))
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            gathered: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in (part or [])]
        return rows

    # ------------------------------------------------------------------ evaluation metrics
    def metric(self, name: str) -> MeanMetric:
        if name not in self._eval_metrics:
            self._eval_metrics[name] = MeanMetric(sync_on_compute=True).to(self.device)
        return self._eval_metrics[name]

    def update_by_task(self, stage: str, tasks: Optional[list], values: dict[str, torch.Tensor],
                       weights: Optional[dict[str, torch.Tensor]] = None) -> None:
        """Per-row ``values`` into ``{stage}/{name}`` and, for rows with a task, ``{stage}/{task}/{name}``.
        ``weights`` (per row) make a metric a weighted mean, e.g. a loss per token."""
        n = len(next(iter(values.values())))
        tasks = tasks or [None] * n
        scopes: list[tuple[Optional[str], list[int]]] = [(None, list(range(n)))]
        if any(t is not None for t in tasks):
            groups: dict[Optional[str], list[int]] = defaultdict(list)
            for i, t in enumerate(tasks):
                groups[t].append(i)
            scopes += list(groups.items())
            self._eval_tasks[stage].update(str(t) for t in groups)
        for task, idx in scopes:
            prefix = f"{stage}/" if task is None else f"{stage}/{task}/"
            for name, v in values.items():
                w = (weights or {}).get(name)
                if w is None:
                    part = v[idx]
                    if part.is_floating_point():  # NaN: a metric this row's task does not have
                        part = part[~torch.isnan(part)]
                    if part.numel():
                        self.metric(prefix + name).update(part)
                elif w[idx].sum() > 0:
                    self.metric(prefix + name).update(v[idx].sum() / w[idx].sum(), weight=w[idx].sum())

    def derived_metrics(self, results: dict[str, float], stage: str) -> None:
        """Metrics computed from the others at the end of an evaluation (e.g. perplexity)."""

    def _eval_epoch_start(self, stage: str) -> None:
        # fresh metric states in the grad mode of this loop (validate/test run under inference
        # mode, validation inside fit under no_grad; a state made in one cannot be updated in the other)
        self._eval_metrics = {k: v for k, v in self._eval_metrics.items() if not k.startswith(stage + "/")}
        self._eval_tasks[stage] = set()
        self._predictions[stage] = []

    def _eval_epoch_end(self, stage: str) -> None:
        results: dict[str, float] = {}
        tasks = self._eval_tasks[stage]
        kinds: set[str] = set()
        for name, metric in list(self._eval_metrics.items()):
            if not name.startswith(stage + "/") or metric.update_count == 0:
                continue
            results[name] = float(metric.compute())
            parts = name.split("/", 2)
            if len(parts) == 3 and parts[1] in tasks:
                kinds.add(parts[2])
        self.derived_metrics(results, stage)
        for kind in sorted(kinds):  # macro average over tasks
            vals = [results[f"{stage}/{t}/{kind}"] for t in sorted(tasks) if f"{stage}/{t}/{kind}" in results]
            if vals:
                results[f"{stage}/macro_{kind}"] = sum(vals) / len(vals)
        for name, value in results.items():
            self.log(name, value, prog_bar=name in (f"{stage}/loss", f"{stage}/accuracy"), sync_dist=False)

    def on_validation_epoch_start(self) -> None:
        self._eval_epoch_start("val")

    def on_test_epoch_start(self) -> None:
        self._eval_epoch_start("test")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.evaluate(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.evaluate(batch, "test")

    def evaluate(self, batch: dict[str, Any], stage: str) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        from transformers import get_scheduler

        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ConfigError(f"{self.method_label}: nothing to train (no parameter requires grad)")
        try:
            optimizer = self.optimizer_factory(params)
        except ValueError as err:  # torch's own checks: "Invalid learning rate: -0.1", ...
            raise ConfigError(f"model.init_args.optimizer: {err}") from None
        if self.tuner.lr is not None:
            for group in optimizer.param_groups:
                group["lr"] = self.tuner.lr
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = get_scheduler(self.lr_scheduler, optimizer, num_warmup_steps=self.warmup_steps, num_training_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
