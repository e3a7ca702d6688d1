"""Online RL from a reward: GRPO (Shao et al. 2024) and its TRL 1.16 variants (DAPO, GSPO, CISPO,
SAPO, LUSPO, VESPO, Dr. GRPO), with RLOO (Ahmadian et al. 2024) as a switch.

GRPO, its variants, RLOO
    For each prompt the objective samples ``G`` completions and uses the group's own rewards as the
    baseline (no value model: PPO with a critic is its own objective). The variants are settings of
    one loss, :func:`~ftbench.objectives.losses.grpo_loss` (TRL's names and formulas): ``loss_type``
    (grpo, bnpo, dr_grpo, dapo, luspo, cispo, sapo, vespo), ``importance_sampling_level`` (token, or
    sequence: GSPO), ``epsilon``/``epsilon_high`` (DAPO's clip-higher), ``delta`` (two-sided clipping)
    and ``use_bias_correction_kl``. Defaults: ftbench's ``loss_type`` is ``bnpo`` and TRL 1.16's
    ``dapo``: the same numbers whenever ``steps_per_generation`` is 1 (the generated batch is the
    update's micro-batch, so dapo's token count is bnpo's), ftbench's default; kept so that earlier
    runs and pins stand. ``use_bias_correction_kl``: ftbench false, TRL true (it changes the KL
    term's gradient when ``beta > 0``). Shipped: ``configs/objective/{grpo,dapo,gspo,cispo,grpo_mu2,rloo}.yaml``.

    ``advantage: rloo`` is TRL's RLOOTrainer: the leave-one-out baseline
    (:func:`~ftbench.objectives.losses.rloo_advantages`), ``beta`` times each completion's summed k1
    KL to the reference taken off its reward before it, and its own loss,
    :func:`~ftbench.objectives.losses.rloo_loss` (one clipped ratio of SUMMED log-probs per completion,
    mean over completions, no KL term). It stays a switch here, not an objective of its own, because
    everything else is shared (sampling, rewards, reuse of rollouts, timing, evaluation): two branches
    of a few lines (the reward's KL in :meth:`GRPO.rollout`, the loss call in :meth:`GRPO.training_loss`).
    ``loss_type``, ``importance_sampling_level`` and ``delta`` are GRPO's and refused with rloo.

Reusing a rollout (``num_iterations``, ``steps_per_generation``; TRL's names and order)
    A generated batch (``data.batch_size`` prompts x ``G``) is split into ``steps_per_generation``
    micro-batches and trained ``num_iterations`` times over (updates on micro-batches 0, 1, ...,
    S - 1, 0, 1, ...), one training step each. The per-token log-probs of the policy that sampled
    it are stored at generation as pi_old (no grad; TRL's rule: whenever an update of it comes after
    an optimizer step), so from the second update on the ratios differ from 1 and clipping acts. The
    data module gives each prompt batch ``num_iterations x steps_per_generation`` steps in a row (TRL's
    ``RepeatSampler``; the CLI sets ``data.train_batch_repeats`` from :attr:`GRPO.train_batch_repeats`),
    so ``trainer.max_steps`` counts updates, an epoch uses each prompt in each of its updates and the lr
    schedule counts every update; a step that is handed other prompts while the rollout is not used up
    is refused. dapo, cispo and vespo divide by the completion tokens of the whole generated batch
    (TRL's ``num_items_in_batch``) over ``steps_per_generation``; Lightning divides every loss by
    ``accumulate_grad_batches`` itself (TRL divides inside the loss), so the loss is called with
    ``gradient_accumulation_steps=1``: the gradients are TRL's.

One generating step (one batch of prompts, ``data.prompt_batches: true``)
    1. Rollout, no grad, the model in eval mode (no dropout in sampling) and back in train mode
       after: each prompt repeated ``G = num_generations`` times and continued by
       ``tuner.generate(..., do_sample=True, temperature, top_p, top_k)`` for at most
       ``max_completion_length`` new tokens.
    2. The completion mask keeps the tokens up to and including the first EOS
       (:func:`completion_masks`); with ``mask_truncated_completions`` a completion that never ends
       is left out of the loss (it still has a reward and counts in its group's baseline, as in TRL).
    3. Rewards: each reward function (:mod:`ftbench.objectives.rewards`) scores every completion;
       the reward is the weighted sum over functions (``reward_weights``, default all 1; a ``None``
       reward is left out of the sum, TRL's ``nansum``).
    4. pi_old's per-token log-probs when the rollout is reused (and RLOO's KL in the reward).
    5. Advantages from the rewards (``advantage``, ``scale_rewards``).
    6. Loss of the first micro-batch (:func:`~ftbench.objectives.losses.grpo_loss` or ``rloo_loss``).
       Log-probs are of the temperature-scaled logits (``logits / temperature``, the distribution that
       was sampled), as TRL computes them. The reference for ``beta > 0`` is ``tuner.reference(model)``
       under no grad (LoRA: the adapter switched off; full/freeze: a frozen copy kept before the first
       step); ``beta = 0`` (the default, as TRL's GRPOConfig today; it was 0.04, DeepSeekMath's value)
       holds and computes no reference at all.

The loss is ~0 on an update that generates
    pi_old is then the policy itself (detached), so the ratio is 1 and the loss value is ``-mean(A)``
    over tokens, 0 for group-centred advantages with equal lengths and small otherwise, while its
    gradient, ``-A grad logpi``, is not. A flat ``train/loss`` says nothing; watch ``train/reward``.

Metrics (TRL's names, under ``train/``, per step)
    ``loss``; ``reward`` (mean weighted reward), ``reward_std`` (the mean over groups of the group's
    std: TRL's number under ``scale_rewards: group``), ``rewards/<func>/mean`` and ``/std`` for each
    function, ``frac_reward_zero_std`` (groups whose rewards are all equal: no signal), ``kl`` (mean
    k3 per completion token, only when ``beta > 0``), ``entropy`` (the policy's mean per-token entropy
    over the completion tokens of the loss), for the clipped loss types ``clip_ratio/low_mean``,
    ``low_min``, ``high_mean``, ``high_max``, ``region_mean`` (and ``clip_ratio``, the region),
    ``cispo_clip_ratio`` for cispo, ``vespo/phi_seq_mean`` for vespo; ``completions/mean_length``,
    ``/min_length``, ``/max_length`` (tokens up to and including EOS), ``completions/clipped_ratio``
    (the share that hit ``max_completion_length`` without EOS); ``time/generation_s`` and
    ``time/optimisation_s``. The rollout's metrics are logged at each update that trains on it; with
    ``advantage: rloo`` and ``beta > 0``, ``kl`` is the mean summed k1 KL taken off the rewards.

Where the time goes
    Each step (one update) is timed in two phases (with a CUDA synchronisation at the phase
    boundaries): *generation* is the rollout: sampling, decoding, the reward functions (a reward
    model's forward passes too; their share is also kept apart as ``reward_seconds``), pi_old's
    log-probs when stored, and the advantages; 0 on an update that reuses a rollout;
    *optimisation* is the rest of the step: the reference forward (``beta > 0``), the policy forward,
    backward and the optimizer step. Per step they are logged as ``train/time/generation_s`` and
    ``train/time/optimisation_s``; the objective keeps the totals in ``generation_seconds``,
    ``optimisation_seconds`` and ``reward_seconds``, the per-step lists in ``phase_seconds``, and
    :meth:`GRPO.timing` returns them as one mapping (with warm-up steps left out on request).

Evaluation (``val/``, ``test/``)
    On the supervised evaluation batches: the greedy answer to each row with an exact answer
    (``gen_input_ids``), generated once, gives the data set's answer metrics exactly as SFT and DPO
    compute them (the run's :class:`~ftbench.evaluation.evaluator.Evaluator`, given the texts:
    ``data.metrics``, default exact match recorded as ``accuracy``; the predictions file) and ``reward`` (its weighted
    reward under the reward functions; per function ``rewards/<func>``), overall and per task.

Batch size: ``data.batch_size`` counts prompts of a generated batch; a step trains on ``batch_size x
num_generations / steps_per_generation`` completions (TRL counts completions).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch

from ftbench.errors import ConfigError
from ftbench.objectives.base import Objective
from ftbench.objectives.step import TrainingLoss
from ftbench.objectives.losses import (CLIPPED_LOSS_TYPES, GRPO_LOSS_TYPES, IMPORTANCE_SAMPLING_LEVELS,
                                       frac_reward_zero_std, grpo_advantages, grpo_loss, rloo_advantages, rloo_loss)
from ftbench.objectives.rewards import ExactAnswer, RewardFunction, as_reward_function
from ftbench.objectives.rollout import (completion_logps, completion_masks, decode_completions,  # noqa: F401
                                       greedy_completions, sample_completions, score_completions, weighted_reward)

ADVANTAGES = ("grpo", "rloo")
# ftbench's default loss type; TRL 1.16's is "dapo", the same numbers when steps_per_generation is 1
# on one process (the generation batch is the micro-batch: N = its tokens)
DEFAULT_LOSS_TYPE = "bnpo"
SCALE_REWARDS = ("group", "batch", "none")


def check_settings(num_generations: Any, max_completion_length: Any, temperature: float, top_p: float,
                   top_k: Optional[int], advantage: str, scale_rewards: str, loss_type: str, beta: float,
                   epsilon: float, epsilon_high: Optional[float], num_iterations: Any, *,
                   importance_sampling_level: str = "token", delta: Optional[float] = None,
                   steps_per_generation: Any = 1, sapo_temperature_pos: float = 1.0,
                   sapo_temperature_neg: float = 1.05, vespo_lambda_pos: float = 3.0,
                   vespo_lambda_neg: float = 2.0) -> None:
    """The GRPO options that cannot work, each a one-line :class:`~ftbench.errors.ConfigError` naming
    the option (``scale_rewards`` already resolved from its default). The loss's own argument rules
    (:func:`~ftbench.objectives.losses.grpo_loss`) are among them, so no setting reaches it unchecked."""
    def positive_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1

    if isinstance(num_generations, bool) or not isinstance(num_generations, int) or num_generations < 2:
        raise ConfigError(f"objective grpo: num_generations must be an int >= 2 (the group is the baseline), "
                          f"got {num_generations!r}")
    if isinstance(max_completion_length, bool) or not isinstance(max_completion_length, int) or max_completion_length < 1:
        raise ConfigError(f"objective grpo: max_completion_length must be >= 1, got {max_completion_length!r}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ConfigError(f"objective grpo: temperature must be > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"objective grpo: top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 0:
        raise ConfigError(f"objective grpo: top_k must be >= 0, got {top_k}")
    if advantage not in ADVANTAGES:
        raise ConfigError(f"objective grpo: unknown advantage {advantage!r}; expected grpo or rloo")
    if advantage == "rloo" and scale_rewards != "none":
        raise ConfigError(f"objective grpo: scale_rewards {scale_rewards!r} applies to advantage: grpo; RLOO's "
                          "leave-one-out baseline is not scaled", hint="leave scale_rewards out (or none) with rloo")
    if not positive_int(num_iterations):
        raise ConfigError(f"objective grpo: num_iterations must be an int >= 1 (updates per generated batch), "
                          f"got {num_iterations!r}")
    if not positive_int(steps_per_generation):
        raise ConfigError(f"objective grpo: steps_per_generation must be an int >= 1 (micro-batches per generated "
                          f"batch), got {steps_per_generation!r}")
    if loss_type not in GRPO_LOSS_TYPES:
        raise ConfigError(f"objective grpo: unknown loss_type {loss_type!r}; expected one of {', '.join(GRPO_LOSS_TYPES)}")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ConfigError(f"objective grpo: unknown importance_sampling_level {importance_sampling_level!r}; "
                          "expected token or sequence")
    if advantage == "rloo":
        # RLOO's loss is its own (rloo_loss: one ratio of summed log-probs per sequence, mean over sequences)
        for name, value, default in (("loss_type", loss_type, DEFAULT_LOSS_TYPE),
                                     ("importance_sampling_level", importance_sampling_level, "token"),
                                     ("delta", delta, None)):
            if value != default:
                raise ConfigError(f"objective grpo: {name} {value!r} applies to advantage: grpo; advantage: rloo "
                                  "trains with TRL's RLOO loss (a clipped ratio of summed log-probs per sequence)",
                                  hint=f"leave {name} out with advantage: rloo")
    if not beta >= 0:
        raise ConfigError(f"objective grpo: beta must be >= 0, got {beta}")
    if not epsilon >= 0 or (epsilon_high is not None and not epsilon_high >= 0):
        raise ConfigError(f"objective grpo: epsilon and epsilon_high must be >= 0, got {epsilon} and {epsilon_high}")
    if loss_type == "cispo" and advantage == "grpo":
        if epsilon_high is None:
            raise ConfigError("objective grpo: loss_type cispo caps the importance weight at epsilon_high itself (not "
                              "1 + epsilon_high) and needs it set; unset it would cap at epsilon",
                              hint="epsilon_high: 5.0 (TRL's recommendation for cispo)")
    elif epsilon_high is not None and epsilon_high < epsilon:
        raise ConfigError(f"objective grpo: epsilon_high ({epsilon_high}) must be >= epsilon ({epsilon}): the upper "
                          "clip 1 + epsilon_high raises the lower one's range (DAPO's clip-higher)")
    if importance_sampling_level == "sequence" and loss_type == "vespo":
        raise ConfigError("objective grpo: importance_sampling_level sequence with loss_type vespo: TRL warns \"VESPO "
                          "computes sequence-level importance weights internally. `importance_sampling_level` should "
                          "be set to `'token'` (the default).\"", hint="leave importance_sampling_level out (token)")
    if delta is not None:
        if loss_type not in CLIPPED_LOSS_TYPES:
            raise ConfigError(f"objective grpo: delta (two-sided clipping) applies to the clipped loss types "
                              f"({', '.join(CLIPPED_LOSS_TYPES)}), not {loss_type}")
        if not (delta > 1 and math.isfinite(delta)):
            raise ConfigError(f"objective grpo: delta must be > 1 (it caps the ratio of negative-advantage tokens; "
                              f"TRL recommends > 1 + epsilon_high), got {delta}")
    for name, value in (("sapo_temperature_pos", sapo_temperature_pos), ("sapo_temperature_neg", sapo_temperature_neg),
                        ("vespo_lambda_pos", vespo_lambda_pos), ("vespo_lambda_neg", vespo_lambda_neg)):
        if not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"objective grpo: {name} must be > 0, got {value}")
    if scale_rewards not in SCALE_REWARDS:
        raise ConfigError(f"objective grpo: unknown scale_rewards {scale_rewards!r}; expected group, batch or none")


@dataclass
class Rollout:
    """One batch of sampled completions, scored: what the optimisation phase needs."""

    input_ids: torch.Tensor  # (N, Lp + T): left-padded prompt, then the completion
    attention_mask: torch.Tensor  # (N, Lp + T): prompt mask, then ``completion_mask``
    position_ids: torch.Tensor  # (N, Lp + T): from the attention mask, as ``generate`` numbers them
    completion_ids: torch.Tensor  # (N, T)
    completion_mask: torch.Tensor  # (N, T): up to and including the first EOS
    loss_mask: torch.Tensor  # (N, T): completion_mask, without never-ending rows if they are masked
    rewards: torch.Tensor  # (N,) weighted sum over the reward functions
    advantages: torch.Tensor  # (N,)
    metrics: dict[str, torch.Tensor]
    old_logps: Optional[torch.Tensor] = None  # (N, T) per-token log-probs at generation, when updates reuse it

    def rows(self, start: int, stop: int) -> "Rollout":
        """Rows ``start:stop`` (one micro-batch of ``steps_per_generation``); the metrics stay the batch's."""
        cut = {name: getattr(self, name)[start:stop] for name in (
            "input_ids", "attention_mask", "position_ids", "completion_ids", "completion_mask", "loss_mask",
            "rewards", "advantages")}
        old = None if self.old_logps is None else self.old_logps[start:stop]
        return Rollout(**cut, metrics=self.metrics, old_logps=old)


class GRPO(Objective):
    """GRPO (``advantage: grpo``) or RLOO (``advantage: rloo``) against reward functions, sampling
    inside the training step; see the module docstring."""

    name = "grpo"
    data_regimes = ("instruction", "multitask", "preference")
    data_needs = "prompts (data.prompt_batches: true on instruction rows, a mixture or preference pairs)"
    packing_refusal = "it samples completions from prompts (data.prompt_batches: true), which are not packed"
    samples_from_prompts = True

    def __init__(
        self,
        reward_funcs: Optional[list[RewardFunction]] = None,
        reward_weights: Optional[list[float]] = None,
        reward_model: Optional[str] = None,
        num_generations: int = 8,
        max_completion_length: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: Optional[int] = None,
        advantage: Literal["grpo", "rloo"] = "grpo",
        scale_rewards: Optional[Literal["group", "batch", "none"]] = None,
        loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo"] = DEFAULT_LOSS_TYPE,
        beta: float = 0.0,
        epsilon: float = 0.2,
        epsilon_high: Optional[float] = None,
        mask_truncated_completions: bool = False,
        num_iterations: int = 1,
        importance_sampling_level: Literal["token", "sequence"] = "token",
        delta: Optional[float] = None,
        use_bias_correction_kl: bool = False,
        steps_per_generation: int = 1,
        sapo_temperature_pos: float = 1.0,
        sapo_temperature_neg: float = 1.05,
        vespo_k_pos: float = 2.0,
        vespo_lambda_pos: float = 3.0,
        vespo_k_neg: float = 3.0,
        vespo_lambda_neg: float = 2.0,
        **kwargs,
    ):
        """
        Args:
            reward_funcs: The reward functions, a list of ``class_path`` entries:
                ``ftbench.objectives.rewards.ExactAnswer`` (1 when the completion equals the row's
                exact answer), ``ftbench.objectives.rewards.RewardModel`` (``init_args: {path: ...}``,
                a reward run's saved weights) or ``ftbench.objectives.rewards.FromImport``
                (``init_args: {name: module.function}``, TRL's ``f(prompts, completions, **columns)``).
                Default: ``[ExactAnswer]``.
            reward_weights: One weight per reward function (default: all 1.0); the reward is the
                weighted sum.
            reward_model: A reward-model run's saved weights (a folder): a ``RewardModel`` reward
                function after ``reward_funcs`` (which then default to none). A sweep sets it from
                ``reward_model: <run name>``. It is loaded on this run's backbone (so a reward model
                trained from an SFT stage is scored on that stage: give this run the same ``init_from``).
            num_generations: G, completions sampled per prompt (>= 2; TRL's default 8). A step trains
                on ``data.batch_size x G`` completions.
            max_completion_length: Most new tokens sampled per completion (TRL's default 256).
            temperature: Sampling temperature (> 0); the log-probs are of ``logits / temperature``.
            top_p: Nucleus sampling mass (0 < top_p <= 1; 1 = off).
            top_k: Sample among the k most likely tokens (default: off, whatever the model's
                generation config says).
            advantage: ``grpo`` (the reward minus the group mean, scaled by ``scale_rewards``) or
                ``rloo`` (the reward minus the mean of the other G - 1 rewards of its prompt, unscaled).
            scale_rewards: What GRPO divides the centred rewards by: ``group`` (the group's std +
                1e-4, TRL's default), ``batch`` (the batch's std), ``none`` (Dr. GRPO). Default:
                ``group`` for ``grpo``; ``rloo`` allows only ``none``.
            loss_type: How the per-token losses become one number (and, for cispo, sapo, vespo, what
                they are): ``bnpo`` (ftbench's default: token sum / completion tokens of the update's
                micro-batch), ``dapo`` (TRL 1.16's default: token sum / completion tokens of the whole
                generation batch x steps_per_generation; = bnpo when steps_per_generation is 1),
                ``grpo`` (each completion's token mean, then the mean over completions), ``dr_grpo``
                (token sum / (completions x max_completion_length)), ``luspo`` (each completion's token
                sum, mean over completions; meant with importance_sampling_level: sequence), ``cispo``
                (REINFORCE with the importance weight capped at epsilon_high, detached), ``sapo`` (a
                sigmoid soft gate instead of the clip), ``vespo`` (a gamma weight of the sequence's
                ratio); see :func:`~ftbench.objectives.losses.grpo_loss`. Not used with ``advantage: rloo``.
            beta: Weight of the k3 KL to the reference (the untouched backbone, ``tuner.reference``);
                with ``advantage: rloo`` beta times the completion's summed k1 KL is taken off its reward
                (TRL's RLOOTrainer). 0 (TRL's GRPOConfig default; formerly 0.04) holds and computes no
                reference.
            epsilon: Lower clip of the ratio, 1 - epsilon (TRL's 0.2).
            epsilon_high: Upper clip 1 + epsilon_high (DAPO's clip-higher, e.g. 0.28; >= epsilon);
                default epsilon. For ``cispo`` the cap of the weight itself, required (TRL recommends 5.0).
            mask_truncated_completions: Leave completions that hit max_completion_length without EOS
                out of the loss (DAPO's overlong filtering); they keep their reward in the baseline.
            num_iterations: mu, updates per generated batch (TRL's name; GRPO paper's mu): the rollout
                is reused with the log-probs stored at generation as pi_old, so ratios and clipping act.
                The data module gives each prompt batch ``num_iterations x steps_per_generation`` steps
                in a row (the CLI arranges it), so an epoch still uses each prompt once per update pass.
            importance_sampling_level: ``token`` (a ratio per token) or ``sequence`` (GSPO: one per
                completion, the exp of its mean token log-ratio).
            delta: Two-sided clipping (INTELLECT-2): the unclipped ratio capped at delta (> 1; TRL
                recommends > 1 + epsilon_high); default off. Clipped loss types only.
            use_bias_correction_kl: Multiply the per-token KL by the importance weight. TRL 1.16's
                default is true; ftbench's false keeps the KL term of earlier runs (with ratio 1 the
                values agree, the gradients do not).
            steps_per_generation: Micro-batches (training steps) each generated batch is split into
                (TRL's name; TRL defaults it to gradient_accumulation_steps): ``data.batch_size x
                num_generations`` must be a multiple of it.
            sapo_temperature_pos: SAPO's gate temperature for positive advantages (TRL's 1.0).
            sapo_temperature_neg: SAPO's gate temperature otherwise (TRL's 1.05).
            vespo_k_pos: VESPO's gamma shape for advantages >= 0 (TRL's 2.0).
            vespo_lambda_pos: VESPO's gamma rate for advantages >= 0 (TRL's 3.0).
            vespo_k_neg: VESPO's gamma shape for negative advantages (TRL's 3.0).
            vespo_lambda_neg: VESPO's gamma rate for negative advantages (TRL's 2.0).
        """
        super().__init__(**kwargs)
        if scale_rewards is None:
            scale_rewards = "group" if advantage == "grpo" else "none"
        check_settings(num_generations, max_completion_length, temperature, top_p, top_k, advantage, scale_rewards,
                       loss_type, beta, epsilon, epsilon_high, num_iterations,
                       importance_sampling_level=importance_sampling_level, delta=delta,
                       steps_per_generation=steps_per_generation, sapo_temperature_pos=sapo_temperature_pos,
                       sapo_temperature_neg=sapo_temperature_neg, vespo_lambda_pos=vespo_lambda_pos,
                       vespo_lambda_neg=vespo_lambda_neg)

        extra: list[RewardFunction] = []
        if reward_model is not None:
            from ftbench.objectives.rewards import RewardModel

            extra = [RewardModel(path=reward_model)]
        given = reward_funcs if reward_funcs is not None else ([] if extra else [ExactAnswer()])
        funcs = [as_reward_function(f) for f in [*given, *extra]]
        if not funcs:
            raise ConfigError("objective grpo: reward_funcs is empty (give at least one reward function)")
        names = [f.name for f in funcs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"objective grpo: two reward functions are named {dup[0]!r} (their metrics would mix)",
                              hint="give one of them an alias (init_args.alias)")
        if reward_weights is None:
            reward_weights = [1.0] * len(funcs)
        if len(reward_weights) != len(funcs):
            raise ConfigError(f"objective grpo: {len(reward_weights)} reward_weights for {len(funcs)} reward_funcs")
        if not all(math.isfinite(float(w)) for w in reward_weights):
            raise ConfigError(f"objective grpo: reward_weights must be finite, got {reward_weights}")

        self.reward_funcs: list[RewardFunction] = funcs  # a plain list: a reward model is no part of what trains
        self.reward_weights = [float(w) for w in reward_weights]
        self.num_generations = num_generations
        self.max_completion_length = max_completion_length
        self.temperature, self.top_p, self.top_k = float(temperature), float(top_p), top_k
        self.advantage, self.scale_rewards, self.loss_type = advantage, scale_rewards, loss_type
        self.beta, self.epsilon, self.epsilon_high = float(beta), float(epsilon), epsilon_high
        self.mask_truncated_completions = mask_truncated_completions
        self.num_iterations, self.steps_per_generation = num_iterations, steps_per_generation
        self.importance_sampling_level, self.delta = importance_sampling_level, delta
        self.use_bias_correction_kl = use_bias_correction_kl
        self.variant_args = dict(sapo_temperature_pos=sapo_temperature_pos, sapo_temperature_neg=sapo_temperature_neg,
                                 vespo_k_pos=vespo_k_pos, vespo_lambda_pos=vespo_lambda_pos, vespo_k_neg=vespo_k_neg,
                                 vespo_lambda_neg=vespo_lambda_neg)
        # the rollout being reused: its micro-batches, the updates left on it, the prompts it came from
        self._pieces: list[Rollout] = []
        self._updates_left = 0
        self._generated_from: Optional[torch.Tensor] = None
        self._num_items = torch.zeros(())
        self._rows = 0  # completions of the current update (its metrics' batch size)
        # where the time goes (see the module docstring)
        self.generation_seconds = 0.0
        self.optimisation_seconds = 0.0
        self.reward_seconds = 0.0
        self.phase_seconds: dict[str, list[float]] = {"generation": [], "optimisation": [], "reward": []}
        self._t_step: Optional[float] = None
        self._t_generated: Optional[float] = None

    # ------------------------------------------------------------------ set-up
    @property
    def needs_reference(self) -> bool:
        return self.beta != 0.0

    @property
    def holds_reward_model(self) -> bool:
        from ftbench.objectives.rewards import RewardModel

        return any(isinstance(f, RewardModel) for f in self.reward_funcs)

    def held_models(self) -> dict[str, torch.nn.Module]:
        """The reference copy, and the reward models its reward functions load (at their first score)."""
        models = [f.model for f in self.reward_funcs if isinstance(getattr(f, "model", None), torch.nn.Module)]
        return super().held_models() | {"reward_model" + (f".{i + 1}" if i else ""): m for i, m in enumerate(models)}

    def configure_model(self) -> None:
        if getattr(self.tuner, "is_prompt_learning", False):
            raise ConfigError(f"objective grpo: tuner {self.tuner.name} (prompt learning) cannot sample completions: "
                              "peft's cached generate differs from the training forward for it",
                              hint="use LoRA or another peft method that is not prompt/prefix tuning")
        super().configure_model()

    # ------------------------------------------------------------------ rewards
    def score(self, prompts: list[str], completions: list[str], **columns: Any) -> torch.Tensor:
        """``(N, F)`` float32 rewards of each function (NaN where one returned None)."""
        return score_completions(self.reward_funcs, self, prompts, completions, **columns)

    def combine(self, per_func: torch.Tensor) -> torch.Tensor:
        """The weighted sum over functions, NaN (``None``) entries left out (TRL's ``nansum``)."""
        return weighted_reward(per_func, self.reward_weights)

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        if self.advantage == "rloo":
            return rloo_advantages(rewards, self.num_generations)
        return grpo_advantages(rewards, self.num_generations, self.scale_rewards)

    # ------------------------------------------------------------------ rollout
    def decode(self, completion_ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
        return decode_completions(self.backbone.tokenizer, completion_ids, mask)

    @torch.no_grad()
    def sample(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, **sampling: Any) -> torch.Tensor:
        """New tokens after left-padded prompts, the model in eval mode (no dropout) for generation and
        back in its previous mode after."""
        return sample_completions(self.model, self.tuner, self.backbone.tokenizer, prompt_ids, prompt_mask,
                                  sampling.pop("max_new_tokens"), **sampling)

    def rollout(self, batch: dict[str, Any]) -> Rollout:
        """Sample G completions per prompt, score them and compute the advantages (no grad)."""
        if "prompt_input_ids" not in batch:
            raise ConfigError("objective grpo: the training batch has no prompts (prompt_input_ids)",
                              hint="set data.init_args.prompt_batches: true (e.g. configs/data/instruction_prompts.yaml)")
        G = self.num_generations
        tok = self.backbone.tokenizer
        prompt_ids = batch["prompt_input_ids"].repeat_interleave(G, dim=0)
        prompt_mask = batch["prompt_attention_mask"].repeat_interleave(G, dim=0)
        completion_ids = self.sample(prompt_ids, prompt_mask, max_new_tokens=self.max_completion_length,
                                     do_sample=True, temperature=self.temperature, top_p=self.top_p,
                                     top_k=self.top_k or 0)
        completion_mask, ended = completion_masks(completion_ids, tok.eos_token_id)
        loss_mask = completion_mask * ended.unsqueeze(1) if self.mask_truncated_completions else completion_mask

        t_reward = time.perf_counter()
        repeat = lambda values: [v for v in values for _ in range(G)]  # noqa: E731
        unpadded = [ids[m.bool()].tolist() for ids, m in zip(batch["prompt_input_ids"], batch["prompt_attention_mask"])]
        texts = self.decode(completion_ids, completion_mask)
        columns = {
            "answers": repeat(batch.get("answers") or [None] * len(unpadded)),
            "tasks": repeat(batch.get("tasks") or ["default"] * len(unpadded)),
            "prompt_ids": repeat(unpadded),
            "completion_ids": [ids[: int(n)].tolist() for ids, n in zip(completion_ids, completion_mask.sum(1))],
        }
        prompts = repeat(batch.get("prompts") or tok.batch_decode(unpadded, skip_special_tokens=False))
        per_func = self.score(prompts, texts, **columns)
        self._sync()
        reward_s = time.perf_counter() - t_reward
        self.reward_seconds += reward_s
        self.phase_seconds["reward"].append(reward_s)

        rewards = self.combine(per_func)
        lengths = completion_mask.sum(1).float()
        metrics: dict[str, torch.Tensor] = {
            "reward": rewards.mean(),
            "reward_std": rewards.view(-1, G).std(dim=1).mean(),
            "frac_reward_zero_std": frac_reward_zero_std(rewards, G),
            "completions/mean_length": lengths.mean(),
            "completions/min_length": lengths.min(),
            "completions/max_length": lengths.max(),
            "completions/clipped_ratio": (~ended).float().mean(),
        }
        for i, func in enumerate(self.reward_funcs):
            col = per_func[:, i]
            metrics[f"rewards/{func.name}/mean"] = col.nanmean()
            valid = col[~col.isnan()]
            metrics[f"rewards/{func.name}/std"] = valid.std() if valid.numel() > 1 else torch.zeros((), device=col.device)

        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        r = Rollout(
            input_ids=torch.cat([prompt_ids, completion_ids], dim=1),
            attention_mask=attention_mask,
            position_ids=(attention_mask.cumsum(dim=1) - 1).clamp(min=0),
            completion_ids=completion_ids, completion_mask=completion_mask, loss_mask=loss_mask,
            rewards=rewards, advantages=rewards, metrics=metrics,
        )
        if self.stores_old_logps():  # pi_old of the updates that reuse this rollout, taken once here
            with torch.no_grad():
                r.old_logps, _ = self.completion_logps(self.model, r)
        if self.advantage == "rloo" and self.beta != 0.0:
            # TRL's RLOOTrainer: beta times each completion's summed k1 KL (log pi_old - log pi_ref over
            # its loss tokens) is taken off its reward before the leave-one-out baseline
            with torch.no_grad(), self.tuner.reference(self.model) as reference:
                ref_logps, _ = self.completion_logps(reference, r)
            kl = ((r.old_logps - ref_logps) * loss_mask).sum(1)
            metrics["kl"] = kl.mean()
            rewards = rewards - self.beta * kl
        r.advantages = self.advantages(rewards)
        return r

    # ------------------------------------------------------------------ log-probs
    def completion_logps(self, model: torch.nn.Module, r: Rollout, entropy: bool = False
                         ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Per-token log-probs ``(N, T)`` of the completion tokens under ``model`` at the sampling
        temperature (0 on masked positions), and, with ``entropy``, the per-token entropy (no grad)."""
        return completion_logps(model, r.input_ids, r.attention_mask, r.position_ids, r.completion_ids,
                                r.completion_mask, self.temperature, entropy)

    # ------------------------------------------------------------------ training
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def memory_batch(self, batch_size: int, seq_len: int, device: str | torch.device = "meta") -> dict[str, Any]:
        """``ftbench estimate``'s batch: one update's rollout of ``batch_size`` completions of ``seq_len``
        tokens each (prompt, then ``min(max_completion_length, seq_len - 1)`` completion tokens, every one
        real and trained), as if sampled. The sampling itself is not stepped: its no-grad forwards keep
        a KV cache of 2 x layers x rows x tokens x the key/value width, far below what the training
        step saves for backward over the same tokens."""
        T = max(1, min(self.max_completion_length, seq_len - 1))
        ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
        mask = torch.ones_like(ids)
        completion_mask = torch.ones(batch_size, T, dtype=torch.long, device=device)
        rows = torch.zeros(batch_size, device=device)
        old = torch.zeros(batch_size, T, device=device) if self.stores_old_logps() else None
        rollout = Rollout(ids, mask, torch.zeros_like(ids), ids[:, -T:], completion_mask, completion_mask, rows,
                          rows, metrics={"reward": rows.mean()}, old_logps=old)
        return {"rollout": rollout, "input_ids": ids, "attention_mask": mask}

    @property
    def train_batch_repeats(self) -> int:
        """Training steps per generated batch (``num_iterations x steps_per_generation``): the data
        module gives its prompts at each of them (TRL's ``RepeatSampler``)."""
        return self.num_iterations * self.steps_per_generation

    def stores_old_logps(self) -> bool:
        """Whether the rollout keeps its per-token log-probs as pi_old (TRL's rule): when one of its
        updates comes after an optimizer step (``accumulate_grad_batches`` not a multiple of
        ``num_iterations x steps_per_generation``), and for RLOO's KL in the reward. Otherwise every
        update is on-policy and pi_old is the policy itself, detached (ratio 1)."""
        accumulate = max(1, int(getattr(self._trainer, "accumulate_grad_batches", 1) or 1)) if self._trainer else 1
        return (self.advantage == "rloo" and self.beta != 0.0) or accumulate % self.train_batch_repeats != 0

    def on_train_start(self) -> None:
        self._pieces, self._updates_left, self._generated_from = [], 0, None

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._sync()
        self._t_step = time.perf_counter()

    def next_update(self, batch: dict[str, Any]) -> Rollout:
        """The micro-batch this step trains on: a new rollout of ``batch`` split into
        ``steps_per_generation`` micro-batches when the last one is used up (after ``num_iterations``
        passes over its micro-batches, TRL's order: 0, 1, ..., S - 1, 0, 1, ...), else the next one."""
        if "rollout" in batch:  # a rollout handed in ready-made (ftbench estimate: nothing is sampled on meta)
            self._num_items = batch["rollout"].loss_mask.sum()
            return batch["rollout"]
        S = self.steps_per_generation
        if self._updates_left == 0:
            rollout = self.rollout(batch)
            n = rollout.input_ids.shape[0]
            if n % S:
                raise ConfigError(f"objective grpo: steps_per_generation={S} must divide the completions of a generated "
                                  f"batch (data.batch_size x num_generations = {n})")
            size = n // S
            self._pieces = [rollout.rows(i * size, (i + 1) * size) for i in range(S)]
            self._num_items = rollout.loss_mask.sum()  # dapo/cispo/vespo: the generation batch's tokens
            self._updates_left = self.train_batch_repeats
            self._generated_from = batch["prompt_input_ids"]
        elif not torch.equal(batch["prompt_input_ids"], self._generated_from):
            raise ConfigError(f"objective grpo: num_iterations x steps_per_generation = {self.train_batch_repeats} "
                              "updates reuse each rollout, but the data gave new prompts before they were done",
                              hint=f"the data module must give each batch {self.train_batch_repeats} times in a row "
                                   f"(data.train_batch_repeats = {self.train_batch_repeats}; the ftbench CLI sets it)")
        index = (self.train_batch_repeats - self._updates_left) % S
        self._updates_left -= 1
        return self._pieces[index]

    def training_loss(self, batch: dict[str, Any]) -> TrainingLoss:
        if self._t_step is None:
            self._t_step = time.perf_counter()
        generating = self._updates_left == 0
        piece = self.next_update(batch)
        self._sync()
        self._t_generated = time.perf_counter() if generating else self._t_step
        generation_s = self._t_generated - self._t_step  # 0 on an update that reuses the rollout
        self.generation_seconds += generation_s
        self.phase_seconds["generation"].append(generation_s)

        logps, entropy = self.completion_logps(self.model, piece, entropy=True)
        old_logps = piece.old_logps if piece.old_logps is not None else logps.detach()
        if self.advantage == "rloo":
            old_summed = (old_logps * piece.loss_mask).sum(-1)
            loss, loss_metrics = rloo_loss(logps, old_summed, piece.advantages, piece.loss_mask,
                                           epsilon=self.epsilon, epsilon_high=self.epsilon_high)
            loss_metrics["entropy"] = (entropy * piece.loss_mask).sum() / piece.loss_mask.sum().clamp(min=1)
        else:
            ref_logps = None
            if self.beta != 0.0:
                with torch.no_grad(), self.tuner.reference(self.model) as reference:
                    ref_logps, _ = self.completion_logps(reference, piece)
            # gradient_accumulation_steps 1: Lightning divides the returned loss by accumulate_grad_batches itself
            loss, loss_metrics = grpo_loss(
                logps, old_logps, piece.advantages, piece.loss_mask, ref_logps=ref_logps, beta=self.beta,
                epsilon=self.epsilon, epsilon_high=self.epsilon_high, delta=self.delta, loss_type=self.loss_type,
                importance_sampling_level=self.importance_sampling_level,
                max_completion_length=self.max_completion_length, num_items_in_batch=self._num_items,
                gradient_accumulation_steps=1, steps_per_generation=self.steps_per_generation,
                use_bias_correction_kl=self.use_bias_correction_kl, entropy=entropy, **self.variant_args,
            )
        self._rows = piece.input_ids.shape[0]

        def metrics() -> dict[str, Any]:
            logged = {**piece.metrics, **loss_metrics}
            logged["time/generation_s"] = generation_s
            return logged

        return TrainingLoss(loss, piece.loss_mask.sum(), piece.input_ids, piece.attention_mask,
                            piece.input_ids.shape[0], metrics=metrics, prog_bar=("reward",), metrics_every_step=True)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)  # the tuner's after-step hook (AdaLoRA)
        if self._t_generated is None:
            return
        self._sync()
        optimisation_s = time.perf_counter() - self._t_generated
        self.optimisation_seconds += optimisation_s
        self.phase_seconds["optimisation"].append(optimisation_s)
        self._t_step = self._t_generated = None
        self.log("train/time/optimisation_s", optimisation_s, on_step=True, batch_size=self._rows)

    def step_time_split(self) -> dict[str, Optional[float]]:
        return {"generation_s": self.generation_seconds, "optimisation_s": self.optimisation_seconds,
                "reward_s": self.reward_seconds}

    def timing(self, skip_steps: int = 0) -> dict[str, Any]:
        """Seconds per phase: totals and per-step means over the steps after the first ``skip_steps``
        (warm-up). ``reward`` is the part of ``generation`` spent in the reward functions."""
        out: dict[str, Any] = {"steps": max(0, len(self.phase_seconds["optimisation"]) - skip_steps)}
        for phase, values in self.phase_seconds.items():
            kept = values[skip_steps:]
            out[f"{phase}_seconds"] = sum(kept)
            out[f"{phase}_seconds_per_step"] = sum(kept) / len(kept) if kept else None
        return out

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def greedy_completions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int
                           ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Greedy continuations of left-padded prompts: ``(new ids, their mask up to the first EOS,
        texts)``, decoded as the evaluator decodes its own (special tokens left out)."""
        return greedy_completions(self.model, self.tuner, self.backbone.tokenizer, input_ids, attention_mask,
                                  max_new_tokens)

    def evaluate(self, batch: dict[str, Any], stage: str) -> None:
        if "gen_input_ids" not in batch or not self.evaluator.generates(stage):
            return
        ids, mask = batch["gen_input_ids"], batch["gen_attention_mask"]
        # one greedy generation per row: the answer metrics (as SFT and DPO compute them; default exact
        # match, as accuracy) and the rewards score the same texts
        new, completion_mask, texts = self.greedy_completions(ids, mask, self.evaluator.generation_budget(ids.shape[1]))
        unpadded = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
        columns = {"answers": list(batch["answers"]), "tasks": list(batch.get("tasks") or ["default"] * len(texts)),
                   "prompt_ids": unpadded,
                   "completion_ids": [row[: int(n)].tolist() for row, n in zip(new, completion_mask.sum(1))]}
        prompts = self.backbone.tokenizer.batch_decode(unpadded, skip_special_tokens=False)
        per_func = self.score(prompts, texts, **columns)
        values = {"reward": self.combine(per_func)}
        for i, func in enumerate(self.reward_funcs):
            values[f"rewards/{func.name}"] = per_func[:, i]  # NaN (None) rows are left out of the mean
        self.evaluator.update(batch, stage, values, predictions=texts)
