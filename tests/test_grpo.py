"""GRPO/RLOO (ftbench.objectives.GRPO) and the reward functions (ftbench.objectives.rewards) on the
tiny Llama: the completion mask, the advantages wiring, the reference with LoRA, a seeded run whose
reward rises (pinned), the reward functions on fixed strings, a reward model loaded from each
tuner's saved output, and the shipped configs run through the CLI.

The GRPO loss itself on fixed log-probs is tests/test_losses.py's."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from ftbench.backbone import Backbone, last_token_scores, score_module
from ftbench.data.instruction import InstructionData
from ftbench.errors import ConfigError
from ftbench.evaluation.evaluator import Evaluator
from ftbench.evaluation.options import EvaluationOptions
from ftbench.objectives import GRPO
from ftbench.objectives.grpo import completion_masks
from ftbench.objectives.losses import grpo_advantages, rloo_advantages
from ftbench.objectives.rewards import (ExactAnswer, FromImport, RewardError, RewardModel, chat_turn_end,
                                        load_reward_model)
from ftbench.tuners import Adapters, Freeze, Full, Peft
from helpers import cpu_trainer, instruction_data, lora
from pinning import load_pins

ROOT = Path(__file__).resolve().parent.parent
EOS, PAD = 2, 3  # the tiny tokenizer's <|im_end|> and <pad>

# The rule of the rising-reward run: the share of completion tokens whose id is one of 64 fixed ids
# (1/8 of the 512-token vocabulary: an untrained model samples them 1 time in 8).
TARGET_IDS = frozenset(range(100, 164))


def target_share(prompts, completions, completion_ids, **columns):
    """A user's reward function (imported by path as ``test_grpo.target_share``)."""
    return [sum(t in TARGET_IDS for t in ids) / len(ids) for ids in completion_ids]


def completion_length(prompts, completions, scale: float = 1.0, **columns):
    return [scale * len(c) for c in completions]


def make_data(backbone: Backbone, **kw) -> InstructionData:
    """GRPO's prompts: 200 built-in instruction rows, batched by prompt, 10 a validation batch."""
    return instruction_data(backbone, **{"builtin_size": 200, "prompt_batches": True, "eval_batch_size": 10, **kw})


def first_batch(dm: InstructionData) -> dict:
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


class Rewards(L.Callback):
    def __init__(self):
        self.rewards: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rewards.append(float(trainer.callback_metrics["train/reward"]))


# ---------------------------------------------------------------------------- the completion mask
def test_completion_mask_keeps_the_first_eos_and_masks_what_follows():
    ids = torch.tensor([[5, EOS, EOS, 7],   # ended at 1: EOS kept, the rest masked (even another EOS)
                        [5, 6, 7, 8],       # never ended: every token counts
                        [EOS, 9, 9, 9],     # ended at once: only the EOS
                        [5, 6, EOS, PAD]])  # padding after EOS
    mask, ended = completion_masks(ids, EOS)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0]]
    assert ended.tolist() == [True, False, True, True]
    mask, ended = completion_masks(ids, None)
    assert mask.tolist() == [[1] * 4] * 4 and not ended.any()


def fixed_rollout(tiny_model_dir, completions: list[list[int]], rewards=None, **kw):
    """A rollout of one batch of 2 prompts whose sampled completions are ``completions`` (G = 4 per
    prompt) instead of samples, scored by ``rewards`` (a list of reward functions) or a recorder."""
    seen = {}

    def record(prompts, completions, **columns):
        seen.update(prompts=prompts, completions=completions, **columns)
        return [float(i % 3) for i in range(len(completions))]

    backbone = Backbone(model=str(tiny_model_dir))
    m = GRPO(backbone=backbone, tuner=lora(), reward_funcs=rewards or [record], num_generations=4,
             max_completion_length=4, **kw)
    m.configure_model()
    batch = first_batch(make_data(backbone, batch_size=2))
    m.sample = lambda *a, **k: torch.tensor(completions)
    return m.rollout(batch), seen, batch, m


COMPLETIONS = [[5, EOS, PAD, PAD], [5, 6, 7, 8], [EOS, PAD, PAD, PAD], [9, 9, EOS, PAD],
               [5, 6, 7, 8], [6, 6, 6, 6], [7, EOS, PAD, PAD], [8, 8, 8, EOS]]


def test_rollout_masks_decodes_and_passes_the_columns(tiny_model_dir):
    r, seen, batch, m = fixed_rollout(tiny_model_dir, COMPLETIONS)
    assert r.completion_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0],
                                          [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert torch.equal(r.loss_mask, r.completion_mask)
    assert float(r.metrics["completions/clipped_ratio"]) == 3 / 8  # rows 1, 4, 5 never ended
    assert float(r.metrics["completions/mean_length"]) == (2 + 4 + 1 + 3 + 4 + 4 + 2 + 4) / 8
    assert float(r.metrics["completions/min_length"]) == 1 and float(r.metrics["completions/max_length"]) == 4
    # each prompt's text, answer and task repeated for its G completions, in order
    assert seen["prompts"] == [p for p in batch["prompts"] for _ in range(4)]
    assert seen["answers"] == [a for a in batch["answers"] for _ in range(4)]
    assert seen["tasks"] == [t for t in batch["tasks"] for _ in range(4)]
    prompt0 = batch["prompt_input_ids"][0][batch["prompt_attention_mask"][0].bool()].tolist()
    assert seen["prompt_ids"][0] == seen["prompt_ids"][3] == prompt0
    # completion ids up to and including the first EOS; text without special tokens
    assert seen["completion_ids"][0] == [5, EOS] and seen["completion_ids"][1] == [5, 6, 7, 8]
    assert seen["completion_ids"][2] == [EOS]
    tok = m.backbone.tokenizer
    assert seen["completions"][0] == tok.decode([5]) and seen["completions"][2] == ""
    # the model sees prompt + completion, the attention mask ending where the completion mask does
    assert torch.equal(r.input_ids[:, -4:], torch.tensor(COMPLETIONS))
    assert torch.equal(r.attention_mask[:, -4:], r.completion_mask)
    assert r.position_ids[0, -4:].tolist()[:2] == [len(prompt0), len(prompt0) + 1]


def test_truncated_completions_masked_out_of_the_loss_only(tiny_model_dir):
    r, _, _, _ = fixed_rollout(tiny_model_dir, COMPLETIONS, mask_truncated_completions=True)
    ended = [1, 0, 1, 1, 0, 0, 1, 1]
    assert r.loss_mask.tolist() == [[m * e for m in row] for row, e in zip(r.completion_mask.tolist(), ended)]
    assert r.completion_mask[1].tolist() == [1, 1, 1, 1]  # still attended to and rewarded
    assert r.rewards.tolist() == [0.0, 1.0, 2.0, 0.0, 1.0, 2.0, 0.0, 1.0]


# ---------------------------------------------------------------------------- advantages
@pytest.mark.parametrize("advantage,scale", [("grpo", None), ("grpo", "batch"), ("grpo", "none"), ("rloo", None)])
def test_advantages_follow_the_switch(tiny_model_dir, advantage, scale):
    r, _, _, _ = fixed_rollout(tiny_model_dir, COMPLETIONS, advantage=advantage, scale_rewards=scale)
    rewards = torch.tensor([0.0, 1.0, 2.0, 0.0, 1.0, 2.0, 0.0, 1.0])
    assert torch.equal(r.rewards, rewards)
    expected = (rloo_advantages(rewards, 4) if advantage == "rloo"
                else grpo_advantages(rewards, 4, scale or "group"))
    assert torch.equal(r.advantages, expected)
    # by hand: group 1 is [0, 1, 2, 0], mean 0.75
    if advantage == "rloo":  # r_i - mean of the other three
        assert r.advantages[:4].tolist() == pytest.approx([-1.0, 1 - 2 / 3, 2 - 1 / 3, -1.0], abs=1e-6)
    elif scale == "none":
        assert r.advantages[:4].tolist() == pytest.approx([-0.75, 0.25, 1.25, -0.75], abs=1e-6)
    elif scale is None:  # the group's Bessel std: sqrt(2.75 / 3) = 0.957427
        assert r.advantages[:4].tolist() == pytest.approx([x / (0.9574271 + 1e-4) for x in (-0.75, 0.25, 1.25, -0.75)], abs=1e-6)


def test_rewards_are_a_weighted_sum_with_none_left_out(tiny_model_dir):
    def ones(prompts, completions, **kw):
        return [1.0] * len(completions)

    def some(prompts, completions, **kw):
        return [None if i % 2 else 2.0 for i in range(len(completions))]

    r, _, _, m = fixed_rollout(tiny_model_dir, COMPLETIONS, rewards=[ones, some], reward_weights=[0.5, 3.0])
    assert r.rewards.tolist() == [6.5, 0.5] * 4
    assert float(r.metrics["rewards/ones/mean"]) == 1.0 and float(r.metrics["rewards/some/mean"]) == 2.0
    assert float(r.metrics["rewards/some/std"]) == 0.0
    assert float(r.metrics["frac_reward_zero_std"]) == 0.0


def test_bad_arguments(tiny_model_dir):
    def make(**kw):
        return GRPO(backbone=Backbone(model=str(tiny_model_dir)), tuner=lora(), **kw)

    for kw, text in [({"num_generations": 1}, "num_generations must be an int >= 2"),
                     ({"advantage": "rloo", "scale_rewards": "group"}, "scale_rewards 'group' applies to advantage: grpo"),
                     ({"num_iterations": 0}, "num_iterations must be an int >= 1 (updates per generated batch), got 0"),
                     ({"steps_per_generation": 0}, "steps_per_generation must be an int >= 1"),
                     ({"loss_type": "ppo"}, "unknown loss_type 'ppo'; expected one of grpo, bnpo, dr_grpo, dapo, luspo, "
                                            "cispo, sapo, vespo"),
                     ({"importance_sampling_level": "seq"}, "unknown importance_sampling_level 'seq'"),
                     ({"epsilon": 0.2, "epsilon_high": 0.1}, "epsilon_high (0.1) must be >= epsilon (0.2)"),
                     ({"loss_type": "cispo"}, "loss_type cispo caps the importance weight at epsilon_high itself"),
                     ({"loss_type": "vespo", "importance_sampling_level": "sequence"},
                      "importance_sampling_level sequence with loss_type vespo: TRL warns \"VESPO computes"),
                     ({"delta": 1.5, "loss_type": "sapo"}, "delta (two-sided clipping) applies to the clipped loss types"),
                     ({"delta": 0.9}, "delta must be > 1"),
                     ({"sapo_temperature_neg": 0.0}, "sapo_temperature_neg must be > 0, got 0.0"),
                     ({"advantage": "rloo", "loss_type": "dapo"}, "loss_type 'dapo' applies to advantage: grpo"),
                     ({"advantage": "rloo", "importance_sampling_level": "sequence"},
                      "importance_sampling_level 'sequence' applies to advantage: grpo"),
                     ({"beta": -0.1}, "beta must be >= 0"),
                     ({"temperature": 0.0}, "temperature must be > 0"),
                     ({"reward_weights": [1.0, 2.0]}, "2 reward_weights for 1 reward_funcs"),
                     ({"reward_funcs": [ExactAnswer(), ExactAnswer()]}, "two reward functions are named 'exact_answer'")]:
        with pytest.raises(ConfigError, match=text.replace("(", r"\(").replace(")", r"\)")):
            make(**kw)


def test_supervised_batches_are_refused_with_the_fix(tiny_model_dir):
    backbone = Backbone(model=str(tiny_model_dir))
    m = GRPO(backbone=backbone, tuner=lora(), num_generations=2, max_completion_length=2)
    with pytest.raises(ConfigError, match="supervised training batches") as err:
        cpu_trainer(1).fit(m, datamodule=make_data(backbone, prompt_batches=False))
    assert "prompt_batches: true" in err.value.hint
    m.configure_model()
    with pytest.raises(ConfigError, match="no prompts") as err:
        m.rollout(first_batch(make_data(backbone, prompt_batches=False)))
    assert "prompt_batches: true" in err.value.hint


def test_prompt_learning_is_refused(tiny_model_dir):
    from peft import PromptTuningConfig

    m = GRPO(backbone=Backbone(model=str(tiny_model_dir)), tuner=Peft(peft_config=PromptTuningConfig(num_virtual_tokens=4)))
    with pytest.raises(ConfigError, match="cannot sample completions"):
        m.configure_model()


# ---------------------------------------------------------------------------- the reference
def test_lora_reference_logps_are_the_untouched_backbone(tiny_model_dir):
    """With beta > 0 and LoRA, the reference is the same model with the adapter off: after training
    has moved the adapter, its log-probs equal a fresh backbone's exactly, and the policy's differ."""
    backbone = Backbone(model=str(tiny_model_dir))
    m = GRPO(backbone=backbone, tuner=lora(lr=1e-2), reward_funcs=[target_share], num_generations=4,
             max_completion_length=6, beta=0.1)
    assert m.needs_reference and not GRPO(backbone=backbone, tuner=lora()).needs_reference
    L.seed_everything(0, verbose=False)
    cpu_trainer(3).fit(m, datamodule=make_data(backbone, batch_size=2))
    assert float(trainer_metrics(m)["train/kl"]) > 0
    m.model.eval()
    torch.manual_seed(1)
    r = m.rollout(first_batch(make_data(backbone, batch_size=2)))
    with torch.no_grad():
        with m.tuner.reference(m.model) as ref:
            ref_logps, _ = m.completion_logps(ref, r)
        policy_logps, _ = m.completion_logps(m.model, r)
        fresh = backbone.load_model().eval()
        fresh_logps, _ = m.completion_logps(fresh, r)
    assert torch.equal(ref_logps, fresh_logps)
    assert not torch.allclose(policy_logps, fresh_logps)


def trainer_metrics(m: GRPO) -> dict:
    return {k: float(v) for k, v in m.trainer.callback_metrics.items()}


def test_log_probs_are_those_of_the_sampling_distribution(tiny_model_dir):
    """The training forward (left-padded prompt + completion, positions from the mask, logits /
    temperature) gives the log-probs of the distribution ``generate`` sampled from."""
    backbone = Backbone(model=str(tiny_model_dir))
    m = GRPO(backbone=backbone, tuner=lora(), reward_funcs=[target_share], num_generations=2,
             max_completion_length=5, temperature=0.7)
    m.configure_model()
    m.model.eval()
    batch = first_batch(make_data(backbone, batch_size=3))
    ids, mask = (batch[k].repeat_interleave(2, 0) for k in ("prompt_input_ids", "prompt_attention_mask"))
    torch.manual_seed(0)
    out = m.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=True, temperature=0.7,
                           top_k=0, pad_token_id=PAD, eos_token_id=EOS, output_logits=True,
                           return_dict_in_generate=True)
    new = out.sequences[:, ids.shape[1]:]
    sampled = (torch.stack(out.logits, 1) / 0.7).log_softmax(-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
    m.sample = lambda *a, **k: new
    r = m.rollout(batch)
    with torch.no_grad():
        logps, entropy = m.completion_logps(m.model, r, entropy=True)
    keep = r.completion_mask.bool()
    assert torch.allclose(logps[keep], sampled[keep], atol=1e-5)
    assert (logps[~keep] == 0).all()
    assert entropy.shape == logps.shape and (entropy[keep] > 0).all()


# ---------------------------------------------------------------------------- a seeded run
# Full tuning, lr 1e-2, 4 prompts x G=4 completions of 8 tokens, 16 steps: the mean reward of the
# first 4 steps and of the last 4 (fp32, CPU, seed 0). Each step's reward is a multiple of 1/128
# (16 completions x 8 tokens), so the pins are exact. Per step:
# 0.109 0.133 0.109 0.148 | 0.117 0.172 0.156 0.180 0.242 0.328 0.375 0.430 | 0.438 0.500 0.586 0.594
# (pins "rise": start 0.125, end 0.529296875)
PIN_NAME = "grpo"


def rising_run(tiny_model_dir, steps: int = 16) -> tuple[list[float], GRPO]:
    backbone = Backbone(model=str(tiny_model_dir))
    m = GRPO(backbone=backbone, tuner=Full(lr=1e-2),
             reward_funcs=[FromImport("test_grpo.target_share")], num_generations=4, max_completion_length=8,
             lr_scheduler="constant")
    rec = Rewards()
    L.seed_everything(0, verbose=False)
    cpu_trainer(steps, [rec]).fit(m, datamodule=make_data(backbone))
    return rec.rewards, m


def rise_of(rewards: list[float]) -> tuple[float, float]:
    """The mean reward of the first 4 steps and of the last 4."""
    return sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4


def test_reward_rises_on_a_rule_pinned(tiny_model_dir):
    rewards, m = rising_run(tiny_model_dir)
    start, end = rise_of(rewards)
    pins = load_pins(PIN_NAME)["rise"]
    assert start == pytest.approx(pins["start"], abs=1e-6), rewards
    assert end == pytest.approx(pins["end"], abs=1e-6), rewards
    assert end > start + 0.3
    metrics = trainer_metrics(m)
    for name in ("train/loss", "train/reward", "train/reward_std", "train/rewards/target_share/mean",
                 "train/rewards/target_share/std", "train/frac_reward_zero_std", "train/entropy", "train/clip_ratio",
                 "train/completions/mean_length", "train/completions/clipped_ratio", "train/time/generation_s",
                 "train/time/optimisation_s"):
        assert name in metrics, name
    assert "train/kl" not in metrics  # beta 0: no reference, no KL
    assert abs(metrics["train/loss"]) < 0.5  # ~0 by construction (ratio 1), whatever the reward does
    timing = m.timing()
    assert timing["steps"] == 16 and len(m.phase_seconds["generation"]) == 16
    assert m.generation_seconds > 0 and m.optimisation_seconds > 0
    assert timing["generation_seconds"] == pytest.approx(m.generation_seconds)
    assert m.timing(skip_steps=2)["steps"] == 14


# ---------------------------------------------------------------------------- evaluation
def test_evaluation_exact_match_and_reward(tiny_model_dir):
    backbone = Backbone(model=str(tiny_model_dir))
    m = GRPO(backbone=backbone, tuner=lora(), reward_funcs=[ExactAnswer(), completion_length], num_generations=2,
             evaluator=Evaluator(EvaluationOptions(max_new_tokens=4)))
    dm = make_data(backbone)
    t = cpu_trainer(1, limit_val_batches=None)
    t.validate(m, datamodule=dm, verbose=False)
    got = {k: float(v) for k, v in t.callback_metrics.items()}
    # the same greedy answers through the evaluator's exact match and the length reward by hand
    dm.setup("validate")
    m.model.eval()
    acc, lengths = [], []
    for batch in dm.val_dataloader():
        answers = m.evaluator.predict_answers(batch)
        acc += m.evaluator.exact_match(None).row_values(answers, batch["answers"])
        lengths += [len(p) for p in answers]
    assert got["val/accuracy"] == pytest.approx(sum(acc) / len(acc))
    assert got["val/rewards/exact_answer"] == pytest.approx(sum(acc) / len(acc))
    assert got["val/rewards/completion_length"] == pytest.approx(sum(lengths) / len(lengths), rel=1e-6)
    assert got["val/reward"] == pytest.approx(got["val/rewards/exact_answer"] + got["val/rewards/completion_length"], rel=1e-6)
    assert "val/macro_accuracy" in got and "val/macro_reward" in got


# ---------------------------------------------------------------------------- reward functions
def test_exact_answer_on_fixed_strings():
    f = ExactAnswer()
    assert f(["q"] * 5, ["42", " 42 \n", "4 2", "42\nand more", "Paris"],
             answers=["42", "42", "42", "42", "paris"]) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert f(["q"], ["A  B"], answers=["A B"]) == [1.0]  # inner white space folded, as exact match
    with pytest.raises(RewardError, match=r"a training row has no exact answer \(task 'arithmetic'"):
        f(["What is 2 + 2?"], ["4"], answers=[None], tasks=["arithmetic"])
    with pytest.raises(RewardError, match="no 'answers' column"):
        f(["q"], ["4"])


def test_exact_answer_compares_as_the_data_metrics_say():
    """Inside a run the reward is the held-out exact match of the row's task, with its options."""
    from ftbench.evaluation.metrics import build_metric

    class Data:
        def metrics_for(self, task):
            if task == "loose":
                return [build_metric({"metric": "exact_match", "ignore_case": True, "first_line": True})]
            return [build_metric("rouge_l")]  # no exact match: the default comparison

    class Run:
        evaluator = Evaluator(data=Data())

    f = ExactAnswer()
    f.bind(Run())
    assert f(["q"] * 4, ["paris\nand more", "Lyon", "paris", "Paris"], answers=["Paris", "paris", "Paris", "Paris"],
             tasks=["loose", "loose", "strict", "strict"]) == [1.0, 0.0, 0.0, 1.0]


def test_a_function_by_import_path():
    f = FromImport("test_grpo.completion_length", kwargs={"scale": 0.5})
    assert f.name == "completion_length"
    assert f(["p", "p"], ["abcd", ""], answers=[None, None]) == [2.0, 0.0]
    assert FromImport("test_grpo.target_share", alias="share").name == "share"
    assert FromImport("test_grpo.target_share")(["p"], ["x"], completion_ids=[[100, 5, 163, 164]]) == [0.5]
    with pytest.raises(ConfigError, match="has no 'nothing_here'"):
        FromImport("test_grpo.nothing_here")
    with pytest.raises(ConfigError, match="cannot import 'no_such_module.f'"):
        FromImport("no_such_module.f")
    with pytest.raises(ConfigError, match="not a callable"):
        FromImport("test_grpo.TARGET_IDS")


def test_a_function_that_returns_the_wrong_count_is_named(tiny_model_dir):
    def short(prompts, completions, **kw):
        return [1.0]

    with pytest.raises(RewardError, match="reward short: returned 1 values for 8 completions"):
        fixed_rollout(tiny_model_dir, COMPLETIONS, rewards=[short])


# ---------------------------------------------------------------------------- reward model
def score_model(backbone: Backbone, tuner) -> torch.nn.Module:
    """A score-head model prepared by ``tuner`` as the Reward objective prepares it, with its trained
    weights moved off their initial values (a stand-in for training)."""
    model = tuner.prepare(backbone.load_model(head="score"), backbone)
    score_module(model).requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def adapters():
    return Adapters(placement="pfeiffer", bottleneck_size=8)


@pytest.mark.parametrize("name,make_tuner", [("lora", lora), ("full", Full), ("freeze", Freeze), ("adapters", adapters)])
def test_reward_model_loads_each_tuners_saved_output(tiny_model_dir, tmp_path, name, make_tuner):
    backbone = Backbone(model=str(tiny_model_dir))
    tuner = make_tuner()
    model = score_model(backbone, tuner)
    tuner.save(model, tmp_path / "rm")
    loaded = load_reward_model(tmp_path / "rm", backbone)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    tok = backbone.tokenizer
    from ftbench.data.base import pad_batch

    ids = pad_batch([tok("What is 2 + 2? 4")["input_ids"] + [EOS], tok("hello there world")["input_ids"]], PAD)
    mask = (ids != PAD).long()
    assert mask.sum(1).tolist() != [ids.shape[1]] * 2  # one row is padded
    with torch.no_grad():
        assert torch.equal(last_token_scores(loaded, ids, mask), last_token_scores(model, ids, mask))


def test_reward_model_refuses_a_folder_that_is_not_one(tiny_model_dir, tmp_path):
    backbone = Backbone(model=str(tiny_model_dir))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no weights a run saved"):
        load_reward_model(tmp_path / "empty", backbone)
    with pytest.raises(ConfigError, match="is not a folder"):
        load_reward_model(tmp_path / "missing", backbone)


def test_reward_model_from_a_reward_run_scores_like_its_training_data(tiny_model_dir, tmp_path):
    """A reward model trained by a short Reward run on builtin:capitals, saved by the tuner: scoring
    a policy completion (prompt ids + completion ids through EOS + the chat template's end of turn)
    gives exactly the score the trained model gives the preference data's chosen sequence."""
    from ftbench.data.preference import PreferenceData
    from ftbench.objectives import Reward

    backbone = Backbone(model=str(tiny_model_dir))
    rm = Reward(backbone=backbone, tuner=lora(lr=1e-2))
    dm = PreferenceData(backbone=backbone, source="builtin:capitals", builtin_size=64, batch_size=4,
                        val_fraction=0.1, test_fraction=0.1, max_length=64, seed=0, prompt_batches=False)
    L.seed_everything(0, verbose=False)
    cpu_trainer(4).fit(rm, datamodule=dm)
    rm.save_trained(tmp_path / "weights")
    assert chat_turn_end(backbone.tokenizer) == "\n"

    batch = next(iter(dm.train_dataloader()))
    n = batch["chosen_input_ids"].shape[0]
    rm.model.eval()
    with torch.no_grad():
        expected = last_token_scores(rm.model, batch["chosen_input_ids"], batch["chosen_attention_mask"])
    tok = backbone.tokenizer
    prompts, completions, prompt_ids, completion_ids = [], [], [], []
    for i in range(n):
        p_ids = batch["prompt_input_ids"][i][batch["prompt_attention_mask"][i].bool()].tolist()
        full = batch["chosen_input_ids"][i][batch["chosen_attention_mask"][i].bool()].tolist()
        assert full[: len(p_ids)] == p_ids
        response = full[len(p_ids):]
        c_ids = response[: response.index(EOS) + 1]  # what the policy would emit: up to its EOS
        assert tok.decode(response[len(c_ids):]) == "\n"
        prompts.append(tok.decode(p_ids))
        completions.append(tok.decode(c_ids, skip_special_tokens=True))
        prompt_ids.append(p_ids)
        completion_ids.append(c_ids)

    policy = GRPO(backbone=backbone, tuner=lora(), num_generations=2)
    f = RewardModel(path=str(tmp_path / "weights"))
    f.bind(policy)
    scores = f(prompts, completions, prompt_ids=prompt_ids, completion_ids=completion_ids, answers=[None] * n)
    assert torch.equal(torch.tensor(scores), expected.float())
    # the text path (a reward model with another tokenizer) builds the same sequence here
    f._same_tokenizer = False
    assert f(prompts, completions, prompt_ids=prompt_ids, completion_ids=completion_ids) == pytest.approx(scores, abs=1e-6)
    # without the end of turn the last token read is EOS, not the "\n" the model was trained on
    plain = RewardModel(path=str(tmp_path / "weights"), end_of_turn="")
    plain.bind(policy)
    assert plain(prompts, completions, prompt_ids=prompt_ids, completion_ids=completion_ids) != scores


# ---------------------------------------------------------------------------- shipped configs
CONFIGS = ["grpo", "rloo", "grpo_reward_model", "dapo", "gspo", "cispo", "grpo_mu2"]


@pytest.mark.parametrize("objective", CONFIGS)
def test_shipped_grpo_yaml_runs_with_its_defaults(tiny_model_dir, tmp_path, monkeypatch, objective):
    """Each shipped objective config, with configs/data/instruction_prompts.yaml, runs 2 steps and a
    test on the tiny model with its shipped defaults (the reward-model config with its path pointed
    at a saved reward model: the one value it cannot ship)."""
    from ftbench.cli import cli_main

    monkeypatch.chdir(ROOT)
    config = ROOT / f"configs/objective/{objective}.yaml"
    if objective == "grpo_reward_model":
        backbone = Backbone(model=str(tiny_model_dir))
        tuner = lora()
        tuner.save(score_model(backbone, tuner), tmp_path / "rm")
        content = yaml.safe_load(config.read_text())
        content["init_args"]["reward_funcs"][0]["init_args"]["path"] = str(tmp_path / "rm")
        config = tmp_path / "grpo_reward_model.yaml"
        config.write_text(yaml.safe_dump(content))
    out = tmp_path / "runs"
    cli_main(["fit", "--backbone.model", str(tiny_model_dir), "--tuner", "configs/tuner/lora.yaml",
              "--model", str(config), "--data", "configs/data/instruction_prompts.yaml",
              "--trainer", "configs/trainer/cpu.yaml", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
              "--data.init_args.builtin_size", "60", "--data.init_args.batch_size", "2",
              "--data.init_args.eval_batch_size", "3", "--data.init_args.max_eval_rows", "3",
              "--trainer.enable_progress_bar", "false", "--out", str(out)])
    [path] = out.glob("*.json")
    record = json.loads(path.read_text())
    info = record["train_info"]
    assert info["status"] == "completed" and info["method"] == "grpo+lora", info.get("error")
    assert info["global_steps"] == 2
    [entry] = info["metrics"]
    for name in ("train/reward", "train/time/generation_s", "train/time/optimisation_s", "val/accuracy", "val/reward"):
        assert isinstance(entry[name], float), name
    assert isinstance(info["final"]["test/accuracy"], float) and isinstance(info["final"]["test/reward"], float)
    if objective == "grpo_reward_model":
        assert "train/kl" in entry and "train/rewards/reward_model/mean" in entry
    else:
        assert "train/kl" not in entry and "train/rewards/exact_answer/mean" in entry


# ---------------------------------------------------------------------------- variants and reused rollouts
def variant_run(tiny_model_dir, repeats: int = 1, **kw) -> tuple[list[float], GRPO, list[dict[str, float]]]:
    """``four_step_losses`` of full tuning (lr 1e-2, constant) on 2 prompts x G = 4 completions of at
    most 6 tokens, the data giving each batch ``repeats`` times in a row (as the CLI arranges from
    ``train_batch_repeats``); with the training metrics of each step."""
    from pinning import four_step_losses

    backbone = Backbone(model=str(tiny_model_dir))
    m = GRPO(backbone=backbone, tuner=Full(lr=1e-2), reward_funcs=[FromImport("test_grpo.target_share")],
             num_generations=4, max_completion_length=6, lr_scheduler="constant", **kw)
    assert m.train_batch_repeats == repeats
    dm = make_data(backbone, batch_size=2)
    dm.train_batch_repeats = repeats
    seen: list[dict[str, float]] = []
    step = m.training_loss

    def recording(batch):
        out = step(batch)
        seen.append({k: float(v) for k, v in out.metrics().items()})
        return out

    m.training_loss = recording
    return four_step_losses(m, dm), m, seen


# 4 updates of variant_run (fp32, CPU, seed 0). Updates 1 and 3 generate; 2 and 4 reuse the rollout
# with pi_old stored at generation, after an optimizer step: their ratios differ from 1. The pins' names:
VARIANTS = {"dapo_s2": {"loss_type": "dapo", "steps_per_generation": 2},
            "mu2": {"num_iterations": 2, "epsilon": 1e-3},
            "rloo_mu2": {"advantage": "rloo", "num_iterations": 2, "epsilon": 1e-3}}


def check_reused(seen: list[dict[str, float]], m: GRPO, clip: str) -> None:
    """Updates 1 and 3 generate (ratio 1: nothing clipped); 2 and 4 reuse that rollout (same rewards),
    off-policy: something is clipped; the step-time split says 0 s of generation on a reuse."""
    assert [s[clip] == 0.0 for s in seen] == [True, False, True, False], [s[clip] for s in seen]
    assert seen[0]["reward"] == seen[1]["reward"] and seen[2]["reward"] == seen[3]["reward"]
    gen = m.phase_seconds["generation"]
    assert len(gen) == 4 and gen[0] > 0 and gen[1] == 0.0 and gen[2] > 0 and gen[3] == 0.0
    assert len(m.phase_seconds["optimisation"]) == 4
    assert m.step_time_split()["generation_s"] == pytest.approx(gen[0] + gen[2])


def test_dapo_over_two_micro_batches_pinned(tiny_model_dir):
    """dapo with steps_per_generation 2: each generated batch (2 prompts x 4) is split in two updates of
    4 completions, each normalised by the tokens of the whole generated batch x 2."""
    losses, m, seen = variant_run(tiny_model_dir, 2, **VARIANTS["dapo_s2"])
    assert losses == pytest.approx(load_pins(PIN_NAME)["dapo_s2"], abs=1e-6), losses
    assert m.stores_old_logps()  # 1 % 2 != 0: the second micro-batch trains after an optimizer step
    check_reused(seen, m, "clip_ratio/region_mean")


def test_num_iterations_two_pinned(tiny_model_dir):
    """num_iterations 2 (epsilon 1e-3, so the second update's ratios are clipped): the same rollout
    trains two updates in a row, the second off-policy."""
    losses, m, seen = variant_run(tiny_model_dir, 2, **VARIANTS["mu2"])
    assert losses == pytest.approx(load_pins(PIN_NAME)["mu2"], abs=1e-6), losses
    check_reused(seen, m, "clip_ratio/region_mean")
    assert seen[1]["clip_ratio/low_mean"] > 0 and seen[1]["clip_ratio/high_max"] == 1.0


def test_rloo_reused_pinned(tiny_model_dir):
    losses, m, seen = variant_run(tiny_model_dir, 2, **VARIANTS["rloo_mu2"])
    assert losses == pytest.approx(load_pins(PIN_NAME)["rloo_mu2"], abs=1e-6), losses
    check_reused(seen, m, "clip_ratio/region_mean")
    assert "kl" not in seen[0]  # beta 0: no reference, no KL in the reward


def test_repeated_batches_keep_the_order(tiny_model_dir):
    """data.train_batch_repeats = 3 gives each batch of the unrepeated loader 3 times in a row, in its order."""
    backbone = Backbone(model=str(tiny_model_dir))
    plain, repeated = make_data(backbone, batch_size=2), make_data(backbone, batch_size=2)
    repeated.train_batch_repeats = 3
    for dm in (plain, repeated):
        dm.setup("fit")
    once = [b["prompt_input_ids"] for b in plain.train_dataloader()]
    thrice = [b["prompt_input_ids"] for b in repeated.train_dataloader()]
    assert len(thrice) == 3 * len(once) == 3 * len(plain.train_dataloader())
    assert all(torch.equal(batch, thrice[3 * i + k]) for i, batch in enumerate(once) for k in range(3))


def test_a_reuse_that_gets_new_prompts_is_refused(tiny_model_dir):
    """num_iterations 2 with a data module that gives a new batch each step (no repeats): refused at
    the second update, with the fix, instead of training on a rollout of other prompts."""
    backbone = Backbone(model=str(tiny_model_dir))
    m = GRPO(backbone=backbone, tuner=lora(), reward_funcs=[target_share], num_generations=2,
             max_completion_length=2, num_iterations=2)
    with pytest.raises(ConfigError, match="num_iterations x steps_per_generation = 2 updates reuse each rollout") as err:
        cpu_trainer(2).fit(m, datamodule=make_data(backbone, batch_size=2))
    assert "give each batch 2 times in a row" in err.value.hint


def test_steps_per_generation_must_divide_the_generated_batch(tiny_model_dir):
    backbone = Backbone(model=str(tiny_model_dir))
    m = GRPO(backbone=backbone, tuner=lora(), reward_funcs=[target_share], num_generations=4,
             max_completion_length=2, steps_per_generation=3)
    dm = make_data(backbone, batch_size=2)
    dm.train_batch_repeats = 3
    with pytest.raises(ConfigError, match=r"steps_per_generation=3 must divide the completions of a generated batch "
                                          r"\(data.batch_size x num_generations = 8\)"):
        cpu_trainer(1).fit(m, datamodule=dm)


def test_rloo_takes_beta_times_the_summed_kl_off_the_reward(tiny_model_dir):
    """advantage: rloo with beta 0.1 (TRL's RLOOTrainer): the advantages are the leave-one-out ones of
    reward - 0.1 x sum_t (log pi_old - log pi_ref); the loss is rloo_loss, -mean(A) on-policy."""
    def record(prompts, completions, **columns):
        return [float(i % 3) for i in range(len(completions))]

    backbone = Backbone(model=str(tiny_model_dir))
    m = GRPO(backbone=backbone, tuner=lora(), reward_funcs=[record], num_generations=4, max_completion_length=4,
             advantage="rloo", beta=0.1)
    m.configure_model()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move the adapter off zero, so that the policy differs from the reference
        for name, p in m.model.named_parameters():
            if "lora_B" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    batch = first_batch(make_data(backbone, batch_size=2))
    m.sample = lambda *a, **k: torch.tensor(COMPLETIONS)
    r = m.rollout(batch)
    with torch.no_grad():
        policy, _ = m.completion_logps(m.model, r)
        with m.tuner.reference(m.model) as ref:
            reference, _ = m.completion_logps(ref, r)
    kl = ((policy - reference) * r.completion_mask).sum(1)
    assert (kl.abs() > 1e-4).all()
    assert torch.allclose(r.old_logps, policy)
    rewards = torch.tensor([0.0, 1.0, 2.0, 0.0, 1.0, 2.0, 0.0, 1.0])
    assert torch.equal(r.rewards, rewards)  # the logged reward is the reward functions'
    assert torch.allclose(r.advantages, rloo_advantages(rewards - 0.1 * kl, 4), atol=1e-6)
    assert float(r.metrics["kl"]) == pytest.approx(float(kl.mean()), abs=1e-6)
    out = m.training_loss(batch)  # on-policy: w = 1, loss = mean(-A)
    assert float(out.loss) == pytest.approx(float(-m._pieces[0].advantages.mean()), abs=1e-6)
    assert set(out.metrics()) >= {"kl", "entropy", "clip_ratio/region_mean", "clip_ratio/low_min", "reward"}


# one line through the real CLI, exit 2 (as tests/test_errors_one_line.py)
CLI_ERRORS = [
    ("num_generations", "1", "ftbench: error: objective grpo: num_generations must be an int >= 2"),
    ("epsilon_high", "0.1", "ftbench: error: objective grpo: epsilon_high (0.1) must be >= epsilon (0.2)"),
    ("importance_sampling_level", "sequence", "ftbench: error: objective grpo: importance_sampling_level sequence with "
                                              "loss_type vespo: TRL warns"),
    ("loss_type", "cispo", "ftbench: error: objective grpo: loss_type cispo caps the importance weight at epsilon_high"),
]


@pytest.mark.parametrize("option, value, expected", CLI_ERRORS, ids=[c[0] for c in CLI_ERRORS])
def test_a_bad_grpo_setting_is_one_line(option, value, expected, tiny_model_dir, tmp_path):
    import subprocess
    import sys

    from test_errors_one_line import _env

    extra = ["--model.init_args.loss_type", "vespo"] if option == "importance_sampling_level" else []
    argv = [sys.executable, "-m", "ftbench.cli", "fit", "--backbone.model", str(tiny_model_dir),
            "--tuner", "configs/tuner/lora.yaml", "--model", "configs/objective/grpo.yaml", *extra,
            f"--model.init_args.{option}", value, "--data", "configs/data/instruction_prompts.yaml",
            "--trainer", "configs/trainer/cpu.yaml", "--trainer.max_steps", "1", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--out", str(tmp_path / "out")]
    res = subprocess.run(argv, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr + res.stdout
    lines = [line for line in res.stderr.splitlines() if line.startswith("ftbench: ")]
    assert lines and lines[0].startswith(expected), res.stderr[-3000:]
    assert len(lines) == 1 or (len(lines) == 2 and lines[1].startswith("ftbench: hint: ")), res.stderr[-3000:]


def compute_pins(tmp_dir: Path) -> dict:
    from ftbench.testing import build_tiny_llama

    model_dir = build_tiny_llama(Path(tmp_dir) / "tiny")
    start, end = rise_of(rising_run(model_dir)[0])
    pins = {"rise": {"start": start, "end": end}}
    for name, kw in VARIANTS.items():
        pins[name] = variant_run(model_dir, 2, **kw)[0]
    return pins
