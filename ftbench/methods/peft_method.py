"""Any peft method by its config class: IA3, prefix tuning, prompt tuning, P-tuning, LoHa, LoKr,
DoRA (``LoraConfig`` with ``use_dora``), VeRA, AdaLoRA, OFT, BOFT, FourierFT, ... without a file
per method, so a sweep can put them all in one table.

The config is given by ``class_path`` (a ``peft.PeftConfig`` subclass) and its ``init_args``::

    class_path: ftbench.methods.PEFT
    init_args:
      peft_config:
        class_path: peft.IA3Config
        init_args: {target_modules: [k_proj, v_proj, down_proj], feedforward_modules: [down_proj]}

``task_type`` is set to ``CAUSAL_LM`` when the config leaves it empty.

Two methods need more than a config, and get it here:

* Prompt learning that prepends virtual tokens (prompt tuning, P-tuning) makes the model's logits
  ``num_virtual_tokens`` longer than the input; :meth:`PEFT.forward` drops those positions so the
  shared evaluation (loss per token, exact match by greedy generation) sees the same shapes as for
  every other method. Prefix tuning adds key/value prefixes only, so nothing changes there.
* Greedy generation (exact match) with prompt learning does not go through ``generate``: with
  peft 0.21 and transformers 5, cached ``generate`` of prompt-tuned and prefix-tuned models gives
  tokens different from greedy decoding with the training forward (checked in the tests), so
  :meth:`PEFT.generate_answers` decodes these methods itself, one row at a time without padding,
  with a KV cache started from exactly what the training forward computes (virtual-token embeddings
  before the prompt, or the prefix key/values). Every other peft method uses the shared generation.
* AdaLoRA reallocates ranks during training from the gradients: it needs a call to
  ``update_and_allocate`` after every optimizer step (done in :meth:`PEFT.on_train_batch_end`) and
  ``total_step`` in its config. peft refuses a config without it when the config is built, i.e. when
  the CLI parses it, before any trainer exists, so it cannot be taken from the trainer: set it to
  the run's optimizer steps (``trainer.max_steps``); a mismatch with the trainer is warned about.
  ``tinit``/``tfinal`` must leave a budgeting phase: ``tinit + tfinal < total_step``.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from peft import PeftConfig

from ftbench.methods.base import FTMethod


class PEFT(FTMethod):
    """A peft method chosen by its config class (``peft_config.class_path``); the backbone is frozen."""

    method_name = "peft"

    def __init__(self, peft_config: Optional[PeftConfig] = None, **kwargs):
        """
        Args:
            peft_config: A peft config by ``class_path`` and ``init_args``, e.g. ``peft.IA3Config``,
                ``peft.PrefixTuningConfig``, ``peft.PromptTuningConfig``, ``peft.LoHaConfig``,
                ``peft.VeraConfig``, ``peft.AdaLoraConfig``, ``peft.OFTConfig`` or ``peft.LoraConfig``
                with ``use_dora: true``. ``task_type`` defaults to ``CAUSAL_LM``.
        """
        super().__init__(**kwargs)
        if peft_config is None:
            raise ValueError("PEFT: peft_config is required (e.g. class_path: peft.IA3Config)")
        if not isinstance(peft_config, PeftConfig):
            raise TypeError(f"PEFT: peft_config must be a peft.PeftConfig, got {type(peft_config).__name__}")
        self.peft_config = peft_config
        self.method_name = self.name_for(peft_config)

    @staticmethod
    def name_for(config) -> str:
        """Short name for records: the peft type, with ``dora`` for LoRA with ``use_dora``."""
        kind = str(getattr(config.peft_type, "value", config.peft_type)).lower()
        if kind == "lora" and getattr(config, "use_dora", False):
            return "dora"
        return kind

    # ------------------------------------------------------------------ preparation
    def resolved_config(self):
        """A copy of the config with ``task_type`` filled in (and AdaLoRA's ``total_step`` checked
        against the trainer's step count)."""
        from peft import AdaLoraConfig, TaskType

        config = copy.deepcopy(self.peft_config)
        if getattr(config, "task_type", None) is None:
            config.task_type = TaskType.CAUSAL_LM
        if isinstance(config, AdaLoraConfig) and self._trainer is not None:
            steps = int(self._trainer.estimated_stepping_batches)
            if steps != config.total_step:
                from lightning.pytorch.utilities import rank_zero_warn

                rank_zero_warn(f"PEFT: AdaLoraConfig.total_step={config.total_step} but the trainer will take "
                               f"{steps} optimizer steps: the rank budget schedule (tinit={config.tinit}, "
                               f"tfinal={config.tfinal}) follows total_step")
        return config

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        from peft import get_peft_model

        from ftbench.methods.peft_utils import prepare_quantized

        model = prepare_quantized(model, self.backbone)
        return get_peft_model(model, self.resolved_config())

    @property
    def num_virtual_tokens(self) -> int:
        """Positions prepended to the logits by prompt/P-tuning (0 for every other method)."""
        config = self.peft_config
        if not getattr(config, "is_prompt_learning", False):
            return 0
        if self.is_prefix:
            return 0
        return int(config.num_virtual_tokens)

    @property
    def is_prefix(self) -> bool:
        kind = str(getattr(self.peft_config.peft_type, "value", self.peft_config.peft_type))
        return kind == "PREFIX_TUNING"

    # ------------------------------------------------------------------ steps
    def forward(self, input_ids, attention_mask=None, labels=None, position_ids=None):
        out = super().forward(input_ids, attention_mask, labels, position_ids)
        n = self.num_virtual_tokens
        if n and out.logits is not None and out.logits.shape[1] == input_ids.shape[1] + n:
            out.logits = out.logits[:, n:]
        return out

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        base = getattr(self.model, "base_model", None)
        if not hasattr(base, "update_and_allocate"):
            return
        # AdaLoRA: once per optimizer step, after it and before zero_grad (the scores use the gradients)
        accumulate = max(1, int(getattr(self.trainer, "accumulate_grad_batches", 1) or 1))
        if (batch_idx + 1) % accumulate == 0:
            base.update_and_allocate(self.global_step)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate_answers(self, batch: dict[str, Any]) -> list[str]:
        if not getattr(self.peft_config, "is_prompt_learning", False):
            return super().generate_answers(batch)
        tok = self.backbone.tokenizer
        answers = []
        for ids, mask in zip(batch["gen_input_ids"], batch["gen_attention_mask"]):
            new = self.greedy_prompt_learning(ids[mask.bool()].unsqueeze(0), self.max_new_tokens, tok.eos_token_id)
            answers.append(tok.decode(new, skip_special_tokens=True))
        return answers

    def greedy_prompt_learning(self, ids: torch.Tensor, max_new_tokens: int, eos_token_id: Optional[int]) -> list[int]:
        """Greedy continuation of one unpadded row ``ids`` (shape 1 x T) for prompt/prefix tuning,
        with a KV cache whose first entries are what :class:`peft.PeftModelForCausalLM`'s forward
        puts before the input (so each token is the argmax of the training forward's logits)."""
        peft_model = self.model
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
                break
            new.append(token)
            if len(new) == max_new_tokens:
                break
            out = base(input_ids=torch.tensor([[token]], device=ids.device),
                       past_key_values=out.past_key_values, use_cache=True)
        return new
