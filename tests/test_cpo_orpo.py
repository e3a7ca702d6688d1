"""CPO / SimPO / AlphaPO and ORPO on the tiny Llama: the objective's loss is the pure loss function on
the model's per-token log-probs, ORPO's NLL runs over the chosen prompt AND completion tokens (every
attended token but the first; ``nll_on_prompt: false`` the completion only), neither holds a reference
model (no frozen copy under full tuning, the estimate counts one set of weights), pinned losses of 4
seeded fp32 steps through the real training step, the shipped YAMLs run through the CLI, and a bad
setting is one line through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pinning import four_step_losses, load_pins

from ftbench.backbone import Backbone
from ftbench.objectives import CPO, ORPO
from ftbench.objectives.losses import cpo_loss, orpo_loss, token_logps
from ftbench.tuners import Full, Peft
from helpers import lora, preference_data

ROOT = Path(__file__).resolve().parent.parent


def lora_1e3() -> Peft:
    return lora(lr=1e-3)


def make(cls, model_dir, tuner=lora_1e3, **kw):
    kw.setdefault("warmup_steps", 0)
    kw.setdefault("lr_scheduler", "constant")
    return cls(backbone=Backbone(model=str(model_dir)), tuner=tuner(), **kw)


def first_batch(backbone: Backbone) -> dict:
    dm = preference_data(backbone)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


# ---------------------------------------------------------------------------- the loss on the model
def test_cpo_loss_is_the_pure_function_on_the_completion_tokens(tiny_model_dir):
    method = make(CPO, tiny_model_dir, loss_type="simpo", beta=2.0, simpo_gamma=1.0, cpo_alpha=0.5)
    method.configure_model()
    batch = first_batch(method.backbone)
    out = method.training_loss(batch)
    with torch.no_grad():
        sides = {}
        for side in ("chosen", "rejected"):
            logits = method(batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"])
            sides[side] = token_logps(logits, batch[f"{side}_labels"])
    want, _, metrics = cpo_loss(*sides["chosen"], *sides["rejected"], beta=2.0, loss_type="simpo", simpo_gamma=1.0,
                                cpo_alpha=0.5)
    assert float(out.loss) == pytest.approx(float(want), abs=1e-5)
    got = out.metrics()
    assert set(got) == {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                        "logps/rejected", "nll_loss"}
    assert float(got["nll_loss"]) == pytest.approx(float(metrics["nll_loss"]), abs=1e-5)
    assert int(out.trained_tokens) == int((batch["chosen_labels"][:, 1:] != -100).sum()
                                          + (batch["rejected_labels"][:, 1:] != -100).sum())


def nll_by_hand(method, batch, on_prompt: bool) -> float:
    """Minus the mean log-prob of the chosen sequence's tokens: every attended token but the first
    (prompt and completion), or the completion tokens only."""
    with torch.no_grad():
        logits = method(batch["chosen_input_ids"], batch["chosen_attention_mask"]).double()
    logp = torch.log_softmax(logits[:, :-1], -1)
    ids = batch["chosen_input_ids"][:, 1:]
    keep = batch["chosen_attention_mask"][:, 1:].bool() if on_prompt else batch["chosen_labels"][:, 1:] != -100
    picked = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)[keep]
    return float(-picked.mean())


def test_orpo_nll_runs_over_the_prompt_and_the_completion(tiny_model_dir):
    method = make(ORPO, tiny_model_dir, beta=0.1)
    method.configure_model()
    batch = first_batch(method.backbone)
    prompt_tokens = int(batch["chosen_attention_mask"][:, 1:].sum() - (batch["chosen_labels"][:, 1:] != -100).sum())
    assert prompt_tokens > 0
    out = method.training_loss(batch)
    m = out.metrics()
    assert float(m["nll_loss"]) == pytest.approx(nll_by_hand(method, batch, on_prompt=True), abs=1e-5)
    assert float(m["nll_loss"]) != pytest.approx(nll_by_hand(method, batch, on_prompt=False), abs=1e-3)
    # the loss: NLL - mean(beta logsig(log_odds)) on the completions' per-token means
    with torch.no_grad():
        c = token_logps(method(batch["chosen_input_ids"], batch["chosen_attention_mask"]), batch["chosen_labels"])
        r = token_logps(method(batch["rejected_input_ids"], batch["rejected_attention_mask"]), batch["rejected_labels"])
    _, losses, want = orpo_loss(*c, *r, beta=0.1)
    assert float(out.loss) == pytest.approx(float(m["nll_loss"]) - float(losses.mean()), abs=1e-5)
    assert float(m["log_odds_chosen"]) == pytest.approx(float(want["log_odds_chosen"]), abs=1e-5)
    assert set(m) == {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                      "logps/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen"}
    # trained tokens: both completions and the chosen prompt tokens, each once
    completions = int((batch["chosen_labels"][:, 1:] != -100).sum() + (batch["rejected_labels"][:, 1:] != -100).sum())
    assert int(out.trained_tokens) == completions + prompt_tokens

    paper = make(ORPO, tiny_model_dir, beta=0.1, nll_on_prompt=False)
    paper.configure_model()
    paper.model.load_state_dict(method.model.state_dict())
    m2 = paper.training_loss(batch).metrics()
    assert float(m2["nll_loss"]) == pytest.approx(nll_by_hand(paper, batch, on_prompt=False), abs=1e-5)


def test_no_reference_model_is_held(tiny_model_dir):
    from ftbench.estimate import estimate

    for cls in (CPO, ORPO):
        method = make(cls, tiny_model_dir, tuner=lambda: Full(lr=1e-3))
        method.configure_model()
        assert not method.needs_reference and method.tuner._reference is None
        assert not hasattr(method, "reference_model") or method.reference_model is None
        backbone = Backbone(model=str(tiny_model_dir))
        fresh = cls(backbone=backbone, tuner=Full(lr=1e-3))
        parts = estimate(backbone, fresh.tuner, fresh, batch_size=2, seq_len=16, precision="32-true")
        # one model: 139,584 float32 parameters + the rotary buffers (as DPO with a precomputed reference)
        assert parts["weights"]["bytes"] == 4 * 139_584 + 2 * 4 * 8


# ---------------------------------------------------------------------------- pinned losses
# 4 seeded fp32 steps, LoRA r=8 (lr 1e-3) on builtin:capitals, 4 pairs a batch. CPO's loss is large: its
# sigmoid term reads SUMMED log-probs and its NLL (weight 1) is the random backbone's (about ln 512 = 6.2 per token).
PIN_NAME = "cpo_orpo"
SETTINGS = {
    "cpo": (CPO, {}),
    "simpo": (CPO, {"loss_type": "simpo", "beta": 2.0, "simpo_gamma": 1.0, "cpo_alpha": 0.0}),
    "alphapo": (CPO, {"loss_type": "alphapo", "beta": 2.0, "simpo_gamma": 1.0, "cpo_alpha": 0.0, "alpha": 0.25}),
    "orpo": (ORPO, {}),
}


def pinned_run(model_dir, name: str) -> list[float]:
    cls, kw = SETTINGS[name]
    method = make(cls, model_dir, **kw)
    return four_step_losses(method, preference_data(method.backbone))


def compute_pins(tmp_dir: Path) -> dict:
    from ftbench.testing import build_tiny_llama

    model_dir = build_tiny_llama(Path(tmp_dir) / "tiny")
    return {name: pinned_run(model_dir, name) for name in SETTINGS}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_pinned_four_step_losses(tiny_model_dir, name):
    assert pinned_run(tiny_model_dir, name) == pytest.approx(load_pins(PIN_NAME)[name], abs=1e-5)


# ---------------------------------------------------------------------------- CLI
def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "FTBENCH_TRACEBACK"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env


def cli(tiny: Path, out: Path, objective: str, *extra: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "ftbench.cli", "fit", "--backbone.model", str(tiny), "--tuner",
            "configs/tuner/lora.yaml", "--model", f"configs/objective/{objective}.yaml", "--data",
            "configs/data/preference_easy.yaml", "--trainer", "configs/trainer/cpu.yaml", "--trainer.max_steps", "2",
            "--trainer.val_check_interval", "2", "--data.init_args.builtin_size", "40", "--data.init_args.eval_batch_size",
            "8", "--trainer.enable_progress_bar", "false", "--evaluate.max_new_tokens", "2", "--test_after_fit", "false",
            "--out", str(out), *extra]
    return subprocess.run(argv, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)


def one_line(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr + res.stdout
    lines = [line for line in res.stderr.splitlines() if line.startswith("ftbench: ")]
    assert len(lines) == 1 or (len(lines) == 2 and lines[1].startswith("ftbench: hint: ")), res.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("objective, option, value, expected", [
    ("cpo", "beta", "0", "ftbench: error: model.init_args.beta: must be a positive finite number, got 0.0"),
    ("simpo", "label_smoothing", "0.7", "ftbench: error: model.init_args.label_smoothing: must be in [0, 0.5] for "
                                        "loss_type 'simpo', got 0.7"),
    ("cpo", "cpo_alpha", "-1", "ftbench: error: model.init_args.cpo_alpha: must be >= 0, got -1.0"),
    ("orpo", "beta", "-0.1", "ftbench: error: model.init_args.beta: must be a positive finite number, got -0.1"),
])
def test_a_bad_setting_is_one_line(tiny_model_dir, tmp_path, objective, option, value, expected):
    assert one_line(cli(tiny_model_dir, tmp_path, objective, f"--model.init_args.{option}", value)) == expected


@pytest.mark.parametrize("objective", ["simpo", "alphapo", "orpo"])
def test_shipped_yaml_runs_with_its_defaults(tiny_model_dir, tmp_path, objective):
    res = cli(tiny_model_dir, tmp_path, objective)
    assert res.returncode == 0, res.stderr[-3000:]
    [path] = list(tmp_path.glob("*.json"))
    info = json.loads(path.read_text())["train_info"]
    name = "orpo" if objective == "orpo" else "cpo"
    assert info["status"] == "completed" and info["method"] == f"{name}+lora" and info["global_steps"] == 2
    for key in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "nll_loss", "pairwise_accuracy"):
        assert isinstance(info["final"][f"val/{key}"], float), key
    if objective == "orpo":
        assert isinstance(info["final"]["val/log_odds_ratio"], float)
