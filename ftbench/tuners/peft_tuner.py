"""Any peft method by its config class: LoRA, DoRA (``LoraConfig`` with ``use_dora``), IA3, prefix
tuning, prompt tuning, P-tuning, LoHa, LoKr, VeRA, AdaLoRA, OFT, BOFT, FourierFT, ... one route for
all of them, so a sweep can put them in one table. QLoRA is this tuner on a quantized backbone.

The config is given by ``class_path`` (a ``peft.PeftConfig`` subclass) and its ``init_args``::

    class_path: ftbench.tuners.Peft
    init_args:
      peft_config:
        class_path: peft.LoraConfig
        init_args: {r: 16, lora_alpha: 32, target_modules: all-linear}
      lr: 1.0e-3

``task_type`` is filled in from the backbone's head when the config leaves it empty: ``CAUSAL_LM``
for the LM head, ``SEQ_CLS`` for the scalar score head of a reward model (peft then trains and saves
the new ``score`` layer with the adapter). The reference (the untouched backbone) is the same model
under peft's ``disable_adapter()``: no second copy.

Three methods need more than a config, and get it here:

* Prompt learning that prepends virtual tokens (prompt tuning, P-tuning) makes the model's logits
  ``num_virtual_tokens`` longer than the input; :meth:`Peft.align_logits` drops those positions so the
  objectives see the same shapes as for every other tuner. Prefix tuning adds key/value prefixes only.
* Greedy generation with prompt learning does not go through ``generate``: with peft 0.21 and
  transformers 5, cached ``generate`` of prompt-tuned and prefix-tuned models gives tokens different
  from greedy decoding with the training forward (checked in the tests), so :meth:`Peft.generate`
  decodes these methods itself, one row at a time without padding, with a KV cache started from
  exactly what the training forward computes (virtual-token embeddings before the prompt, or the
  prefix key/values). Every other peft method uses ``generate``.
* AdaLoRA reallocates ranks from the gradients: it needs ``update_and_allocate`` after every
  optimizer step (:meth:`Peft.after_optimizer_step`) and ``total_step`` in its config. peft refuses a
  config without it when the CLI parses it, before any trainer exists, so set it to the run's
  optimizer steps (``trainer.max_steps``); ``tinit + tfinal < total_step``.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional

import torch
from peft import PeftConfig
from torch import nn

from ftbench.errors import ConfigError
from ftbench.naming import peft_label
from ftbench.tuners.base import Tuner, freeze_backbone

if TYPE_CHECKING:
    from ftbench.backbone import Backbone


class _TokenBatches:
    """A data loader's batches with only their token fields, on the model's device; sized and
    re-iterable, as peft's EVA wants (it cycles through them until the SVDs converge)."""

    FIELDS = ("input_ids", "attention_mask", "labels")

    def __init__(self, batches: Iterable[dict[str, Any]], device: torch.device):
        self.batches, self.device = batches, device

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in self.batches:
            yield {k: batch[k].to(self.device) for k in self.FIELDS if k in batch}


def _eva_positions(batch: dict[str, torch.Tensor], eva: Any) -> torch.Tensor:
    """The positions of a batch that enter EVA's SVD, as peft's language-modelling input function picks
    them: attended tokens, and with ``use_label_mask`` only those with a label."""
    mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
    if eva.use_label_mask and "labels" in batch:
        mask &= batch["labels"] != eva.label_mask_value
    return mask


def _forward_tokens(model: nn.Module, inputs: dict[str, torch.Tensor]) -> Any:
    """EVA's forward: the tokens only (the labels choose which positions enter the SVD)."""
    return model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))


class Peft(Tuner):
    """A peft method chosen by its config class (``peft_config.class_path``); the backbone is frozen."""

    name = "peft"
    saved_kind = "peft"  # adapter_config.json with a peft_type + the adapter weights

    def __init__(self, peft_config: Optional[PeftConfig] = None, loraplus_lr_ratio: Optional[float] = None, **kwargs):
        """
        Args:
            peft_config: A peft config by ``class_path`` and ``init_args``, e.g. ``peft.LoraConfig``,
                ``peft.IA3Config``, ``peft.PrefixTuningConfig``, ``peft.PromptTuningConfig``,
                ``peft.LoHaConfig``, ``peft.VeraConfig``, ``peft.AdaLoraConfig``, ``peft.OFTConfig`` or
                ``peft.LoraConfig`` with ``use_dora: true``. ``task_type`` follows the backbone's head.
            loraplus_lr_ratio: LoRA+ (Hayou et al., 2024): the B matrices train at this ratio x ``lr``
                (peft's ``create_loraplus_optimizer``; the paper: 16), with any optimizer.
        """
        super().__init__(**kwargs)
        if peft_config is None:
            raise ConfigError("tuner peft: peft_config is required (e.g. class_path: peft.LoraConfig)")
        if not isinstance(peft_config, PeftConfig):
            raise ConfigError(f"tuner peft: peft_config must be a peft.PeftConfig, got {type(peft_config).__name__}")
        self.peft_config = peft_config
        self.name = peft_label(type(peft_config).__name__, bool(getattr(peft_config, "use_dora", False)))
        if loraplus_lr_ratio is not None:
            if self.name != "lora":
                raise ConfigError(f"tuner.loraplus_lr_ratio: LoRA+ sets the rate of LoRA's B matrices; tuner "
                                  f"{self.name} has none")
            if not loraplus_lr_ratio > 0:
                raise ConfigError(f"tuner.loraplus_lr_ratio: must be > 0 (the paper: 16), got {loraplus_lr_ratio}")
            if self.lr is None:
                raise ConfigError("tuner.loraplus_lr_ratio: LoRA+ needs tuner.lr (the A matrices' rate; "
                                  f"B's is {loraplus_lr_ratio} x it)")
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.total_steps: Optional[int] = None  # set by the objective from the trainer, for AdaLoRA's check

    @classmethod
    def label_for(cls, init_args: dict[str, Any]) -> str:
        """The peft method's label (``lora``, ``dora``, ``ia3``), as an instance's ``name`` is made."""
        spec = init_args.get("peft_config")
        if not isinstance(spec, dict) or "class_path" not in spec:
            return cls.name
        return peft_label(spec["class_path"], bool((spec.get("init_args") or {}).get("use_dora")))

    # ------------------------------------------------------------------ preparation
    def resolved_config(self, model: nn.Module) -> PeftConfig:
        """A copy of the config with ``task_type`` filled in from the head (and AdaLoRA's
        ``total_step`` checked against the trainer's step count)."""
        from peft import AdaLoraConfig, TaskType

        config = copy.deepcopy(self.peft_config)
        if isinstance(getattr(config, "init_lora_weights", True), str) and any(p.is_meta for p in model.parameters()):
            # ftbench estimate's model has no values to initialise from (PiSSA's SVD, LoftQ's quantization):
            # every initialisation gives LoRA's shapes and dtypes, which are all a meta model has
            config.init_lora_weights = True
        if getattr(config, "task_type", None) is None:
            config.task_type = TaskType.SEQ_CLS if getattr(model, "ftbench_head", None) == "score" else TaskType.CAUSAL_LM
        if isinstance(config, AdaLoraConfig) and self.total_steps is not None and self.total_steps != config.total_step:
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(f"tuner adalora: AdaLoraConfig.total_step={config.total_step} but the trainer will take "
                           f"{self.total_steps} optimizer steps: the rank budget schedule (tinit={config.tinit}, "
                           f"tfinal={config.tfinal}) follows total_step")
        return config

    def prepare(self, model: nn.Module, backbone: "Backbone") -> nn.Module:
        from peft import get_peft_model

        model = freeze_backbone(model, backbone)
        return get_peft_model(model, self.resolved_config(model))

    def save(self, model: nn.Module, path: str | Path) -> Path:
        path = Path(path)
        model.save_pretrained(path, safe_serialization=True)
        return path

    def optimizer(self, model: nn.Module, named_parameters: list[tuple[str, nn.Parameter]],
                  make: Any) -> torch.optim.Optimizer:
        """LoRA+: peft's ``create_loraplus_optimizer`` groups the parameters (A matrices and the rest at
        ``lr``, B matrices at ``loraplus_lr_ratio`` x ``lr``, LoRA on embeddings at peft's 1e-6) and
        ``make`` builds the configured optimizer on those groups."""
        if self.loraplus_lr_ratio is None:
            return make(named_parameters)
        from peft.optimizers import create_loraplus_optimizer

        def configured(groups, **kwargs):  # peft passes lr=..., which the groups carry anyway
            return make(groups, **kwargs)

        return create_loraplus_optimizer(model, optimizer_cls=configured, lr=self.lr,
                                         loraplus_lr_ratio=self.loraplus_lr_ratio)

    @property
    def initialises_from_data(self) -> bool:
        """EVA (Paischer et al., 2024): LoRA's A matrices start as the top right-singular vectors of each
        adapted layer's inputs on training batches, with the ranks redistributed across layers by
        explained variance (``eva_config.rho``); B starts at zero, so the backbone is untouched."""
        return getattr(self.peft_config, "init_lora_weights", True) == "eva"

    def initialise_from_data(self, model: nn.Module, batches: Iterable[dict[str, Any]]) -> None:
        """EVA through peft's ``initialize_lora_eva_weights`` (the incremental SVD until the components
        converge, ``eva_config.tau``); a model on the meta device (``ftbench estimate``) keeps LoRA's
        shapes. Only the token fields of a batch reach the model: peft's default forward passes every
        key, and ftbench's batches carry the answers and prompts for evaluation too."""
        if not self.initialises_from_data or any(p.is_meta for p in model.parameters()):
            return
        from peft import initialize_lora_eva_weights

        inputs = _TokenBatches(batches, next(model.parameters()).device)
        eva = self.peft_config.eva_config
        components = round(self.peft_config.r * eva.rho)
        # peft skips a batch with fewer positions than components and cycles the batches until every
        # layer's SVD converges: with no batch large enough it would never stop
        most = max(int(_eva_positions(b, eva).sum()) for b in inputs)
        if most < components:
            raise ConfigError(
                f"tuner {self.name}: EVA's SVD needs at least r x rho = {components} positions in a training batch "
                f"(peft skips smaller batches and would cycle forever); this run's largest batch has {most}"
                + (" trained positions (eva_config.use_label_mask)" if eva.use_label_mask else ""),
                hint="use a larger data.batch_size" + (", or eva_config.use_label_mask: false" if eva.use_label_mask
                                                       else ""))
        initialize_lora_eva_weights(model, dataloader=inputs, forward_fn=_forward_tokens, show_progress_bar=False)

    #: LoRA initialisations that move part of each weight into the adapter and leave the backbone
    #: holding the rest (PiSSA, OLoRA, CorDA) or its quantized round trip (LoftQ): switching the adapter
    #: off then no longer gives the backbone as loaded
    RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq")

    @property
    def changes_backbone(self) -> Optional[str]:
        """The ``init_lora_weights`` that rewrites the backbone's weights, or None."""
        init = getattr(self.peft_config, "init_lora_weights", True)
        return init if isinstance(init, str) and init.startswith(self.RESIDUAL_INITS) else None

    @classmethod
    def load_saved(cls, model: nn.Module, path: Path, backbone: "Backbone", merge: bool = True) -> nn.Module:
        """The adapter loaded with peft and merged into the weights (``merge_and_unload``); on a
        quantized backbone a merge would round the update into 4/8 bits, so it is refused."""
        from peft import PeftModel

        if not merge:
            return PeftModel.from_pretrained(model, str(path))
        if backbone.quantization != "none":
            raise ConfigError(f"backbone.init_from: merging the peft adapter in {str(path)!r} into a "
                              f"{backbone.quantization} backbone would round it into its quantized weights; "
                              "start from a backbone with quantization: none")
        config = PeftConfig.from_pretrained(str(path))
        if getattr(model, "ftbench_head", None) == "score":
            # an SFT stage's adapter (task CAUSAL_LM) under a reward model: peft's causal-LM wrapper
            # wants generation methods a score-head model lacks; the plain PeftModel merges the same
            # body weights (the adapter never touches the LM head, which the score head replaces)
            config.task_type = None
        return PeftModel.from_pretrained(model, str(path), config=config).merge_and_unload()

    @contextlib.contextmanager
    def reference(self, model: nn.Module) -> Iterator[nn.Module]:
        init = self.changes_backbone
        if init is not None:
            raise ConfigError(
                f"tuner {self.name}: init_lora_weights={init!r} rewrites the backbone's weights (it keeps W - BA, "
                "or W's quantized round trip, in the backbone), so the model with the adapter switched off is not "
                "the untouched backbone that a reference (DPO's reference policy, GRPO's KL anchor) must be",
                hint="use init_lora_weights: true (or gaussian), or an objective without a reference")
        with model.disable_adapter():
            yield model

    # ------------------------------------------------------------------ evaluation, merged
    #: peft methods whose merge adds an update to the weight (``W + dW``; DoRA also rescales the rows):
    #: unmerging subtracts it again, which gives ``W`` back within float32 rounding. The others are left
    #: unmerged: IA3 divides by its learned vector to unmerge, OFT/BOFT multiply by an inverse rotation
    #: (exact only as far as the inverse is), and prompt learning has nothing peft can merge.
    MERGED_FOR_EVALUATION = ("LORA", "ADALORA", "LOHA", "LOKR", "VERA")
    #: weight dtypes in which ``(W + dW) - dW`` is ``W`` within rounding that does not add up over many
    #: evaluations (float32: ~1 ulp, 6e-8 relative, per round trip); in bfloat16 one round trip can move
    #: a weight by one bfloat16 ulp (0.4 %), and a frozen backbone would drift at every validation
    MERGE_DTYPES = (torch.float32, torch.float64)

    def unmerged_evaluation_reason(self, model: nn.Module, backbone: "Backbone") -> Optional[str]:
        """Why this run evaluates with the adapter unmerged (None: it merges; see
        :meth:`merge_for_evaluation`)."""
        kind = str(getattr(self.peft_config.peft_type, "value", self.peft_config.peft_type))
        if kind not in self.MERGED_FOR_EVALUATION:
            return f"peft {kind}: merging is not an exact add-and-subtract"
        if backbone.quantization != "none":
            return f"a {backbone.quantization} backbone: a merge rounds the update into its quantized weights"
        dtypes = {layer.get_base_layer().weight.dtype for layer in self.adapted_layers(model)}
        if not dtypes or not dtypes <= set(self.MERGE_DTYPES):
            return f"{sorted(map(str, dtypes))} weights: unmerging would not give the weights back"
        return None

    @staticmethod
    def adapted_layers(model: nn.Module) -> list[nn.Module]:
        from peft.tuners.tuners_utils import BaseTunerLayer

        return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]

    def merge_for_evaluation(self, model: nn.Module, backbone: "Backbone") -> bool:
        """peft's ``merge_adapter`` where exact (:meth:`unmerged_evaluation_reason`): an evaluation
        then runs the plain model's matrix products (LoRA unmerged costs 1.2x in generation on the
        embedded model). Unmerging after it gives every weight back within float32 rounding (the
        tests check 1e-6 relative); predictions may differ where two tokens' logits tie to ~1e-6."""
        if self.unmerged_evaluation_reason(model, backbone) is not None:
            return False
        model.merge_adapter()
        return True

    def unmerge_after_evaluation(self, model: nn.Module) -> None:
        model.unmerge_adapter()

    # ------------------------------------------------------------------ prompt learning
    @property
    def is_prompt_learning(self) -> bool:
        return bool(getattr(self.peft_config, "is_prompt_learning", False))

    @property
    def is_prefix(self) -> bool:
        kind = str(getattr(self.peft_config.peft_type, "value", self.peft_config.peft_type))
        return kind == "PREFIX_TUNING"

    @property
    def reuses_prompt_cache(self) -> bool:
        """Prompt learning decodes itself (:meth:`generate`), from virtual tokens no prompt cache holds."""
        return not self.is_prompt_learning

    @property
    def num_virtual_tokens(self) -> int:
        """Positions prepended to the logits by prompt/P-tuning (0 for every other method)."""
        if not self.is_prompt_learning or self.is_prefix:
            return 0
        return int(self.peft_config.num_virtual_tokens)

    def align_logits(self, logits: torch.Tensor, input_length: int) -> torch.Tensor:
        n = self.num_virtual_tokens
        if n and logits.shape[1] == input_length + n:
            return logits[:, n:]
        return logits

    # ------------------------------------------------------------------ AdaLoRA
    def regularization(self, model: nn.Module) -> Optional[torch.Tensor]:
        """AdaLoRA's orthogonality penalty: ``orth_reg_weight`` x the mean over its P and Q matrices of
        ``||P P^T - I||_F`` and ``||Q^T Q - I||_F``. peft adds it only to a loss the model computes from
        ``labels``; the objectives compute their own loss, so they add it here (training only, as peft)."""
        base = getattr(model, "base_model", None)
        name = getattr(base, "trainable_adapter_name", None)
        if name is None or not hasattr(base, "update_and_allocate"):  # not AdaLoRA
            return None
        weight = base.peft_config[name].orth_reg_weight
        if weight < 0:
            raise ConfigError(f"tuner adalora: orth_reg_weight must be >= 0, got {weight}")
        terms = []
        for n, p in base.model.named_parameters():  # the order and arithmetic of AdaLoraModel.forward
            if ("lora_A" in n or "lora_B" in n) and name in n:
                cov = p @ p.T if "lora_A" in n else p.T @ p
                eye = torch.eye(*cov.size(), dtype=cov.dtype, device=cov.device)
                terms.append(torch.norm(cov - eye, p="fro"))
        if not terms or weight == 0:
            return None
        total = terms[0]
        for t in terms[1:]:
            total = total + t
        return weight * (total / len(terms))

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        base = getattr(model, "base_model", None)
        if hasattr(base, "update_and_allocate"):
            base.update_and_allocate(step)  # AdaLoRA: the scores use this step's gradients

    # ------------------------------------------------------------------ generation
    def generate(self, model: nn.Module, tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 max_new_tokens: int, **sampling: Any) -> torch.Tensor:
        if not self.is_prompt_learning:
            return super().generate(model, tokenizer, input_ids, attention_mask, max_new_tokens, **sampling)
        if sampling.get("do_sample"):
            raise ConfigError(f"tuner {self.name}: sampled generation (online RL) is not supported with prompt "
                             "learning: peft's cached generate differs from the training forward for it")
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            rows.append(self.greedy_prompt_learning(model, ids[mask.bool()].unsqueeze(0), max_new_tokens,
                                                    tokenizer.eos_token_id))
        width = max((len(r) for r in rows), default=0)
        out = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long, device=input_ids.device)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return out

    def greedy_prompt_learning(self, peft_model: nn.Module, ids: torch.Tensor, max_new_tokens: int,
                               eos_token_id: Optional[int]) -> list[int]:
        """Greedy continuation of one unpadded row ``ids`` (shape 1 x T) for prompt/prefix tuning,
        with a KV cache whose first entries are what :class:`peft.PeftModelForCausalLM`'s forward
        puts before the input (so each token is the argmax of the training forward's logits).

        peft's own cached ``generate`` did not continue what the training forward predicts for prompt
        tuning up to peft 0.21 (with peft 0.22 and transformers 5.25 it does); pyproject allows peft
        from 0.17, so ftbench decodes prompt learning itself on every version."""
        base = peft_model.base_model
        n_virtual = int(self.peft_config.num_virtual_tokens)
        if self.is_prefix:
            past = peft_model.get_prompt(1, max_cache_len=ids.shape[1] + n_virtual + max_new_tokens)
            mask = torch.ones(1, n_virtual + ids.shape[1], dtype=torch.long, device=ids.device)
            out = base(input_ids=ids, attention_mask=mask, past_key_values=past, use_cache=True)
        else:
            embeds = peft_model.word_embeddings(ids)
            prompts = peft_model.get_prompt(batch_size=1).to(embeds.dtype)
            out = base(inputs_embeds=torch.cat((prompts, embeds), dim=1), use_cache=True)
        new: list[int] = []
        for _ in range(max_new_tokens):
            token = int(out.logits[0, -1].argmax())
            if eos_token_id is not None and token == eos_token_id:
                new.append(token)  # kept, as generate keeps it; decoding skips special tokens
                break
            new.append(token)
            if len(new) == max_new_tokens:
                break
            out = base(input_ids=torch.tensor([[token]], device=ids.device),
                       past_key_values=out.past_key_values, use_cache=True)
        return new
