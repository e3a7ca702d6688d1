"""PPO with a critic (ftbench.objectives.PPO): the pure functions (ftbench.objectives.ppo_losses, re-exported
by losses) on hand-computed values; the rollout's wiring (the score on the last token, the KL, GAE,
whitening) and the first update's ratio of 1 on the tiny Llama; pinned losses through the real step;
reward rising on a rule; the memory breakdown holding the critic and the reward model; bad settings
as one line; the shipped config through the CLI."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from ftbench.backbone import Backbone, score_module
from ftbench.errors import ConfigError
from ftbench.objectives import PPO
from ftbench.objectives.losses import KLController, gae, ppo_policy_loss, ppo_rewards, ppo_value_loss, whiten
from ftbench.objectives.ppo_losses import masked_mean
from ftbench.objectives.rewards import FromImport
from ftbench.objectives.rollout import completion_logps, reward_inputs
from ftbench.tuners import Full
from helpers import cpu_trainer as trainer
from helpers import LossRecorder, instruction_data, lora
from pinning import four_step_losses, load_pins

ROOT = Path(__file__).resolve().parent.parent
PIN_NAME = "ppo"


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def same(x: torch.Tensor, expected) -> bool:
    """``x`` equals the hand-computed ``expected`` to 1e-12 (float64)."""
    return torch.allclose(x, t(expected), rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------- pure functions
def test_gae_by_hand():
    rewards, values = t([[0.0, 0.0, 1.0], [0.2, 1.0, 9.0]]), t([[0.5, 0.4, 0.3], [0.1, 0.6, 5.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # row 0 backwards: d2 = 1 - 0.3 = 0.7; d1 = 0 + 0.3 - 0.4 = -0.1 -> -0.1 + 0.95 * 0.7 = 0.565;
    # d0 = 0.4 - 0.5 = -0.1 -> -0.1 + 0.95 * 0.565 = 0.43675
    # row 1 (the 9.0 reward and 5.0 value are past the end, masked): d1 = 1 - 0.6 = 0.4;
    # d0 = 0.2 + 0.6 - 0.1 = 0.7 -> 0.7 + 0.95 * 0.4 = 1.08
    assert same(adv, [[0.43675, 0.565, 0.7], [1.08, 0.4, 0.0]])
    assert same(ret, [[0.93675, 0.965, 1.0], [1.18, 1.0, 0.0]])
    adv, _ = gae(rewards[:1], values[:1], mask[:1], gamma=0.9, lam=0.5)
    # d2 = 0.7; d1 = 0.9 * 0.3 - 0.4 = -0.13 -> -0.13 + 0.45 * 0.7 = 0.185; d0 = 0.9 * 0.4 - 0.5 = -0.14
    # -> -0.14 + 0.45 * 0.185 = -0.05675
    assert same(adv, [[-0.05675, 0.185, 0.7]])


def test_whiten_by_hand():
    x = t([[1.0, 2.0], [3.0, 4.0]])
    # mean 2.5, Bessel variance (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3
    expected = [[(v - 2.5) / math.sqrt(5 / 3 + 1e-8) for v in row] for row in ([1.0, 2.0], [3.0, 4.0])]
    assert same(whiten(x, torch.ones_like(x)), expected)
    x, mask = t([[1.0, 2.0, 3.0, 100.0]]), t([[1, 1, 1, 0]])
    # over the mask: mean 2, variance (1 + 0 + 1) / 2 = 1; shift_mean=False adds the mean back
    s = 1 / math.sqrt(1 + 1e-8)
    assert same(whiten(x, mask)[0, :3], [-s, 0.0, s])
    assert same(whiten(x, mask, shift_mean=False)[0, :3], [2 - s, 2.0, 2 + s])
    with pytest.raises(ValueError, match="keeps 1 value"):
        whiten(x, t([[1, 0, 0, 0]]))


def test_policy_loss_by_hand():
    logps, old = t([[math.log(1.5), math.log(0.5), 5.0]]), t([[0.0, 0.0, 0.0]])
    adv, mask = t([[1.0, -1.0, 2.0]]), t([[1, 1, 0]])
    loss, m = ppo_policy_loss(logps, old, adv, mask, cliprange=0.2)
    # token 0: ratio 1.5, A = 1: max(-1.5, -1.2) = -1.2 (clipped); token 1: ratio 0.5, A = -1:
    # max(0.5, 0.8) = 0.8 (clipped); token 2 masked. mean(-1.2, 0.8) = -0.2
    assert float(loss) == pytest.approx(-0.2, abs=1e-12)
    assert float(m["clipfrac"]) == 1.0
    assert float(m["ratio"]) == pytest.approx(1.0, abs=1e-12)
    assert float(m["approxkl"]) == pytest.approx(0.25 * (math.log(1.5) ** 2 + math.log(0.5) ** 2), abs=1e-12)
    # inside the clip range nothing is clipped: ratio 1.1, A = 2: -2.2
    loss, m = ppo_policy_loss(t([[math.log(1.1)]]), t([[0.0]]), t([[2.0]]), t([[1]]), cliprange=0.2)
    assert float(loss) == pytest.approx(-2.2, abs=1e-12) and float(m["clipfrac"]) == 0.0


def test_value_loss_by_hand():
    values, old, returns = t([[1.0, 0.0, 7.0]]), t([[0.5, 0.1, 0.0]]), t([[2.0, -1.0, 0.0]])
    loss, m = ppo_value_loss(values, old, returns, t([[1, 1, 0]]), cliprange_value=0.2)
    # token 0: clip(1.0, 0.3, 0.7) = 0.7; max((1 - 2)^2, (0.7 - 2)^2) = 1.69 (clipped)
    # token 1: clip(0.0, -0.1, 0.3) = 0.0; max(1, 1) = 1 (not clipped). 0.5 * (1.69 + 1) / 2 = 0.6725
    assert float(loss) == pytest.approx(0.6725, abs=1e-12)
    assert float(m["clipfrac"]) == 0.5


def test_per_token_rewards_kl_and_the_score_on_the_last_token():
    logps, ref = t([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]]), t([[-1.5, -2.0, -2.0], [-0.5, -1.0, -7.0]])
    rewards, kl, non_score = ppo_rewards(t([2.0, -1.0]), logps, ref, t([[1, 1, 1], [1, 1, 0]]), kl_coef=0.1)
    # k1 = logp - ref: row 0 [0.5, 0, -1]; row 1 [-0.5, 0, (masked)]
    assert same(kl, [[0.5, 0.0, -1.0], [-0.5, 0.0, 0.0]])
    assert same(non_score, [[-0.05, 0.0, 0.1], [0.05, 0.0, 0.0]])
    # the score on each row's last token: row 0 at 2, row 1 at 1
    assert same(rewards, [[-0.05, 0.0, 2.1], [0.05, -1.0, 0.0]])


def test_kl_controller_fixed_and_adaptive():
    fixed = KLController(0.05)
    assert fixed.update(100.0, 64) == 0.05
    c = KLController(0.2, target=6.0, horizon=10000)
    # KL 9 above target 6: error clip(9/6 - 1, -0.2, 0.2) = 0.2 -> x (1 + 0.2 * 256 / 10000) = 1.00512
    assert c.update(9.0, 256) == pytest.approx(0.2 * 1.00512, abs=1e-15)
    # KL 3: error -0.2 -> x (1 - 0.2 * 100 / 10000) = 0.998
    assert c.update(3.0, 100) == pytest.approx(0.2 * 1.00512 * 0.998, abs=1e-15)
    # KL 6.6: error 0.1 (inside the clip) -> x (1 + 0.1 * 1000 / 10000) = 1.01
    assert c.update(6.6, 1000) == pytest.approx(0.2 * 1.00512 * 0.998 * 1.01, abs=1e-15)


# ---------------------------------------------------------------------------- the objective
def save_reward_run(model_dir: Path, path: Path) -> Path:
    """A reward model's saved weights as a LoRA reward run saves them (adapter + score head), its
    trained weights moved off their initial values (a stand-in for training)."""
    backbone = Backbone(model=str(model_dir))
    tuner = lora()
    torch.manual_seed(0)  # LoRA's A matrices are drawn from the global generator: the same run after any test
    model = tuner.prepare(backbone.load_model(head="score"), backbone)
    score_module(model).requires_grad_(True)  # peft's wrapper: the head's original and trained copies
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    tuner.save(model, path)
    return path


@pytest.fixture(scope="module")
def reward_run(tiny_model_dir, tmp_path_factory) -> Path:
    return save_reward_run(tiny_model_dir, tmp_path_factory.mktemp("rm") / "weights")


def make_data(backbone: Backbone, repeats: int = 1, **kw):
    """200 built-in instruction rows as prompt batches of 4 (seed 0), each batch ``repeats`` times in a
    row (``train_batch_repeats``: the CLI sets it from the objective)."""
    dm = instruction_data(backbone, **{"builtin_size": 200, "prompt_batches": True, "eval_batch_size": 10, **kw})
    dm.train_batch_repeats = repeats
    return dm


def first_batch(dm) -> dict:
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def ppo(tiny_model_dir, reward_run, **kw) -> PPO:
    kw = {"tuner": lora(lr=1e-2), "max_completion_length": 8, "lr_scheduler": "constant", **kw}
    return PPO(backbone=Backbone(model=str(tiny_model_dir)), reward_model=str(reward_run), **kw)


def test_rollout_wiring_returns_are_the_score_minus_the_kl(tiny_model_dir, reward_run):
    """With gamma = lam = 1 the return of a completion's first token is the sum of its rewards: the
    reward model's score minus beta x the summed k1 KL to the reference; the advantages are whitened."""
    m = ppo(tiny_model_dir, reward_run, kl_coef=0.1, gamma=1.0, lam=1.0)
    m.configure_model()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move the adapter off zero, so that the policy differs from its reference
        for p in m.model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    batch = first_batch(make_data(m.backbone))
    torch.manual_seed(0)
    exp = m.rollout(batch)
    mask = exp.mask
    with torch.no_grad(), m.tuner.reference(m.model) as reference:
        ref, _ = completion_logps(reference, exp.input_ids, exp.attention_mask, exp.position_ids, exp.completion_ids,
                                  mask, m.temperature)
    prompts, texts, columns = reward_inputs(batch, exp.completion_ids, mask, m.backbone.tokenizer)
    scores = torch.tensor(m.reward_funcs[-1](prompts, texts, **columns))
    kl = ((exp.logps - ref) * mask).sum(1)
    assert kl.abs().min() > 0
    assert torch.allclose(exp.returns[:, 0], scores - 0.1 * kl, atol=1e-5)
    assert float(exp.metrics["objective/scores"]) == pytest.approx(float(scores.mean()), abs=1e-6)
    assert float(masked_mean(exp.advantages, mask)) == pytest.approx(0.0, abs=1e-5)
    assert torch.all(exp.advantages[mask == 0] == 0) and torch.all(exp.values[mask == 0] == 0)


def test_the_first_update_has_ratio_one(tiny_model_dir, reward_run):
    """The first update sees the rollout's own policy and critic (dropout off): ratio 1, nothing
    clipped, policy loss -mean(A), value loss 0.5 mean((V - R)^2)."""
    m = ppo(tiny_model_dir, reward_run)
    m.configure_model()
    torch.manual_seed(0)
    out = m.training_loss(first_batch(make_data(m.backbone)))  # rolls out, then the first mini-batch: all rows
    exp = m._experience
    metrics = out.metrics()
    assert float(metrics["time/generation_s"]) > 0
    mask = exp.mask
    assert float(metrics["val/ratio"]) == 1.0 and float(metrics["policy/approxkl_avg"]) == 0.0
    assert float(metrics["policy/clipfrac_avg"]) == 0.0 and float(metrics["val/clipfrac_avg"]) == 0.0
    assert float(metrics["loss/policy_avg"]) == pytest.approx(-float(masked_mean(exp.advantages, mask)), abs=1e-6)
    value_loss = 0.5 * masked_mean((exp.values - exp.returns) ** 2, mask)
    assert float(metrics["loss/value_avg"]) == pytest.approx(float(value_loss), abs=1e-6)
    assert float(out.loss.detach()) == pytest.approx(float(metrics["loss/policy_avg"]) + 0.1 * float(value_loss), abs=1e-6)
    assert int(out.trained_tokens) == int(mask.sum())


# ---------------------------------------------------------------------------- pinned runs (tests/pins/ppo.json)
# LoRA (lr 1e-2) on the tiny Llama, 4 prompts a batch, completions of <= 8 tokens, fp32 CPU, seed 0.
def one_update_run(model_dir: Path, rm: Path) -> list[float]:
    """One update per batch (num_ppo_epochs 1, num_mini_batches 1): the shared four_step_losses helper."""
    m = ppo(model_dir, rm, num_ppo_epochs=1, num_mini_batches=1)
    return four_step_losses(m, make_data(m.backbone))


def every_update_run(model_dir: Path, rm: Path) -> tuple[list[float], L.Trainer, PPO]:
    """Two epochs of two mini-batches per batch, 2 batches: 8 updates (8 training steps)."""
    m = ppo(model_dir, rm, num_ppo_epochs=2, num_mini_batches=2)
    recorder = LossRecorder()
    L.seed_everything(0, verbose=False)
    t = trainer(8, [recorder])
    t.fit(m, datamodule=make_data(m.backbone, repeats=m.train_batch_repeats))
    return recorder.losses, t, m


class Rewards(L.Callback):
    def __init__(self):
        self.rewards: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx % pl_module.train_batch_repeats == 0:  # a rollout's first update: one value per batch
            self.rewards.append(float(trainer.callback_metrics["train/reward"]))


def rising_run(model_dir: Path, rm: Path) -> list[float]:
    """Full tuning (lr 3e-2) of the policy, 8 prompts a batch, completions of 8 tokens, the rule reward
    of test_grpo (share of 64 target ids; the reward model at weight 0 still initialises the critic),
    kl_coef 0, temperature 1, 4 PPO epochs of 1 mini-batch, 6 batches (24 optimizer steps): the mean
    reward of each batch (a multiple of 1/64: 64 completion tokens)."""
    m = ppo(model_dir, rm, tuner=Full(lr=3e-2), reward_funcs=[FromImport("test_grpo.target_share")],
            reward_weights=[1.0, 0.0], temperature=1.0, kl_coef=0.0)
    recorder = Rewards()
    L.seed_everything(0, verbose=False)
    trainer(24, [recorder]).fit(m, datamodule=make_data(m.backbone, repeats=4, batch_size=8))
    return recorder.rewards


def compute_pins(tmp_dir: Path) -> dict:
    from ftbench.testing import build_tiny_llama

    model_dir = build_tiny_llama(Path(tmp_dir) / "tiny")
    rm = save_reward_run(model_dir, Path(tmp_dir) / "rm")
    return {"one_update": one_update_run(model_dir, rm), "every_update": every_update_run(model_dir, rm)[0],
            "rise": rising_run(model_dir, rm)}


def test_pinned_losses_one_update_per_batch(tiny_model_dir, reward_run):
    losses = one_update_run(tiny_model_dir, reward_run)
    assert losses == pytest.approx(load_pins(PIN_NAME)["one_update"], abs=1e-6), losses


def test_pinned_losses_of_every_update(tiny_model_dir, reward_run):
    backward, t, m = every_update_run(tiny_model_dir, reward_run)
    assert t.global_step == 8 and len(backward) == 8 and m.train_batch_repeats == 4  # 2 batches x 4 updates
    assert backward == pytest.approx(load_pins(PIN_NAME)["every_update"], abs=1e-6), backward
    logged = {k: float(v) for k, v in t.callback_metrics.items()}
    assert logged["train/loss"] == pytest.approx(backward[-1], abs=1e-6)
    for name in ("objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
                 "objective/scores", "objective/kl_coef", "policy/approxkl_avg", "policy/clipfrac_avg",
                 "policy/entropy_avg", "loss/policy_avg", "loss/value_avg", "val/clipfrac_avg", "val/ratio",
                 "reward", "time/generation_s", "time/optimisation_s"):
        assert f"train/{name}" in logged, name
    assert logged["train/objective/rlhf_reward"] == pytest.approx(
        logged["train/objective/scores"] + logged["train/objective/non_score_reward"], abs=1e-6)
    split = m.step_time_split()
    assert split["generation_s"] > split["reward_s"] > 0 and split["optimisation_s"] > 0


def test_reward_rises_on_a_rule_pinned(tiny_model_dir, reward_run):
    rewards = rising_run(tiny_model_dir, reward_run)
    pinned = load_pins(PIN_NAME)["rise"]
    assert rewards == pytest.approx(pinned, abs=1e-6), rewards
    # per batch 0.172 0.125 | 0.141 0.266 | 0.188 0.375: the first two batches' mean 0.148, the last two's 0.281
    # (how fast it rises depends on where the critic starts: the reward run's random LoRA init, seeded here)
    start, end = sum(rewards[:2]) / 2, sum(rewards[-2:]) / 2
    assert end > start + 0.1


def test_memory_breakdown_counts_the_critic_and_the_reward_model(tiny_model_dir, reward_run):
    from ftbench.bench.memory import weight_breakdown

    m = ppo(tiny_model_dir, reward_run)
    m.configure_model()
    parts = [weight_breakdown(x) for x in (m.model, m.critic, m.reward_model)]
    whole = weight_breakdown(m)
    assert whole["bytes"] == sum(p["bytes"] for p in parts)
    assert whole["trainable_bytes"] == parts[0]["trainable_bytes"] + parts[1]["trainable_bytes"]
    assert parts[1]["trainable_bytes"] > 0 and parts[2]["trainable_bytes"] == 0


# ---------------------------------------------------------------------------- bad settings
def test_bad_settings_name_the_option(tiny_model_dir, reward_run, tmp_path):
    backbone = Backbone(model=str(tiny_model_dir))
    with pytest.raises(ConfigError, match=r"^model.init_args.reward_model: PPO needs a reward model"):
        PPO(backbone=backbone)
    sft = lora()
    sft.save(sft.prepare(backbone.load_model(), backbone), tmp_path / "sft")
    with pytest.raises(ConfigError, match=r"^model.init_args.value_model: .* is a peft adapter of a CAUSAL_LM run, "
                                          r"not of a reward run"):
        PPO(backbone=backbone, reward_model=str(reward_run), value_model=str(tmp_path / "sft"))
    with pytest.raises(ConfigError, match=r"^model.init_args.reward_model: .* is not a folder"):
        PPO(backbone=backbone, reward_model=str(tmp_path / "missing"))
    for option, value, message in [("num_mini_batches", 0, "must be an int >= 1, got 0"),
                                   ("kl_target", -1.0, "must be > 0 (or null: off), got -1.0"),
                                   ("lam", 1.5, "must be in [0, 1], got 1.5"),
                                   ("cliprange", 0.0, "must be > 0, got 0.0")]:
        with pytest.raises(ConfigError, match="^" + re.escape(f"model.init_args.{option}: {message}") + "$"):
            PPO(backbone=backbone, reward_model=str(reward_run), **{option: value})
    with pytest.raises(ConfigError, match=r"^model.init_args.critic_tuner.init_args.lr: the critic trains with"):
        PPO(backbone=backbone, reward_model=str(reward_run), critic_tuner=lora(lr=1e-3))


def cli_argv(tiny_model_dir, config: Path, out: Path, *extra: str) -> list[str]:
    return ["fit", "--backbone.model", str(tiny_model_dir), "--tuner", "configs/tuner/lora.yaml",
            "--model", str(config), "--data", "configs/data/instruction_prompts.yaml",
            "--trainer", "configs/trainer/cpu.yaml", "--data.init_args.builtin_size", "60",
            "--data.init_args.batch_size", "2", "--data.init_args.eval_batch_size", "3",
            "--data.init_args.max_eval_rows", "3", "--trainer.val_check_interval", "4",
            "--trainer.enable_progress_bar", "false", "--out", str(out), *extra]


def shipped_config(reward_run: Path, tmp_path: Path) -> Path:
    content = yaml.safe_load((ROOT / "configs/objective/ppo.yaml").read_text())
    content["init_args"]["reward_model"] = str(reward_run)
    config = tmp_path / "ppo.yaml"
    config.write_text(yaml.safe_dump(content))
    return config


@pytest.mark.parametrize("extra, expected", [
    (("--model.init_args.num_mini_batches", "4", "--trainer.max_steps", "16"),
     "ftbench: error: model.init_args.num_mini_batches: 4 does not divide the batch of 2 completions"),
], ids=["mini_batches"])
def test_a_bad_setting_is_one_line_through_the_cli(tiny_model_dir, reward_run, tmp_path, monkeypatch, capsys,
                                                   extra, expected):
    from ftbench.cli import main

    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        main(cli_argv(tiny_model_dir, shipped_config(reward_run, tmp_path), tmp_path / "runs", *extra))
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ftbench: ")]
    assert lines and lines[0].startswith(expected), lines


def test_shipped_ppo_yaml_runs_with_its_defaults(tiny_model_dir, reward_run, tmp_path, monkeypatch):
    """configs/objective/ppo.yaml (its reward model pointed at a saved one: the value it cannot ship)
    with configs/data/instruction_prompts.yaml: one rollout batch (4 PPO epochs = 4 optimizer steps)
    and a test, through the CLI; the record holds the step split and the metrics."""
    from ftbench.cli import cli_main

    monkeypatch.chdir(ROOT)
    out = tmp_path / "runs"
    cli_main(cli_argv(tiny_model_dir, shipped_config(reward_run, tmp_path), out, "--trainer.max_steps", "4"))
    [path] = out.glob("*.json")
    info = json.loads(path.read_text())["train_info"]
    assert info["status"] == "completed" and info["method"] == "ppo+lora", info.get("error")
    assert info["global_steps"] == 4
    assert set(info["step_time_split"]) == {"generation_s", "optimisation_s", "reward_s"}
    [entry] = info["metrics"]
    for name in ("train/objective/kl", "train/objective/scores", "train/loss/value_avg", "val/accuracy", "val/reward"):
        assert isinstance(entry[name], float), name
    assert isinstance(info["final"]["test/accuracy"], float) and isinstance(info["final"]["test/reward"], float)


# ---------------------------------------------------------------------------- ftbench estimate
def test_estimate_holds_policy_critic_and_reward_model_as_the_run(tiny_model_dir, reward_run):
    """``ftbench estimate`` builds PPO on meta without reading the reward run (the backbone with a score
    head stands for it): the policy with its LoRA (its reference is the policy with the adapter off:
    nothing held), the critic (backbone + score head + its own LoRA, trained beside the policy) and the
    frozen reward model, each the bytes the run holds; the reward run's adapter, which the run keeps
    unmerged on its reward model (LoRA and the score head's trained copy), is what the stand-in leaves out. The gradients are the
    trainable bytes of policy and critic (float32)."""
    from ftbench.bench.memory import weight_breakdown
    from ftbench.estimate import estimate
    from ftbench.estimate.meta import reward_runs_on_meta

    m = ppo(tiny_model_dir, reward_run)
    m.configure_model()
    real = weight_breakdown(m, m.held_models())
    # what peft adds on the reward model, kept unmerged: the LoRA matrices and the score head's trained copy
    reward_adapter = sum(p.numel() * 4 for n, p in m.reward_model.named_parameters()
                         if "lora_" in n or "modules_to_save" in n)
    assert reward_adapter == 65536 + 256
    with reward_runs_on_meta(m.backbone):  # as the CLI reads the config: no reward run needed on disk
        objective = ppo(tiny_model_dir, "no/such/reward/run")
    est = estimate(objective.backbone, objective.tuner, objective, batch_size=2, seq_len=12, precision="32-true")
    assert set(est["weights"]["held"]) == {"critic", "reward_model"}
    assert est["weights"]["held"]["critic"] == real["held"]["critic"]
    assert est["weights"]["held"]["reward_model"] == real["held"]["reward_model"] - reward_adapter
    assert est["weights"]["trainable_bytes"] == real["trainable_bytes"]
    assert est["gradients"]["bytes"] == real["trainable_bytes"]
    assert est["activations"]["bytes"] > 0
