"""PPO with a critic (Ouyang et al. 2022; Stiennon et al. 2020): RLHF's last stage as most RLHF papers
mean it. Defaults and order of operations follow Huang et al. 2024, "The N+ Implementation Details
of RLHF with PPO" (below: *N+*), as TRL's former ``PPOTrainer`` (TRL 0.12-0.19,
``trl/trainer/ppo_trainer.py``; below: *TRL*) implements it; the pure functions are in
:mod:`ftbench.objectives.ppo_losses`.

The four models
    The **policy** is the run's backbone (from the SFT stage: ``backbone.init_from``) under the run's
    tuner. The **reference** is ``tuner.reference(policy)`` (LoRA: the adapter switched off; full or
    freeze: a frozen copy). The **reward model** is a reward run's saved weights
    (``reward_model``), frozen. The **critic** (value model) starts from a reward run's weights
    (``value_model``, default the reward model's: TRL initialises its value model from
    ``reward_model_path``, N+ "initialise the value model from the reward model") and trains under
    its own tuner (``critic_tuner``, default LoRA r=16 on every linear layer; its score head trains
    too). Policy and critic share one optimizer and one loss, ``pg_loss + vf_coef * vf_loss``
    (TRL's ``PolicyAndValueWrapper``). Dropout is switched off in policy and critic (N+ "disable
    dropout"; TRL's ``disable_dropout_in_model``), so the first update's ratio is exactly 1.

One training batch (``data.prompt_batches: true``; one completion per prompt), TRL's order
    1. Sample a completion per prompt (``temperature``, top-k 0, top-p 1: the full distribution,
       N+); the completion mask keeps the tokens up to and including the first EOS.
    2. Under no grad: the policy's per-token log-probs (at ``logits / temperature``, TRL), the
       reference's, the critic's values (its score head at the position before each completion
       token), and the reward functions' scores (the reward model's score on prompt +
       completion's last token, plus any ``reward_funcs``, weighted by ``reward_weights``).
    3. Scores: clipped to ``[-reward_clip, reward_clip]`` when set (TRL <= 0.11's ``score_clip``),
       then ``missing_eos_penalty`` subtracted from completions that never ended (TRL; N+ "EOS
       trick").
    4. Per-token rewards: ``-beta * kl_t`` (k1: ``logp - ref_logp``, TRL's default estimator) on
       every completion token plus the score on the last token (its EOS; TRL puts it one past the
       EOS, see :mod:`~ftbench.objectives.ppo_losses`). ``beta`` is ``kl_coef`` or, with
       ``kl_target`` set, the adaptive controller's current value (Ziegler et al. 2019).
    5. ``whiten_rewards`` (default off, TRL): rewards scaled to unit variance, mean kept.
    6. GAE (``gamma`` 1, ``lam`` 0.95, TRL/N+), returns = advantages + values, then advantages
       whitened over the batch's completion tokens (TRL, N+).
    7. ``num_ppo_epochs`` passes, each over a fresh random permutation split into
       ``num_mini_batches`` mini-batches; per mini-batch one forward of policy and critic, the
       clipped policy loss (``cliprange``) + ``vf_coef`` x the clipped value loss
       (``cliprange_value``), backward, one optimizer step (TRL).
    8. After the rollout's last update, the adaptive controller (if on) updates from its KL (summed
       over tokens, mean over sequences) with ``n_steps`` = its completions (TRL <= 0.11).

Several optimizer steps per rollout: one training step per update
    Each of the ``num_ppo_epochs x num_mini_batches`` updates of a rollout is one training step of
    the shared skeleton (Lightning's automatic optimisation: one optimizer step each), as GRPO's
    rollout reuse: the data module gives each batch of prompts that many times in a row
    (:attr:`train_batch_repeats`; TRL's ``RepeatSampler``; the ftbench CLI sets
    ``data.train_batch_repeats``), the first step of a batch rolls out and the steps that follow
    train on the next mini-batch of the stored experience (a fresh permutation at each epoch's first
    step). So ``trainer.max_steps`` counts updates (optimizer steps) and the learning-rate schedule
    steps per update; TRL's PPO steps its schedule once per rollout batch.

Metrics (under ``train/``, at every step; TRL's names)
    ``objective/kl`` (k1 summed over tokens, mean over sequences), ``objective/entropy`` (the
    sampled tokens' negative log-prob summed over the completion tokens, mean over sequences; TRL's
    sum also adds -1 per padding position, its ``INVALID_LOGPROB``), ``objective/
    non_score_reward``, ``objective/rlhf_reward`` (score + non-score reward), ``objective/scores``,
    ``objective/kl_coef`` (of the rollout the step trains on); of the step's update (TRL logs their
    mean over a rollout's updates, hence ``_avg``): ``policy/approxkl_avg``, ``policy/clipfrac_avg``,
    ``policy/entropy_avg``, ``loss/policy_avg``, ``loss/value_avg``, ``val/clipfrac_avg``,
    ``val/ratio``; ``val/num_eos_tokens``; also ``reward`` (the mean score before the penalty and
    clip), ``rewards/<func>/mean``, ``completions/mean_length``, ``completions/clipped_ratio``,
    ``time/generation_s`` (0 on a step that reuses the rollout) and ``time/optimisation_s``.

Where the time goes (``step_time_split``)
    ``generation_s``: the rollout (sampling, the reward functions, the no-grad forwards of policy,
    reference and critic, rewards and advantages); ``reward_s``: the reward functions' share of it;
    ``optimisation_s``: the updates (forward, backward, optimizer step).

Evaluation as GRPO's: the greedy answer to each row with an exact answer gives the data set's answer
metrics and its reward under the reward functions.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ftbench.backbone import train_score_head
from ftbench.errors import ConfigError
from ftbench.objectives.base import Objective
from ftbench.objectives.ppo_losses import (KLController, gae, masked_mean, ppo_policy_loss, ppo_rewards,
                                           ppo_value_loss, whiten)
from ftbench.objectives.rewards import RewardFunction, RewardModel, as_reward_function
from ftbench.objectives.rollout import (completion_logps, completion_masks, greedy_completions, reward_inputs,
                                       sample_completions, score_completions, weighted_reward)
from ftbench.objectives.step import TrainingLoss
from ftbench.tuners.base import Tuner


def check_settings(s: dict[str, Any]) -> None:
    """The PPO options that cannot work, each a one-line :class:`~ftbench.errors.ConfigError` naming the option."""
    def bad(option: str, why: str, hint: Optional[str] = None) -> None:
        raise ConfigError(f"model.init_args.{option}: {why}", hint=hint)

    for name in ("max_completion_length", "num_ppo_epochs", "num_mini_batches"):
        v = s[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            bad(name, f"must be an int >= 1, got {v!r}")
    if not (s["temperature"] > 0 and math.isfinite(s["temperature"])):
        bad("temperature", f"must be > 0, got {s['temperature']}")
    for name in ("kl_coef", "vf_coef"):
        if not (s[name] >= 0 and math.isfinite(s[name])):
            bad(name, f"must be a finite number >= 0, got {s[name]}")
    for name in ("cliprange", "cliprange_value", "kl_horizon"):
        if not (s[name] > 0 and math.isfinite(s[name])):
            bad(name, f"must be > 0, got {s[name]}")
    for name in ("gamma", "lam"):
        if not 0 <= s[name] <= 1:
            bad(name, f"must be in [0, 1], got {s[name]}")
    for name in ("kl_target", "reward_clip"):
        if s[name] is not None and not (s[name] > 0 and math.isfinite(s[name])):
            bad(name, f"must be > 0 (or null: off), got {s[name]}")
    if s["missing_eos_penalty"] is not None and not math.isfinite(s["missing_eos_penalty"]):
        bad("missing_eos_penalty", f"must be finite, got {s['missing_eos_penalty']}")


def reward_run_problem(path: str | Path) -> Optional[str]:
    """Why ``path`` is not the weights folder of a reward run (``None`` when it is one): a reward run
    saves a score head (peft: an adapter whose task is ``SEQ_CLS`` or whose ``modules_to_save``
    holds ``score``; adapters, freeze and full: ``score.*`` weights)."""
    from safetensors import safe_open

    from ftbench.tuners.saved import saved_kind

    path = Path(path)
    if not path.is_dir():
        return (f"{str(path)!r} is not a folder (give the weights folder of a reward run: --save_weights true "
                "writes {out}/{run_id}/weights)")
    try:
        kind = saved_kind(path)
    except ConfigError as err:
        return str(err).removeprefix("backbone.init_from: ")
    if kind == "peft":
        config = json.loads((path / "adapter_config.json").read_text())
        if config.get("task_type") == "SEQ_CLS" or "score" in (config.get("modules_to_save") or []):
            return None
        task = config.get("task_type") or "causal LM"
        return f"{str(path)!r} is a peft adapter of a {task} run, not of a reward run (no score head)"
    names = [n for f in path.glob("*.safetensors") for n in safe_open(str(f), "pt").keys()]
    if any(n.split(".")[-2:-1] == ["score"] or n.startswith("score.") for n in names):
        return None
    return f"{str(path)!r} holds no score head weights: not the output of a reward run"


def disable_dropout(model: nn.Module) -> None:
    """Every ``nn.Dropout`` to p = 0 (TRL's ``disable_dropout_in_model``; N+ "disable dropout": with
    dropout the rollout's log-probs and the first update's differ, and the ratio is not 1)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def token_values(critic: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 completion_length: int) -> torch.Tensor:
    """``(N, T)`` values of the states before each of the last ``T`` tokens: the critic's score head
    at positions ``L - T - 1 .. L - 2`` (TRL's ``full_value[:, context_length - 1 : -1]``), read with
    a forward hook on the head (as :func:`ftbench.backbone.last_token_scores`)."""
    from ftbench.backbone import score_module

    captured: list[torch.Tensor] = []
    handle = score_module(critic).register_forward_hook(lambda _m, _a, out: captured.append(out))
    try:
        critic(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    finally:
        handle.remove()
    T = completion_length
    return captured[-1][:, -(T + 1):-1, 0].float()


@dataclass
class Experience:
    """One rollout batch with what its updates read (no grad); ``mask`` is the completion mask."""

    input_ids: torch.Tensor  # (N, Lp + T): left-padded prompt, then the completion
    attention_mask: torch.Tensor  # (N, Lp + T)
    position_ids: torch.Tensor  # (N, Lp + T)
    completion_ids: torch.Tensor  # (N, T)
    mask: torch.Tensor  # (N, T) long: up to and including the first EOS
    logps: torch.Tensor  # (N, T) the sampling policy's log-probs
    values: torch.Tensor  # (N, T) the critic's values at sampling time
    advantages: torch.Tensor  # (N, T) whitened
    returns: torch.Tensor  # (N, T)
    metrics: dict[str, torch.Tensor]

    FIELDS = ("input_ids", "attention_mask", "position_ids", "completion_ids", "mask", "logps", "values",
              "advantages", "returns")

    def rows(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The mini-batch of these rows: what one update trains on."""
        return {name: getattr(self, name)[index] for name in self.FIELDS}


class PPO(Objective):
    """PPO with a critic against a reward model; see the module docstring."""

    name = "ppo"
    data_regimes = ("instruction", "multitask", "preference")
    data_needs = "prompts (data.prompt_batches: true on instruction rows, a mixture or preference pairs)"
    packing_refusal = "it samples completions from prompts (data.prompt_batches: true), which are not packed"
    samples_from_prompts = True
    # the per-token KL is computed (and logged) whatever kl_coef is, as TRL; the frozen reward model and
    # the critic are submodules (reward_model, critic)
    needs_reference = holds_reward_model = holds_critic = True

    def __init__(
        self,
        reward_model: Optional[str] = None,
        value_model: Optional[str] = None,
        critic_tuner: Optional[Tuner] = None,
        reward_funcs: Optional[list[RewardFunction]] = None,
        reward_weights: Optional[list[float]] = None,
        max_completion_length: int = 53,
        temperature: float = 0.7,
        kl_coef: float = 0.05,
        kl_target: Optional[float] = None,
        kl_horizon: float = 10000.0,
        missing_eos_penalty: Optional[float] = None,
        reward_clip: Optional[float] = None,
        whiten_rewards: bool = False,
        gamma: float = 1.0,
        lam: float = 0.95,
        cliprange: float = 0.2,
        cliprange_value: float = 0.2,
        vf_coef: float = 0.1,
        num_ppo_epochs: int = 4,
        num_mini_batches: int = 1,
        **kwargs,
    ):
        """
        Args:
            reward_model: A reward run's weights folder (required): it scores prompt + completion
                (the score head at the last token; ``ftbench.objectives.rewards.RewardModel``) and,
                unless ``value_model`` is given, initialises the critic. A sweep sets it from
                ``reward_model: <run name>``. It is loaded on this run's backbone: give this run the
                reward run's ``init_from``.
            value_model: A reward run's weights folder the critic starts from (default: ``reward_model``).
            critic_tuner: What trains in the critic (default: LoRA r=16, alpha 32, every linear
                layer, as configs/tuner/lora.yaml; the score head trains too). It trains with the
                policy's optimizer and learning rate (leave its ``lr`` unset).
            reward_funcs: Reward functions added to the reward model's score (default none), as
                GRPO's ``reward_funcs`` (rules by ``FromImport``, ``ExactAnswer``, ...).
            reward_weights: One weight per reward function, ``reward_funcs`` first and the reward
                model last (default all 1.0); the score is the weighted sum.
            max_completion_length: Most new tokens sampled per completion (TRL's ``response_length``, 53).
            temperature: Sampling temperature (TRL's 0.7); log-probs are of ``logits / temperature``.
            kl_coef: beta of the per-token KL penalty (TRL's 0.05); with ``kl_target`` its start value.
            kl_target: Adaptive KL (Ziegler et al. 2019): the KL per sequence the controller steers
                to (their 6.0); null: fixed ``kl_coef`` (TRL 0.12-0.19, N+).
            kl_horizon: The adaptive controller's horizon in episodes (Ziegler et al.: 10000).
            missing_eos_penalty: Subtracted from the score of a completion without EOS (TRL; N+
                use 1.0 with their "EOS trick"); null: none.
            reward_clip: Clip the score to ``[-reward_clip, reward_clip]`` before the penalty (TRL
                <= 0.11's ``score_clip``); null: no clipping.
            whiten_rewards: Scale the per-token rewards to unit variance over the batch, mean kept (TRL: off).
            gamma: GAE's discount (TRL/N+: 1.0).
            lam: GAE's lambda (TRL/N+: 0.95).
            cliprange: PPO's ratio clip epsilon (TRL: 0.2).
            cliprange_value: The value clip around the rollout's values (TRL: 0.2).
            vf_coef: Weight of the value loss (TRL: 0.1).
            num_ppo_epochs: Passes over each rollout batch (TRL: 4).
            num_mini_batches: Mini-batches per pass (TRL: 1); it must divide the batch's completions.
        """
        super().__init__(**kwargs)
        settings = dict(max_completion_length=max_completion_length, temperature=temperature, kl_coef=kl_coef,
                        kl_target=kl_target, kl_horizon=kl_horizon, missing_eos_penalty=missing_eos_penalty,
                        reward_clip=reward_clip, gamma=gamma, lam=lam, cliprange=cliprange,
                        cliprange_value=cliprange_value, vf_coef=vf_coef, num_ppo_epochs=num_ppo_epochs,
                        num_mini_batches=num_mini_batches)
        check_settings(settings)
        if reward_model is None:
            raise ConfigError("model.init_args.reward_model: PPO needs a reward model (a reward run's weights folder): "
                              "it scores the completions and initialises the critic",
                              hint="in a sweep: reward_model: <the reward run's name>")
        for option, path in (("reward_model", reward_model), ("value_model", value_model)):
            problem = reward_run_problem(path) if path is not None else None
            if problem:
                raise ConfigError(f"model.init_args.{option}: {problem}")
        if critic_tuner is not None and critic_tuner.lr is not None:
            raise ConfigError("model.init_args.critic_tuner.init_args.lr: the critic trains with the policy's optimizer "
                              "and learning rate (one loss, as TRL's PolicyAndValueWrapper); leave it unset")
        funcs = [as_reward_function(f) for f in (reward_funcs or [])] + [RewardModel(path=reward_model)]
        names = [f.name for f in funcs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"model.init_args.reward_funcs: two reward functions are named {dup[0]!r}",
                              hint="give one of them an alias (init_args.alias)")
        if reward_weights is None:
            reward_weights = [1.0] * len(funcs)
        if len(reward_weights) != len(funcs) or not all(math.isfinite(float(w)) for w in reward_weights):
            raise ConfigError(f"model.init_args.reward_weights: {len(funcs)} finite weights expected (reward_funcs, "
                              f"then the reward model), got {reward_weights}")

        self.reward_funcs: list[RewardFunction] = funcs  # a plain list; the reward model's module is held below
        self.reward_weights = [float(w) for w in reward_weights]
        self.reward_model_path, self.value_model_path = reward_model, value_model or reward_model
        self.critic_tuner = critic_tuner
        self.critic: Optional[nn.Module] = None
        self.reward_model: Optional[nn.Module] = None
        for name, value in settings.items():
            setattr(self, name, value)
        self.whiten_rewards = whiten_rewards
        self.kl_controller = KLController(kl_coef, kl_target, kl_horizon)
        self.generation_seconds = self.optimisation_seconds = self.reward_seconds = 0.0
        self._experience: Optional[Experience] = None
        self._order: list[torch.Tensor] = []  # this epoch's mini-batches (row indices)
        self._updates_done = 0
        self._generated_from: Optional[torch.Tensor] = None
        self._t_step: Optional[float] = None
        self._t_generated: Optional[float] = None

    @property
    def train_batch_repeats(self) -> int:
        """Training steps per batch of prompts: its ``num_ppo_epochs x num_mini_batches`` updates."""
        return self.num_ppo_epochs * self.num_mini_batches

    # ------------------------------------------------------------------ set-up
    def configure_model(self) -> None:
        if self.model is not None:
            return
        if getattr(self.tuner, "is_prompt_learning", False):
            raise ConfigError(f"objective ppo: tuner {self.tuner.name} (prompt learning) cannot sample completions: "
                              "peft's cached generate differs from the training forward for it",
                              hint="use LoRA or another peft method that is not prompt/prefix tuning")
        super().configure_model()
        disable_dropout(self.model)
        self.critic = self.build_critic()
        # the frozen reward model as a submodule: it moves with the objective and the memory breakdown
        # (ftbench.bench.memory.weight_breakdown of the module) counts its weights
        reward_model = self.reward_funcs[-1]
        reward_model.bind(self)
        self.reward_model = reward_model.model

    def build_critic(self) -> nn.Module:
        """The value model: this run's backbone with a score head (``init_from`` applied), the reward
        run's weights merged into it, then ``critic_tuner`` on top (its score head trains)."""
        from ftbench.tuners.saved import apply_saved, load_backbone

        tuner = self.critic_tuner or default_critic_tuner()
        self.critic_tuner = tuner
        critic = apply_saved(load_backbone(self.backbone, head="score"), self.value_model_path, self.backbone, merge=True)
        critic = tuner.prepare(critic, self.backbone)
        train_score_head(critic)
        disable_dropout(critic)
        critic.train()
        return critic

    # ------------------------------------------------------------------ the rollout
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def rollout(self, batch: dict[str, Any]) -> Experience:
        """Steps 1-6 of the module docstring, no grad."""
        if "prompt_input_ids" not in batch:
            raise ConfigError("objective ppo: the training batch has no prompts (prompt_input_ids)",
                              hint="set data.init_args.prompt_batches: true (e.g. configs/data/instruction_prompts.yaml)")
        prompt_ids, prompt_mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
        N = prompt_ids.shape[0]
        if N % self.num_mini_batches:
            raise ConfigError(f"model.init_args.num_mini_batches: {self.num_mini_batches} does not divide the batch of "
                              f"{N} completions (data.init_args.batch_size)")
        tok = self.backbone.tokenizer
        # 1. sampling from the full distribution at the temperature (TRL: top_k 0, top_p 1.0; N+)
        completion_ids = sample_completions(self.model, self.tuner, tok, prompt_ids, prompt_mask,
                                            self.max_completion_length, do_sample=True, temperature=self.temperature,
                                            top_p=1.0, top_k=0)
        mask, ended = completion_masks(completion_ids, tok.eos_token_id)
        T = completion_ids.shape[1]
        attention_mask = torch.cat([prompt_mask, mask], dim=1)
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)

        # 2. the scores, then the no-grad forwards (TRL: logprob, ref_logprob, value, score)
        t_reward = time.perf_counter()
        prompts, texts, columns = reward_inputs(batch, completion_ids, mask, tok)
        per_func = score_completions(self.reward_funcs, self, prompts, texts, **columns)
        raw_scores = weighted_reward(per_func, self.reward_weights)
        self._sync()
        self.reward_seconds += time.perf_counter() - t_reward
        logps, _ = completion_logps(self.model, input_ids, attention_mask, position_ids, completion_ids, mask,
                                    self.temperature)
        with self.tuner.reference(self.model) as reference:
            ref_logps, _ = completion_logps(reference, input_ids, attention_mask, position_ids, completion_ids, mask,
                                            self.temperature)
        values = token_values(self.critic, input_ids, attention_mask, position_ids, T) * mask

        # 3. the score: clipped (TRL <= 0.11's score_clip), then the missing-EOS penalty (TRL, N+)
        scores = raw_scores
        if self.reward_clip is not None:
            scores = scores.clamp(-self.reward_clip, self.reward_clip)
        if self.missing_eos_penalty is not None:
            scores = scores - self.missing_eos_penalty * (~ended).to(scores.dtype)
        # 4. per-token rewards: -beta k1 everywhere, the score on the last token
        rewards, kl, non_score_reward = ppo_rewards(scores, logps, ref_logps, mask, self.kl_controller.value)
        # 5. reward whitening, mean kept (TRL's whiten_rewards, shift_mean=False)
        if self.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False) * mask
        # 6. GAE, returns from the unwhitened advantages, then advantage whitening (TRL, N+)
        advantages, returns = gae(rewards, values, mask, self.gamma, self.lam)
        advantages = whiten(advantages, mask) * mask

        lengths = mask.sum(1).float()
        metrics = {
            "objective/kl": kl.sum(1).mean(),
            "objective/entropy": (-logps * mask).sum(1).mean(),
            "objective/non_score_reward": non_score_reward.sum(1).mean(),
            "objective/rlhf_reward": non_score_reward.sum(1).mean() + scores.mean(),
            "objective/scores": scores.mean(),
            "objective/kl_coef": torch.tensor(self.kl_controller.value),
            "val/num_eos_tokens": (completion_ids == tok.eos_token_id).sum().float() if tok.eos_token_id is not None
            else torch.zeros(()),
            "reward": raw_scores.mean(),
            "completions/mean_length": lengths.mean(),
            "completions/clipped_ratio": (~ended).float().mean(),
        }
        for i, func in enumerate(self.reward_funcs):
            metrics[f"rewards/{func.name}/mean"] = per_func[:, i].nanmean()
        return Experience(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          completion_ids=completion_ids, mask=mask, logps=logps, values=values,
                          advantages=advantages, returns=returns, metrics=metrics)

    # ------------------------------------------------------------------ the updates
    def on_train_start(self) -> None:
        self._experience, self._order, self._updates_done = None, [], 0

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._sync()
        self._t_step = time.perf_counter()

    def memory_batch(self, batch_size: int, seq_len: int, device: str | torch.device = "meta") -> dict[str, Any]:
        """``ftbench estimate``'s batch: one update's mini-batch of ``batch_size`` completions of
        ``seq_len`` tokens (prompt, then ``min(max_completion_length, seq_len - 1)`` completion tokens,
        every one real), as if sampled and scored: the step runs the policy and the critic forward and
        backward on it. Sampling and the no-grad reference, value and reward forwards are not stepped
        (their KV cache and activations are freed before the step and below it)."""
        T = max(1, min(self.max_completion_length, seq_len - 1))
        ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
        per_token = torch.zeros(batch_size, T, device=device)
        piece = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": torch.zeros_like(ids),
                 "completion_ids": ids[:, -T:], "mask": torch.ones(batch_size, T, dtype=torch.long, device=device),
                 "logps": per_token, "values": per_token, "advantages": per_token, "returns": per_token}
        return {"experience": piece, "input_ids": ids, "attention_mask": piece["attention_mask"]}

    def next_update(self, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], bool]:
        """``(mini-batch, rollout metrics, rolled out now)`` for this step: a new rollout of ``batch``
        after the last one's ``num_ppo_epochs x num_mini_batches`` updates are done (step 8, the KL
        controller, runs then, on the finished rollout's KL), else the next mini-batch of the stored
        one (a fresh permutation split into ``num_mini_batches`` at each epoch's start: TRL)."""
        if "experience" in batch:  # a mini-batch handed in ready-made (ftbench estimate: nothing is sampled on meta)
            return batch["experience"], {"objective/scores": batch["experience"]["values"].mean()}, False
        generating = self._experience is None or self._updates_done == self.train_batch_repeats
        if generating:
            if self._experience is not None:  # 8. TRL <= 0.11: n_steps = the batch's completions
                self.kl_controller.update(float(self._experience.metrics["objective/kl"]),
                                          self._experience.input_ids.shape[0])
            self._experience, self._updates_done = self.rollout(batch), 0
            self._generated_from = batch["prompt_input_ids"]
        elif not torch.equal(batch["prompt_input_ids"], self._generated_from):
            raise ConfigError(f"objective ppo: num_ppo_epochs x num_mini_batches = {self.train_batch_repeats} updates "
                              "reuse each rollout, but the data gave new prompts before they were done",
                              hint=f"the data module must give each batch {self.train_batch_repeats} times in a row "
                                   f"(data.train_batch_repeats = {self.train_batch_repeats}; the ftbench CLI sets it)")
        exp = self._experience
        if self._updates_done % self.num_mini_batches == 0:  # an epoch starts: a fresh shuffle (TRL)
            N = exp.input_ids.shape[0]
            self._order = list(torch.randperm(N).to(exp.input_ids.device).split(N // self.num_mini_batches))
        index = self._order[self._updates_done % self.num_mini_batches]
        self._updates_done += 1
        return exp.rows(index), exp.metrics, generating

    def training_loss(self, batch: dict[str, Any]) -> TrainingLoss:
        """Step 7 on this step's mini-batch (:meth:`next_update`): the clipped policy loss plus
        ``vf_coef`` x the clipped value loss (TRL's ``loss = pg_loss + vf_coef * vf_loss``), and the
        critic tuner's regularization, if any."""
        if self._t_step is None:
            self._t_step = time.perf_counter()
        piece, rollout_metrics, generating = self.next_update(batch)
        self._sync()
        self._t_generated = time.perf_counter() if generating else self._t_step
        generation_s = self._t_generated - self._t_step  # 0 on a step that reuses the rollout
        self.generation_seconds += generation_s

        mask = piece["mask"]
        T = piece["completion_ids"].shape[1]
        logps, entropy = completion_logps(self.model, piece["input_ids"], piece["attention_mask"],
                                          piece["position_ids"], piece["completion_ids"], mask, self.temperature,
                                          entropy=True)
        values = token_values(self.critic, piece["input_ids"], piece["attention_mask"], piece["position_ids"], T)
        pg_loss, pg = ppo_policy_loss(logps, piece["logps"], piece["advantages"], mask, self.cliprange)
        vf_loss, vf = ppo_value_loss(values, piece["values"], piece["returns"], mask, self.cliprange_value)
        loss = pg_loss + self.vf_coef * vf_loss
        extra = self.critic_tuner.regularization(self.critic)
        if extra is not None:
            loss = loss + extra

        def metrics() -> dict[str, Any]:
            return {**rollout_metrics, "policy/approxkl_avg": pg["approxkl"], "policy/clipfrac_avg": pg["clipfrac"],
                    "policy/entropy_avg": masked_mean(entropy, mask), "loss/policy_avg": pg_loss.detach(),
                    "loss/value_avg": vf_loss.detach(), "val/clipfrac_avg": vf["clipfrac"], "val/ratio": pg["ratio"],
                    "time/generation_s": generation_s}

        return TrainingLoss(loss, mask.sum(), piece["input_ids"], piece["attention_mask"], piece["input_ids"].shape[0],
                            metrics=metrics, prog_bar=("objective/scores",), metrics_every_step=True)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)  # the policy tuner's after-step hook (AdaLoRA)
        accumulate = max(1, int(getattr(self.trainer, "accumulate_grad_batches", 1) or 1))
        if (batch_idx + 1) % accumulate == 0:
            self.critic_tuner.after_optimizer_step(self.critic, self.global_step)
        if self._t_generated is None:
            return
        self._sync()
        optimisation_s = time.perf_counter() - self._t_generated
        self.optimisation_seconds += optimisation_s
        self._t_step = self._t_generated = None
        self.log("train/time/optimisation_s", optimisation_s, on_step=True, batch_size=batch["prompt_input_ids"].shape[0] // self.num_mini_batches)

    def step_time_split(self) -> dict[str, Optional[float]]:
        return {"generation_s": self.generation_seconds, "optimisation_s": self.optimisation_seconds,
                "reward_s": self.reward_seconds}

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, batch: dict[str, Any], stage: str) -> None:
        if "gen_input_ids" not in batch or not self.evaluator.generates(stage):
            return
        ids, mask = batch["gen_input_ids"], batch["gen_attention_mask"]
        tok = self.backbone.tokenizer
        new, completion_mask, texts = greedy_completions(self.model, self.tuner, tok, ids, mask,
                                                         self.evaluator.generation_budget(ids.shape[1]))
        prompts, _, columns = reward_inputs({"prompt_input_ids": ids, "prompt_attention_mask": mask,
                                             "answers": list(batch["answers"]), "tasks": batch.get("tasks")},
                                            new, completion_mask, tok)
        per_func = score_completions(self.reward_funcs, self, prompts, texts, **columns)
        values = {"reward": weighted_reward(per_func, self.reward_weights)}
        for i, func in enumerate(self.reward_funcs):
            values[f"rewards/{func.name}"] = per_func[:, i]
        self.evaluator.update(batch, stage, values, predictions=texts)


def default_critic_tuner() -> Tuner:
    """LoRA r=16, alpha 32, no dropout, every linear layer: configs/tuner/lora.yaml's adapter."""
    from peft import LoraConfig

    from ftbench.tuners import Peft

    return Peft(peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
