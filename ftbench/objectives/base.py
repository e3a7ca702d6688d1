"""The shared loop of every objective: model set-up through the tuner, the training-step skeleton and
the optimizer and schedule (the evaluation hooks: :mod:`ftbench.objectives.evaluating`).

An objective (``sft``, ``reward``, ``dpo``, ``grpo``) is a subclass that says only what differs: its
settings (checked in its ``__init__``, each error a :class:`~ftbench.errors.ConfigError` naming the
option), its loss (:meth:`Objective.training_loss`, a :class:`TrainingLoss`), what its evaluation
computes itself (``evaluate``) and what it holds besides the policy (see :class:`Objective`). The step
around the loss is one, here (:meth:`Objective.training_step`): the tuner's regularization added, the
non-finite check, ``train/loss`` every step and the other training metrics every
``trainer.log_every_n_steps`` steps, and the token counts the throughput callback reads. What trains
is the tuner's business, so two rows of a results table differ by the tuner or the objective alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable

from ftbench import levers
from ftbench.errors import ConfigError
from ftbench.evaluation.evaluator import Evaluator
from ftbench.tuners.saved import load_backbone
from ftbench.backbone import Backbone, Head, train_score_head
from ftbench.naming import method_label
from ftbench.objectives.data_needs import check_data
from ftbench.objectives.evaluating import EvaluationSteps
from ftbench.objectives.optim import optimization
from ftbench.objectives.sharding import check_shardable, fully_shard_model, unsharded
from ftbench.objectives.step import FiniteCheck, TrainingLoss, logs_this_step
from ftbench.tuners.base import Tuner

class Objective(EvaluationSteps, L.LightningModule):
    """Base of the objectives: what is optimised, on whatever the tuner makes trainable.

    What an objective holds in memory besides the policy, it declares in three class attributes (a
    property where a setting decides, as DPO's ``precompute_reference`` or GRPO's ``beta``), read by
    the memory breakdown (``memory_breakdown.weights.held``) and ``ftbench estimate``:

    * ``needs_reference``: a step reads the reference policy (``tuner.reference``): an adapter switched
      off holds nothing more; a tuner that trains the backbone's own weights keeps a frozen copy,
      held here as the submodule ``reference_model`` (moved with the model, kept in eval mode);
    * ``holds_reward_model``: a frozen reward model scores the samples (held as ``reward_model``);
    * ``holds_critic``: a value model trains beside the policy (held as ``critic``).

    :meth:`held_models` gives them by role; an objective that keeps one elsewhere overrides it.
    """

    #: the objective part of the method label (``ftbench.naming``)
    name = "objective"
    #: the backbone head this objective trains (``causal_lm`` or ``score``)
    head: Head = "causal_lm"
    needs_reference = holds_reward_model = holds_critic = False  # what it holds (see above)

    #: what its batches must be (checked in :meth:`setup`, before the model loads: see
    #: :func:`~ftbench.objectives.data_needs.check_data`)
    data_regimes: tuple[str, ...] = ()
    data_needs = ""
    samples_from_prompts = False
    #: the regimes whose packed training batches (``data.packing``: :mod:`ftbench.data.packing`) its loss
    #: reads; another regime's packed batches are refused before the model loads, ``packing_refusal`` saying why
    packed_regimes: tuple[str, ...] = ()
    packing_refusal = "its loss does not read packed batches"

    def __init__(
        self,
        backbone: Optional[Backbone] = None,
        tuner: Optional[Tuner] = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant_with_warmup",
        warmup_steps: int = 0,
        evaluator: Optional[Evaluator] = None,
    ):
        """
        Args:
            backbone: The shared backbone (linked from the top-level ``backbone`` by the CLI).
            tuner: What trains (linked from the top-level ``tuner`` by the CLI).
            optimizer: Optimizer class and its arguments (``configs/optim/*.yaml``); any importable
                optimizer works (bitsandbytes' 8-bit and paged ones too; GaLore, APOLLO, BAdam and
                Muon through ``ftbench.optimizers``). It receives the trainable parameters by name.
                The tuner's ``lr``, when set, replaces the ``lr`` given here.
            lr_scheduler: Learning-rate schedule (``transformers.get_scheduler``), stepped per
                optimizer step over ``trainer.estimated_stepping_batches``.
            warmup_steps: Linear warm-up steps of the schedule.
            evaluator: The run's evaluation (built by the CLI from ``--evaluate.*`` and the data module;
                default: exact match, no data module).
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
        self.reference_model: Optional[torch.nn.Module] = None  # a tuner's frozen copy (see the class doc)
        self.evaluator = evaluator or Evaluator()
        self._finite_check = FiniteCheck()

    # ------------------------------------------------------------------ identity
    @property
    def method_label(self) -> str:
        """``objective+tuner[+quantization]``, as :func:`ftbench.naming.method_label` defines it."""
        return method_label(self.name, self.tuner.name if self.tuner else "none", self.backbone.quantization)

    # ------------------------------------------------------------------ the data it reads
    def setup(self, stage: str) -> None:
        """Lightning's hook after the data module's ``setup`` and before ``configure_model``."""
        check_data(self, getattr(self._trainer, "datamodule", None) if self._trainer is not None else None, stage)

    # ------------------------------------------------------------------ what trains
    def configure_model(self) -> None:
        if self.model is not None:
            return
        if self.tuner is None:
            raise ConfigError(f"objective {self.name}: no tuner (give --tuner, e.g. configs/tuner/lora.yaml)")
        if self._trainer is not None and self.trainer.state.fn == "fit":
            self.tuner.total_steps = int(self.trainer.estimated_stepping_batches)
        device = self.trainer.strategy.root_device.type if self._trainer is not None else None
        if device is not None:  # the levers a run cannot have, refused before any weight loads
            if self.backbone.liger_kernel:
                levers.check_liger(device)
            if self.backbone.compile:
                levers.check_compile(self.tuner.name, self.backbone.quantization, self.backbone.liger_kernel)
        mesh = self.data_parallel_mesh()
        if mesh is not None:
            check_shardable(self.backbone.quantization)  # before a quantized load that could not be sharded
        model = load_backbone(self.backbone, head=self.head)
        if self.backbone.liger_kernel and device is not None:  # not on meta (ftbench estimate models the fused loss)
            model = levers.apply_liger(model, device)
        model = self.tuner.prepare(model, self.backbone)
        if self.tuner.initialises_from_data and self._trainer is not None and self.trainer.state.fn == "fit":
            # the fit's training data as Lightning will load it (a data module's train_dataloader, or the
            # loaders given to fit): Lightning's own handle on it, since its loaders load after this hook
            # and the optimizer (made next) must see the initialised parameters
            self.tuner.initialise_from_data(model, self.trainer.fit_loop._data_source.dataloader())
        if self.head == "score":
            train_score_head(model)
        self.model = model
        self.model.train()  # from_pretrained returns eval mode; the trainer switches for evaluation
        if self.needs_reference:
            self.reference_model = self.tuner.keep_reference(self.model)
            with self.tuner.reference(self.model):  # a tuner that cannot give the untouched backbone says so now
                pass
        if mesh is not None:
            # FSDP2: each rank keeps 1/N of every weight of the policy (objectives/sharding.py); a frozen
            # reference copy, kept above, stays whole on every rank
            fully_shard_model(self.model, mesh)
        if self.backbone.compile and device is not None:  # last: the reference copy above stays uncompiled
            levers.compile_model(self.model, self.backbone.compile_mode, self.backbone.compile_backend)

    def data_parallel_mesh(self):
        """The data-parallel device mesh Lightning's ``ModelParallelStrategy`` hands the module (FSDP2:
        ``configs/trainer/fsdp2.yaml``), or None under any other strategy."""
        mesh = getattr(self, "_device_mesh", None)
        return mesh["data_parallel"] if mesh is not None else None

    def held_models(self) -> dict[str, torch.nn.Module]:
        """The models held besides the policy, by role (``reference``, ``reward_model``, ``critic``):
        those the class declares (see the class doc) and has built."""
        roles = (("reference", self.needs_reference, "reference_model"),
                 ("reward_model", self.holds_reward_model, "reward_model"), ("critic", self.holds_critic, "critic"))
        return {role: getattr(self, attr) for role, held, attr in roles
                if held and isinstance(getattr(self, attr, None), torch.nn.Module)}

    def train(self, mode: bool = True):
        super().train(mode)
        if getattr(self, "reference_model", None) is not None:
            self.reference_model.eval()  # the reference never drops out
        return self

    def parameter_counts(self) -> dict[str, int]:
        """Trainable and total parameters (shared tensors such as tied embeddings counted once)."""
        assert self.model is not None
        return self.tuner.parameter_counts(self.model)

    def gathered_weights(self):
        """A context in which the policy's weights are whole on every rank (FSDP2: each unit gathered,
        a collective every rank enters, and sharded again after); a no-op when it is not sharded."""
        return unsharded(self.model)

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
            self.check_packed_forward()
            attention_mask = None
        out = (model or self.model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                    use_cache=False)
        return self.tuner.align_logits(out.logits, input_ids.shape[1])

    def check_packed_forward(self) -> None:
        """Refuse packed batches (position ids restarting per row) under a tuner that would ignore them."""
        if getattr(self.tuner, "is_prompt_learning", False):
            raise ConfigError(f"tuner {self.tuner.name}: packed batches (position ids restarting per document) "
                              "are not supported: peft's prompt learning ignores position_ids, so documents "
                              "would attend to each other", hint="set data.init_args.packing: false")

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
        if out.metrics is not None and (out.metrics_every_step or logs_this_step(self._trainer)):
            metrics = out.metrics()
            for name in out.prog_bar:
                self.log(f"train/{name}", metrics.pop(name), on_step=True, prog_bar=True, batch_size=out.rows)
            self.log_dict({f"train/{k}": v for k, v in metrics.items()}, on_step=True, batch_size=out.rows)
        ids, mask = out.input_ids, out.attention_mask
        real = mask.sum() if mask is not None else ids.numel()
        return {"loss": loss, "trained_tokens": out.trained_tokens, "padded_tokens": ids.numel(), "real_tokens": real}

    @property
    def train_batch_repeats(self) -> int:
        """How many training steps in a row use one data batch (online RL reusing a rollout for several
        updates, as TRL's ``RepeatSampler``); the CLI hands it to the data module. 1: a new batch each step."""
        return 1

    def step_time_split(self) -> Optional[dict[str, Optional[float]]]:
        """Seconds of training spent per phase of the step, for objectives whose step has phases (online
        RL: ``generation_s``, ``optimisation_s``, ``reward_s``); the record keeps it as
        ``train_info.step_time_split``. None: one phase."""
        return None

    def check_finite(self, loss: torch.Tensor, batch_idx: int) -> None:
        """Raise :class:`~ftbench.objectives.step.NonFiniteLossError` on a NaN/inf loss (see ``FiniteCheck``)."""
        self._finite_check(loss, self.global_step, batch_idx)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        accumulate = max(1, int(getattr(self.trainer, "accumulate_grad_batches", 1) or 1))
        if (batch_idx + 1) % accumulate == 0:  # once per optimizer step, after it and before zero_grad
            self.tuner.after_optimizer_step(self.model, self.global_step)

    # ------------------------------------------------------------------ optimisation
    def trained_beside_policy(self) -> list[tuple[str, torch.nn.Parameter]]:
        """Trainable parameters outside the policy that its optimizer steps too (PPO's critic)."""
        policy = {id(p) for p in self.model.parameters()}
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad and id(p) not in policy]

    def configure_optimizers(self):
        return optimization(self.model, self.tuner, self.optimizer_factory, self.method_label, self.lr_scheduler,
                            self.warmup_steps, max(1, int(self.trainer.estimated_stepping_batches)),
                            self.trained_beside_policy())
