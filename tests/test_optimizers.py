"""The memory-light optimizers of configs/optim/ (ftbench.optimizers; Adafactor is torch's own): what
each keeps, in bytes, from hand arithmetic on the tiny Llama; pinned 4-step losses through the real
training step; the one-line refusals of pairings that cannot work.

The tiny Llama (tests/test_memory.py): V = 512, H = 64, 2 blocks, K = 32 key/value features, MLP width
I = 128, untied head. Its 14 projectable weights (out m x in n) per block: q and o 64 x 64, k and v
32 x 64, gate and up 128 x 64, down 64 x 128; everything else ("rest") is the embedding and the head
(512 x 64 each) and five 64-vectors of RMSNorm (65,856 parameters). GaLore and APOLLO (``proj_type:
std``) project the smaller side: for m >= n the gradient G (m x n) becomes G P^T with P r x n, else
P^T G with P m x r; so each moment is r x max(m, n) and the projector r x min(m, n).

Pinned losses (tests/pins/optimizers.json, ``python scripts/regen_pins.py optimizers``): SFT on the
built-in instruction rows, each shipped optimizer config with the full tuner (lr 5e-5), no warm-up,
rank 8 and a projector refresh every 2 steps (GaLore, APOLLO) and a block switch every 2 steps
(BAdam), so that the 4 steps cross a refresh and a switch.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch

from helpers import tiny_data
from pinning import four_step_losses, load_pins
from test_memory import F32, H, I, K, LAYERS, PARAMS, PER_BLOCK, V, lora_tuner, measure

PIN_NAME = "optimizers"
ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ("galore", "galore8bit", "apollo", "apollo_mini", "badam", "muon", "adafactor")
# the small settings the pins run with (see the module docstring)
SMALL = {"galore": {"rank": 8, "update_proj_gap": 2}, "galore8bit": {"rank": 8, "update_proj_gap": 2},
         "apollo": {"rank": 8, "update_proj_gap": 2}, "apollo_mini": {"update_proj_gap": 2},
         "badam": {"switch_block_every": 2}, "muon": {}, "adafactor": {}}

R = 8
LINEARS = [(H, H), (K, H), (K, H), (H, H), (I, H), (I, H), (H, I)]  # (m, n) per block
REST = 2 * V * H + (2 * LAYERS + 1) * H  # embedding, head, norms: 65,856
MOMENT = LAYERS * sum(max(m, n) for m, n in LINEARS)  # projected moment elements at rank 1: 1,280
SMALL_SIDE = LAYERS * sum(min(m, n) for m, n in LINEARS)  # 768
# galore-torch keeps P as a slice of the SVD's factor (Vh[:r] or U[:, :r]): a view that keeps the
# whole min(m, n) x min(m, n) factor alive in float32 (a bfloat16 weight gets a copy of the slice)
SVD_FACTOR = LAYERS * sum(min(m, n) ** 2 for m, n in LINEARS)  # 45,056


def optimizer(name: str, **kw):
    """The class and settings of configs/optim/<name>.yaml with ``kw`` replacing some."""
    import importlib

    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / "optim" / f"{name}.yaml").read_text())
    module, cls = cfg["class_path"].rsplit(".", 1)
    return functools.partial(getattr(importlib.import_module(module), cls), **{**cfg["init_args"], **kw})


# ---------------------------------------------------------------------- bytes, by hand
EXPECTED = {
    # two float32 moments of r x max(m, n) per projected weight, the projector's SVD factor, Adam's two
    # moments for the rest; galore-torch's step is a Python int
    "galore": {"exp_avg": (R * MOMENT + REST) * F32, "exp_avg_sq": (R * MOMENT + REST) * F32,
               "projector": SVD_FACTOR * F32},
    # bitsandbytes: the projected moments (512 or 1,024 elements) are under min_8bit_size 4,096 and stay
    # float32, as do the norms'; the embedding and head (32,768 each) get two uint8 states and two float32
    # absmax per 256-block; the two 256-entry quantile maps are shared
    "galore8bit": {"state1": R * MOMENT * F32 + (2 * LAYERS + 1) * H * F32 + 2 * V * H,
                   "state2": R * MOMENT * F32 + (2 * LAYERS + 1) * H * F32 + 2 * V * H,
                   "absmax1": 2 * (V * H // 256) * F32, "absmax2": 2 * (V * H // 256) * F32,
                   "qmap1": 256 * F32, "qmap2": 256 * F32, "projector": SVD_FACTOR * F32},
    # APOLLO's projector is its own r x min(m, n) Gaussian; one float32 norm-limiter scalar per weight
    "apollo": {"exp_avg": (R * MOMENT + REST) * F32, "exp_avg_sq": (R * MOMENT + REST) * F32,
               "projector": R * SMALL_SIDE * F32, "scaled_grad": 7 * LAYERS * F32},
    "apollo_mini": {"exp_avg": (MOMENT + REST) * F32, "exp_avg_sq": (MOMENT + REST) * F32,
                    "projector": SMALL_SIDE * F32, "scaled_grad": 7 * LAYERS * F32},
    # the active block (the last layer: 36,864 + 128 parameters in 9 tensors): two moments, the
    # float32 copy BAdam steps, a step per tensor
    "badam": {"exp_avg": PER_BLOCK * F32, "exp_avg_sq": PER_BLOCK * F32, "master_weights": PER_BLOCK * F32,
              "step": 9 * F32},
    # Muon: one m x n momentum per hidden weight; AdamW: two moments and a step for the 7 rest tensors
    "muon": {"momentum_buffer": LAYERS * sum(m * n for m, n in LINEARS) * F32, "exp_avg": REST * F32,
             "exp_avg_sq": REST * F32, "step": 7 * F32},
    # Adafactor: a row (m) and a column (n) second-moment vector per matrix, a full one per vector
    "adafactor": {"row_var": (2 * V + LAYERS * sum(m for m, _ in LINEARS)) * F32,
                  "col_var": (2 * H + LAYERS * sum(n for _, n in LINEARS)) * F32,
                  "variance": (2 * LAYERS + 1) * H * F32, "step": 21 * F32},
}


def test_the_arithmetic():
    assert REST == 65_856 and MOMENT == 1_280 and SMALL_SIDE == 768 and SVD_FACTOR == 45_056
    assert sum(EXPECTED["galore"].values()) == 788_992  # AdamW: 1,116,756
    assert sum(EXPECTED["galore8bit"].values()) == 399_872
    assert sum(EXPECTED["apollo"].values()) == 633_400
    assert sum(EXPECTED["apollo_mini"].values()) == 540_216
    assert sum(EXPECTED["badam"].values()) == 443_940
    assert sum(EXPECTED["muon"].values()) == 821_788
    assert sum(EXPECTED["adafactor"].values()) == 14_164


@pytest.mark.parametrize("name", CONFIGS)
def test_state_bytes_on_the_tiny_model(tiny_model_dir, name):
    from ftbench.tuners import Full

    kw = {"rank": R} if name in ("galore", "galore8bit", "apollo") else {}
    r = measure(tiny_model_dir, Full(), optimizer=optimizer(name, **kw), steps=3)
    opt = r["optimizer"]
    assert opt["by_entry"] == EXPECTED[name]
    assert opt["bytes"] == sum(EXPECTED[name].values())
    # BAdam: only the active block has gradients; every other optimizer: all 139,584 parameters
    assert r["gradients"]["bytes"] == (PER_BLOCK if name == "badam" else PARAMS) * F32
    assert r["predicted_peak_bytes"] == (r["weights"]["bytes"] + r["gradients"]["bytes"] + opt["bytes"]
                                         + r["activations"]["bytes"] + r["activations"]["other_live_bytes"]
                                         + r["largest_transient"]["bytes"])


def test_galore_with_freeze_projects_only_the_trained_block(tiny_model_dir):
    from ftbench.tuners import Freeze

    r = measure(tiny_model_dir, Freeze(trainable_layers=1), optimizer=optimizer("galore", rank=R), steps=3)
    one_block = sum(max(m, n) for m, n in LINEARS)
    assert r["optimizer"]["by_entry"] == {"exp_avg": (R * one_block + 2 * H) * F32,
                                          "exp_avg_sq": (R * one_block + 2 * H) * F32,
                                          "projector": SVD_FACTOR // LAYERS * F32}


def test_badam_breakdown_is_the_largest_block_over_the_timed_steps(tiny_model_dir):
    """Blocks: layer 0, layer 1, and (include_lm_head) everything outside the layers: the embedding, the
    final norm and the head, 65,600 parameters in 3 tensors;
    ascending, switching every 2 steps (BAdam switches after steps 1, 3, ...: global_step + 1 divisible by
    2). Batch 1 and 2 train layer 1, batch 3 the rest; the switch clears the state inside ``step``, so
    the breakdown must keep the largest state seen, not the last or the first."""
    from ftbench.tuners import Full

    bad = optimizer("badam", switch_block_every=2, switch_mode="ascending", include_lm_head=True)
    three = measure(tiny_model_dir, Full(), optimizer=bad, steps=3)
    assert three["optimizer"]["bytes"] == 3 * PER_BLOCK * F32 + 9 * F32  # layer 1, read before step 2
    four = measure(tiny_model_dir, Full(), optimizer=bad, steps=4)
    outside = 2 * V * H + H
    assert four["optimizer"]["by_entry"] == {"exp_avg": outside * F32, "exp_avg_sq": outside * F32,
                                             "master_weights": outside * F32, "step": 3 * F32}
    assert four["optimizer"]["at_batch"] == 3
    assert four["gradients"]["bytes"] == outside * F32


# ---------------------------------------------------------------------- groups and rates
def _named(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest(tiny_model_dir):
    model = _tiny(tiny_model_dir)
    opt = optimizer("muon", lr=0.5)(_named(model))
    muon = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    adamw = {id(p) for g in opt.adamw.param_groups for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[i].split(".")[-2] for i in muon) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] * LAYERS)
    assert {names[i] for i in adamw} == {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                                         *(f"model.layers.{i}.{n}.weight" for i in range(LAYERS)
                                           for n in ("input_layernorm", "post_attention_layernorm"))}
    # one set of groups: a rate set here (the tuner's lr, the schedule) is the rate both step with
    for group in opt.param_groups:
        group["lr"] = 0.25
    assert [g["lr"] for g in opt.muon.param_groups + opt.adamw.param_groups] == [0.25, 0.25]
    assert opt.muon.state is opt.state and opt.adamw.state is opt.state


def test_tuner_lr_replaces_the_optimizer_lr(tiny_model_dir):
    from ftbench.objectives.optim import make_optimizer
    from ftbench.tuners import Full

    model = _tiny(tiny_model_dir)
    opt = make_optimizer(model, Full(lr=3e-4), optimizer("galore", rank=R), "sft+full")
    assert [g["lr"] for g in opt.param_groups] == [3e-4, 3e-4]
    assert [len(g["params"]) for g in opt.param_groups] == [7, 14] and opt.param_groups[1]["rank"] == R


# ---------------------------------------------------------------------- refusals
def test_refusals_name_the_optimizer_and_the_method(tiny_model_dir):
    from peft import get_peft_model

    from ftbench.errors import ConfigError
    from ftbench.objectives.optim import make_optimizer

    tuner = lora_tuner()
    model = get_peft_model(_tiny(tiny_model_dir), tuner.peft_config)
    with pytest.raises(ConfigError) as err:
        make_optimizer(model, tuner, optimizer("badam"), "sft+lora")
    assert str(err.value) == ("model.init_args.optimizer: BAdam cannot train sft+lora: it updates the backbone's own "
                              "weights one block at a time, and LoRA leaves them frozen (LoRA adapters are the "
                              "trainable parameters here)")
    assert err.value.hint == "use tuner full or freeze"
    for name, cls in (("galore", "GaLoreAdamW"), ("galore8bit", "GaLoreAdamW8bit"), ("apollo", "APOLLOAdamW")):
        with pytest.raises(ConfigError) as err:
            make_optimizer(model, tuner, optimizer(name), "sft+lora+nf4")
        assert str(err.value) == (
            f"model.init_args.optimizer: {cls} cannot train sft+lora+nf4: it projects the gradients of the 2-D "
            "weights of ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'], and none of "
            "them trains here")


def test_galore_on_a_4bit_backbone_is_refused(tiny_model_dir):
    """QLoRA's backbone: its quantized weights cannot train, so nothing GaLore projects trains."""
    from ftbench.backbone import Backbone
    from ftbench.errors import ConfigError
    from ftbench.objectives import SFT
    from ftbench.objectives.optim import make_optimizer

    bb = Backbone(model=str(tiny_model_dir), quantization="nf4")
    m = SFT(backbone=bb, tuner=lora_tuner(), optimizer=optimizer("galore"))
    m.configure_model()
    with pytest.raises(ConfigError, match=r"^model.init_args.optimizer: GaLoreAdamW cannot train sft\+lora\+nf4: "
                                          r"it projects the gradients of the 2-D weights of"):
        make_optimizer(m.model, m.tuner, m.optimizer_factory, m.method_label)


def test_loraplus_groups_are_unnamed_for_name_based_optimizers(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    from ftbench.errors import ConfigError
    from ftbench.objectives.optim import make_optimizer
    from ftbench.tuners import Peft

    tuner = Peft(peft_config=LoraConfig(r=8, target_modules="all-linear"), loraplus_lr_ratio=16.0, lr=1e-3)
    model = get_peft_model(_tiny(tiny_model_dir), tuner.peft_config)
    with pytest.raises(ConfigError, match=r"^model.init_args.optimizer: MuonWithAdamW cannot train sft\+lora: it "
                                          r"chooses its parameter groups by parameter name"):
        make_optimizer(model, tuner, optimizer("muon"), "sft+lora")


def test_optimizer_settings_are_checked(tiny_model_dir):
    from ftbench.errors import ConfigError

    named = _named(_tiny(tiny_model_dir))
    with pytest.raises(ConfigError, match=r"^model.init_args.optimizer.init_args.rank: GaLoreAdamW needs rank >= 1, got 0$"):
        optimizer("galore", rank=0)(named)
    with pytest.raises(ConfigError, match=r"^model.init_args.optimizer.init_args.switch_block_every: must be >= 1, got 0$"):
        optimizer("badam", switch_block_every=0)(named)
    with pytest.raises(ConfigError, match=r"^model.init_args.optimizer.init_args.start_block: 5 is not one of BAdam's "
                                          r"2 blocks \(0 to 1\)$"):
        optimizer("badam", start_block=5)(named)


def test_a_missing_package_is_one_line(tiny_model_dir, monkeypatch):
    """Without the extra the class path still imports (the config parses); making it says what to install."""
    import ftbench.optimizers.apollo as apollo
    import ftbench.optimizers.badam as badam
    import ftbench.optimizers.galore as galore
    from ftbench.errors import ConfigError

    named = _named(_tiny(tiny_model_dir))
    for module, attr, name, cls, package in ((galore, "galore_torch", "galore", "GaLoreAdamW", "galore-torch"),
                                             (galore, "galore_torch", "galore8bit", "GaLoreAdamW8bit", "galore-torch"),
                                             (apollo, "apollo_torch", "apollo", "APOLLOAdamW", "apollo-torch"),
                                             (badam, "badam", "badam", "BAdam", "badam")):
        monkeypatch.setattr(module, attr, None)
        with pytest.raises(ConfigError) as err:
            optimizer(name)(named)
        assert str(err.value) == (f"model.init_args.optimizer: {cls} needs the {package} package: "
                                  "pip install 'ftbench[optim]'")
        monkeypatch.undo()


# ---------------------------------------------------------------------- pinned losses
def method(name: str, model_dir: Path, out: Path, tuner: str = "full", objective: str = "sft"):
    """The objective with a shipped optimizer config and tuner as the CLI builds them, small settings."""
    from ftbench.cli import cli_main

    small = [a for k, v in SMALL[name].items() for a in (f"--model.init_args.optimizer.init_args.{k}", str(v))]
    cli = cli_main(["--backbone.model", str(model_dir), "--tuner", str(ROOT / "configs/tuner" / f"{tuner}.yaml"),
                    "--model", str(ROOT / "configs/objective" / f"{objective}.yaml"),
                    "--model.init_args.optimizer", str(ROOT / "configs/optim" / f"{name}.yaml"), *small,
                    "--model.init_args.warmup_steps", "0", "--evaluate.max_new_tokens", "4",
                    "--data", str(ROOT / "configs/data/instruction.yaml"), "--data.init_args.builtin_size", "80",
                    "--trainer.logger", "false", "--out", str(out)], run=False)
    return cli.model


def compute_pins(tmp_dir: Path) -> dict:
    from ftbench.testing import build_tiny_llama

    path = build_tiny_llama(tmp_dir / "tiny")
    return {name: {"losses": four_step_losses(m := method(name, path, tmp_dir / "out"), tiny_data(m.backbone))}
            for name in CONFIGS}


@pytest.mark.parametrize("name", CONFIGS)
def test_four_step_losses(tiny_model_dir, tmp_path, name):
    m = method(name, tiny_model_dir, tmp_path)
    before = {n: p.detach().clone() for n, p in m.backbone.load_model().named_parameters()}
    losses = four_step_losses(m, tiny_data(m.backbone))
    assert losses == pytest.approx(load_pins(PIN_NAME)[name]["losses"], rel=1e-5)
    assert losses[0] == pytest.approx(6.189811, abs=1e-6)  # the same first batch and weights for every optimizer
    moved = [n for n, p in m.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    if name == "badam":  # layer 1 for steps 1, then layer 0 (descending, switching after step 1 and 3)
        assert moved and all(".layers." in n for n in moved)
    else:
        assert len(moved) == 21
    assert all(math.isfinite(x) for x in losses)


# ---------------------------------------------------------------------- every objective
def _objective(kind: str, model_dir: Path, tuner, factory):
    from ftbench.backbone import Backbone
    from ftbench.objectives import DPO, GRPO, Reward

    bb = Backbone(model=str(model_dir))
    if kind == "reward":
        from helpers import preference_data

        return Reward(backbone=bb, tuner=tuner, optimizer=factory, warmup_steps=0), preference_data(bb)
    if kind == "dpo":
        from helpers import preference_data

        return DPO(backbone=bb, tuner=tuner, optimizer=factory, warmup_steps=0), preference_data(bb)
    from ftbench.data import InstructionData

    m = GRPO(backbone=bb, tuner=tuner, optimizer=factory, warmup_steps=0, num_generations=2,
             max_completion_length=4, reward_funcs=[lambda prompts, completions, **kw: [float(i % 2) for i in range(len(completions))]])
    return m, InstructionData(backbone=bb, source="builtin:instruction", builtin_size=40, batch_size=2, max_length=96,
                              val_fraction=0.1, test_fraction=0.1, seed=0, prompt_batches=True, eval_batch_size=4)


@pytest.mark.parametrize("kind", ["reward", "dpo", "grpo"])
@pytest.mark.parametrize("name", CONFIGS)
def test_every_objective_trains_full_and_freeze(tiny_model_dir, name, kind):
    """Two steps of each objective with the full tuner (and, for DPO, freeze): finite losses, and the
    weights the optimizer is given move (BAdam: its active block; a reward model's new score head
    under BAdam too, which is always active)."""
    from ftbench.tuners import Freeze, Full

    kw = {"rank": R} if name in ("galore", "galore8bit", "apollo") else {}
    tuners = [Full(lr=1e-3)] + ([Freeze(trainable_layers=1, lr=1e-3)] if kind == "dpo" else [])
    for tuner in tuners:
        m, dm = _objective(kind, tiny_model_dir, tuner, optimizer(name, **kw))
        before: dict = {}
        losses = four_step_losses(m, dm, steps=2, after_setup=lambda o: before.update(
            {n: p.detach().clone() for n, p in o.model.named_parameters() if p.requires_grad}))
        assert all(math.isfinite(x) for x in losses)
        moved = [n for n, p in m.model.named_parameters() if n in before and not torch.equal(p.detach(), before[n])]
        assert moved, (kind, type(tuner).__name__)
        if kind == "reward":
            assert "score.weight" in moved


# ---------------------------------------------------------------------- ftbench estimate = measured
@pytest.mark.parametrize("name", CONFIGS)
def test_estimate_equals_measured_step(tiny_model_dir, name):
    """On the meta device the estimate builds the optimizer as a run does (named parameters, BAdam's
    first block) and steps it: every part equals the measured breakdown, the optimizer entry by entry."""
    from ftbench.backbone import Backbone
    from ftbench.estimate import estimate
    from ftbench.tuners import Full
    from test_memory import B, T

    factory = optimizer(name, **({"rank": R} if name in ("galore", "galore8bit", "apollo") else {}))
    real = measure(tiny_model_dir, Full(), optimizer=factory, steps=3)
    est = estimate(Backbone(model=str(tiny_model_dir)), Full(), batch_size=B, seq_len=T, precision="32-true",
                   optimizer=factory)
    assert est["weights"] == real["weights"]
    assert est["gradients"] == real["gradients"]
    for key in ("bytes", "tensors", "by_dtype", "by_entry", "step_tensors", "step_bytes"):
        assert est["optimizer"][key] == real["optimizer"][key], key
    assert est["optimizer"]["by_entry"] == EXPECTED[name]
    assert est["activations"]["bytes"] == real["activations"]["bytes"]
    assert est["largest_transient"]["bytes"] == real["largest_transient"]["bytes"]


def test_estimate_of_badam_is_its_largest_block(tiny_model_dir):
    """Blocks of different sizes (include_lm_head): the estimate steps through every block, as a run's
    breakdown keeps the largest over its timed steps (4 steps here reach the last block)."""
    from ftbench.backbone import Backbone
    from ftbench.estimate import estimate
    from ftbench.tuners import Full
    from test_memory import B, T

    bad = optimizer("badam", switch_block_every=2, switch_mode="ascending", include_lm_head=True)
    real = measure(tiny_model_dir, Full(), optimizer=bad, steps=4)
    est = estimate(Backbone(model=str(tiny_model_dir)), Full(), batch_size=B, seq_len=T, precision="32-true",
                   optimizer=bad)
    assert est["optimizer"]["by_entry"] == real["optimizer"]["by_entry"]
    assert est["optimizer"]["bytes"] == 3 * (2 * V * H + H) * F32 + 3 * F32
    assert est["gradients"]["bytes"] == real["gradients"]["bytes"] == (2 * V * H + H) * F32
