"""The reward-model objective on the tiny Llama: one concatenated forward gives the scores of separate
forwards at each row's last real token, the loss is ``reward_loss`` (margin column, centring term),
evaluation metrics over the whole set (min/max are the set's extremes), the score head saved under
LoRA, adapters, freeze and full, and pairwise accuracy on the easy built-in pairs going from chance to
above 0.9 in a short seeded run (pinned)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from ftbench.backbone import Backbone, last_token_scores, score_module
from ftbench.objectives import Reward
from ftbench.objectives.losses import reward_loss
from ftbench.tuners import Adapters, Freeze, Full
from helpers import cpu_trainer, lora, preference_data
from pinning import load_pins


TUNERS = {"lora": lambda: lora(lr=1e-3), "adapters": lambda: Adapters(bottleneck_size=8, lr=1e-3), "full": lambda: Full(lr=1e-3),
          "freeze": lambda: Freeze(lr=1e-3)}


def make_reward(model_dir, tuner: str = "lora", **kw) -> Reward:
    kw.setdefault("warmup_steps", 0)
    kw.setdefault("lr_scheduler", "constant")
    return Reward(backbone=Backbone(model=str(model_dir)), tuner=TUNERS[tuner](), **kw)


def trainer(max_steps: int, **kw) -> L.Trainer:
    """Validation on every batch unless told otherwise (the reward model's pairwise accuracy is its metric)."""
    return cpu_trainer(max_steps, **{"limit_val_batches": 1.0, **kw})


def batch_of(method: Reward, split: str = "train", **kw) -> dict:
    dm = preference_data(method.backbone, **kw)
    dm.setup("fit")
    return next(iter(dm.train_dataloader() if split == "train" else dm.val_dataloader()))


# ---------------------------------------------------------------------------- scores and loss
def test_one_forward_gives_the_scores_of_separate_forwards(tiny_model_dir):
    method = make_reward(tiny_model_dir, "full")
    method.configure_model()
    method.model.eval()
    batch = batch_of(method)
    # chosen (capitals) and rejected (lower case) have different lengths: one side is padded more
    assert not torch.equal(batch["chosen_attention_mask"].sum(1), batch["rejected_attention_mask"].sum(1))
    with torch.no_grad():
        chosen, rejected, cat = method.scores(batch)
        alone_c = last_token_scores(method.model, batch["chosen_input_ids"], batch["chosen_attention_mask"])
        alone_r = last_token_scores(method.model, batch["rejected_input_ids"], batch["rejected_attention_mask"])
    assert cat["input_ids"].shape[0] == 2 * chosen.shape[0]
    assert torch.allclose(chosen, alone_c, atol=1e-5) and torch.allclose(rejected, alone_r, atol=1e-5)


@pytest.mark.parametrize("margin, center", [(None, None), ([0.5, 0.0, 1.0, -0.25], 0.01)])
def test_training_loss_is_reward_loss(tiny_model_dir, margin, center):
    method = make_reward(tiny_model_dir, "lora", center_rewards_coefficient=center)
    method.configure_model()
    method.model.eval()
    batch = batch_of(method)
    if margin is not None:
        batch["margin"] = torch.tensor(margin)
    with torch.no_grad():
        chosen, rejected, _ = method.scores(batch)
        out = method.training_step(batch, 0)
    want = reward_loss(chosen, rejected, None if margin is None else torch.tensor(margin), center)
    assert float(out["loss"]) == pytest.approx(float(want), abs=1e-6)
    assert out["trained_tokens"] == batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum()
    if margin is not None:  # the margin and the centring term change the loss
        assert float(want) != pytest.approx(float(reward_loss(chosen, rejected)), abs=1e-4)


def test_bad_center_coefficient():
    with pytest.raises(ValueError) as e:
        Reward(center_rewards_coefficient=-0.1)
    assert str(e.value) == "objective reward: center_rewards_coefficient must be >= 0, got -0.1"


def test_evaluation_metrics_are_over_the_whole_set(tiny_model_dir):
    """Batches of 3 pairs: the means are over all 8 pairs, min/max the set's extremes (not batch means)."""
    method = make_reward(tiny_model_dir, "lora")
    dm = preference_data(method.backbone, eval_batch_size=3)
    t = trainer(1)
    t.validate(method, datamodule=dm, verbose=False)
    got = {k: float(v) for k, v in t.callback_metrics.items()}
    chosen, rejected = [], []
    with torch.no_grad():
        for batch in dm.val_dataloader():
            c, r, _ = method.scores(batch)
            chosen.append(c)
            rejected.append(r)
    c, r = torch.cat(chosen), torch.cat(rejected)
    both = torch.cat([c, r])
    assert c.shape == (8,)
    want = {"accuracy": (c > r).float().mean(), "pairwise_accuracy": (c > r).float().mean(), "margin": (c - r).mean(),
            "mean_reward": both.mean(), "min_reward": both.min(), "max_reward": both.max(),
            "loss": reward_loss(c, r)}
    for name, value in want.items():
        assert got[f"val/{name}"] == pytest.approx(float(value), abs=1e-6), name
        assert got[f"val/capitals/{name}"] == pytest.approx(float(value), abs=1e-6), name


def test_estimate_steps_the_reward_model_on_pairs(tiny_model_dir):
    """``ftbench estimate`` (the meta device) steps the reward model on its ``memory_batch`` (pairs)."""
    from ftbench.estimate import estimate

    backbone = Backbone(model=str(tiny_model_dir))
    method = Reward(backbone=backbone, tuner=Full())
    one = estimate(backbone, method.tuner, method, batch_size=1, seq_len=16, precision="32-true")
    two = estimate(backbone, method.tuner, method, batch_size=2, seq_len=16, precision="32-true")
    # the score head replaces the LM head: 139,584 - 512 x 64 + 64 parameters, all trained
    assert one["params"] == {"trainable": 106_880, "total": 106_880}
    assert one["gradients"]["bytes"] == 4 * 106_880
    assert 0 < one["activations"]["bytes"] < two["activations"]["bytes"]


# ---------------------------------------------------------------------------- saving the head
def _saved_tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in path.rglob("*.safetensors"):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("name", ["lora", "adapters", "freeze", "full"])
def test_score_head_is_saved_with_what_the_tuner_trained(tiny_model_dir, tmp_path, name):
    L.seed_everything(0, verbose=False)
    method = make_reward(tiny_model_dir, name)
    method.configure_model()
    [initial] = [p.detach().clone() for p in score_module(method.model).parameters() if p.requires_grad]
    trainer(2, limit_val_batches=0).fit(method, datamodule=preference_data(method.backbone))
    # peft wraps the head: a frozen original and the trained copy it saves (modules_to_save)
    [weight] = [p for n, p in score_module(method.model).named_parameters() if p.requires_grad]
    assert weight.shape == (1, 64)
    saved = _saved_tensors(method.save_trained(tmp_path / name))
    scores = {k: v for k, v in saved.items() if "score" in k}
    assert len(scores) == 1, sorted(saved)
    assert torch.equal(next(iter(scores.values())), weight.detach())
    assert not torch.equal(weight.detach(), initial)  # the head trained


# ---------------------------------------------------------------------------- learning the easy pairs
# LoRA r=8 (+ the score head), lr 1e-3, 12 steps of 4 pairs on builtin:capitals (capital letters
# preferred); pairwise accuracy on its 24 held-out pairs. Before training the new head scores every
# sequence near 0 (margin 0.004, loss ~ log 2): 17 of 24 pairs right is a coin's luck with tiny margins.
PIN_NAME = "reward"


def easy_pairs_run(model_dir) -> tuple[dict, dict]:
    """The validation metrics before and after 12 steps on the easy pairs."""
    method = make_reward(model_dir, "lora")
    dm = preference_data(method.backbone, builtin_size=96, val_fraction=0.25)
    L.seed_everything(0, verbose=False)
    t = trainer(12, val_check_interval=12)
    t.validate(method, datamodule=dm, verbose=False)
    before = {k: float(v) for k, v in t.callback_metrics.items()}
    t.fit(method, datamodule=dm)
    after = {k: float(v) for k, v in t.callback_metrics.items()}
    return before, after


def compute_pins(tmp_dir: Path) -> dict:
    from ftbench.testing import build_tiny_llama

    before, after = easy_pairs_run(build_tiny_llama(Path(tmp_dir) / "tiny"))
    return {"start": before["val/accuracy"], "end": after["val/accuracy"], "end_margin": after["val/margin"],
            "end_loss": after["val/loss"]}


def test_pairwise_accuracy_rises_above_0_9_on_the_easy_pairs(tiny_model_dir):
    pins = load_pins(PIN_NAME)
    before, after = easy_pairs_run(tiny_model_dir)
    assert pins["start"] == pytest.approx(17 / 24, abs=1e-6)
    assert before["val/accuracy"] == pytest.approx(pins["start"], abs=1e-6)
    assert abs(before["val/margin"]) < 0.01 and before["val/loss"] == pytest.approx(0.6931, abs=0.01)
    assert after["val/accuracy"] == pytest.approx(pins["end"], abs=1e-6) and after["val/accuracy"] > 0.9
    assert after["val/margin"] == pytest.approx(pins["end_margin"], abs=1e-4)
    assert after["val/loss"] == pytest.approx(pins["end_loss"], abs=1e-4)
    for key in ("train/loss", "train/accuracy", "train/margin", "train/mean_reward", "train/min_reward",
                "train/max_reward"):
        assert key in after, key
