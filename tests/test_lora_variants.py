"""The LoRA variants of configs/tuner/: rsLoRA, PiSSA, OLoRA, LoftQ, EVA (peft's ``use_rslora`` and
``init_lora_weights``; EVA's from the run's training batches) and LoRA+ (peft's ``create_loraplus_optimizer`` through ``Peft.loraplus_lr_ratio``).

Pinned numbers (tests/pins/lora_variants.json, ``python scripts/regen_pins.py lora_variants``): the
trainable count and the 4 training losses of SFT with each shipped config on the tiny Llama (its
optimizer and warm-up as configs/objective/sft.yaml ships them: 5 warm-up steps scale the rate by 0,
0.2, 0.4, 0.6, so the first step leaves the weights where they are). Every variant is LoRA r = 16 on the
14 linear layers of the tiny Llama (tests/test_memory.py's shapes): 16 x (in + out) each, 32,768.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from helpers import tiny_data
from pinning import four_step_losses, load_pins
from test_memory import LAYERS
from test_optimizers import LINEARS, _tiny

PIN_NAME = "lora_variants"
ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ("rslora", "pissa", "olora", "loftq", "loraplus")
LORA16 = LAYERS * 16 * sum(m + n for m, n in LINEARS)
#: EVA's SVD wants r x rho = 32 trained positions in a batch: 8 rows of the tiny data have them, 4 do not
EVA_BATCH = {"eva": {"batch_size": 8}}


def method(name: str, model_dir: Path, out: Path, objective: str = "sft", *extra: str):
    from ftbench.cli import cli_main

    cli = cli_main(["--backbone.model", str(model_dir), "--tuner", str(ROOT / "configs/tuner" / f"{name}.yaml"),
                    "--model", str(ROOT / "configs/objective" / f"{objective}.yaml"), "--evaluate.max_new_tokens", "4",
                    "--data", str(ROOT / "configs/data/instruction.yaml"), "--data.init_args.builtin_size", "80",
                    "--trainer.logger", "false", "--out", str(out), *extra], run=False)
    return cli.model


def compute_pins(tmp_dir: Path) -> dict:
    from ftbench.testing import build_tiny_llama

    path = build_tiny_llama(tmp_dir / "tiny")
    pins = {}
    for name in (*CONFIGS, "eva"):
        m = method(name, path, tmp_dir / "out")
        losses = four_step_losses(m, tiny_data(m.backbone, **EVA_BATCH.get(name, {})))
        pins[name] = {"trainable": m.parameter_counts()["trainable"], "losses": losses}
    return pins


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_variant_count_and_losses(tiny_model_dir, tmp_path, name):
    m = method(name, tiny_model_dir, tmp_path)
    assert m.tuner.name == "lora" and m.method_label == "sft+lora"
    losses = four_step_losses(m, tiny_data(m.backbone))
    pins = load_pins(PIN_NAME)[name]
    assert m.parameter_counts()["trainable"] == pins["trainable"] == LORA16 == 32_768
    assert losses == pytest.approx(pins["losses"], rel=1e-5)
    assert all(math.isfinite(x) for x in losses)


# ---------------------------------------------------------------------- what each changes
def _peft(tiny_model_dir, name: str, out: Path):
    """The shipped tuner (as the CLI builds it) applied by peft to the tiny Llama."""
    from peft import get_peft_model

    tuner = method(name, tiny_model_dir, out).tuner
    model = _tiny(tiny_model_dir)
    return tuner, get_peft_model(model, tuner.resolved_config(model))


def test_rslora_scales_by_alpha_over_sqrt_r(tiny_model_dir, tmp_path):
    _, model = _peft(tiny_model_dir, "rslora", tmp_path)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.scaling["default"] == 32 / math.sqrt(16) == 8.0  # LoRA's alpha / r would be 2.0


@pytest.mark.parametrize("name", ["pissa", "olora"])
def test_residual_inits_keep_the_output_and_rewrite_the_backbone(tiny_model_dir, tmp_path, name):
    """PiSSA and OLoRA move part of each weight into A and B: with the adapter on, the model computes
    what the backbone computes (to float32 rounding); with it off, it does not."""
    tuner, model = _peft(tiny_model_dir, name, tmp_path)
    ids = torch.randint(4, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        backbone = _tiny(tiny_model_dir)(input_ids=ids).logits
        on = model(input_ids=ids).logits
        with model.disable_adapter():
            off = model(input_ids=ids).logits
    assert torch.allclose(on, backbone, atol=1e-5)
    assert (off - backbone).abs().max() > 0.1
    assert tuner.changes_backbone == name


def test_loftq_backbone_holds_the_4bit_round_trip(tiny_model_dir, tmp_path):
    """LoftQ leaves each adapted weight's NF4 round trip Q in the backbone and chooses B A so that
    Q + scaling B A is closer to the loaded weight W than Q alone."""
    _, model = _peft(tiny_model_dir, "loftq", tmp_path)
    w = _tiny(tiny_model_dir).model.layers[0].mlp.up_proj.weight
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    q = layer.base_layer.weight
    ba = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    assert len(torch.unique(q[0])) <= 16 * math.ceil(q.shape[1] / 64)  # 16 NF4 levels x absmax per 64-block
    assert torch.linalg.norm(w - q - ba) < torch.linalg.norm(w - q)


@pytest.mark.parametrize("name", ["pissa", "olora", "loftq"])
def test_reference_objectives_refuse_a_rewritten_backbone(tiny_model_dir, tmp_path, name):
    """DPO's reference policy and GRPO's KL anchor are the adapter switched off, which for these inits
    is not the loaded backbone: refused before any step, in one line."""
    from ftbench.errors import ConfigError

    m = method(name, tiny_model_dir, tmp_path, "dpo", "--data", str(ROOT / "configs/data/preference.yaml"))
    init = name  # the shipped init_lora_weights
    with pytest.raises(ConfigError) as err:
        m.configure_model()
    assert str(err.value) == (
        f"tuner lora: init_lora_weights={init!r} rewrites the backbone's weights (it keeps W - BA, or W's quantized "
        "round trip, in the backbone), so the model with the adapter switched off is not the untouched backbone "
        "that a reference (DPO's reference policy, GRPO's KL anchor) must be")
    assert err.value.hint == "use init_lora_weights: true (or gaussian), or an objective without a reference"


# ---------------------------------------------------------------------- EVA
def test_eva_initialises_from_the_training_batches(tiny_model_dir, tmp_path):
    """EVA (configs/tuner/eva.yaml): before the first step each A matrix holds the top right-singular
    vectors of its layer's inputs on the run's training batches (orthonormal rows), B is zero (so the
    model computes what the backbone does), and the ranks are redistributed by explained variance
    within the budget: 16 per layer on average over the 14 x 2 adapted layers, none above rho x r = 32.
    Then the pinned four steps."""
    m = method("eva", tiny_model_dir, tmp_path, "sft")
    dm = tiny_data(m.backbone, batch_size=8)
    seen: dict = {}

    def at_start(objective):
        batch = next(iter(dm.val_dataloader()))
        ids, mask = batch["input_ids"], batch["attention_mask"]
        with torch.no_grad():
            seen["logits"] = objective(ids, mask).clone()
            seen["backbone"] = objective.backbone.load_model().eval()(input_ids=ids, attention_mask=mask,
                                                                        use_cache=False).logits
        layers = {n: mod for n, mod in objective.model.named_modules() if hasattr(mod, "lora_A") and "default" in mod.lora_A}
        seen["ranks"] = {n: mod.lora_A["default"].weight.shape[0] for n, mod in layers.items()}
        seen["gram"] = [mod.lora_A["default"].weight @ mod.lora_A["default"].weight.T for mod in layers.values()]
        seen["b"] = [mod.lora_B["default"].weight.abs().max().item() for mod in layers.values()]

    losses = four_step_losses(m, dm, after_setup=at_start)
    ranks = seen["ranks"]
    assert len(ranks) == 7 * LAYERS and sum(ranks.values()) == 16 * 7 * LAYERS
    assert max(ranks.values()) <= 32 and len(set(ranks.values())) > 1  # redistributed
    for gram in seen["gram"]:
        assert torch.allclose(gram, torch.eye(gram.shape[0]), atol=1e-5)
    assert seen["b"] == [0.0] * len(ranks)
    assert torch.allclose(seen["logits"], seen["backbone"], atol=1e-5)
    pins = load_pins(PIN_NAME)["eva"]
    assert m.parameter_counts()["trainable"] == pins["trainable"]
    assert losses == pytest.approx(pins["losses"], rel=1e-5)


def test_eva_refuses_batches_too_small_for_its_svd(tiny_model_dir, tmp_path):
    """With 4 rows a batch the tiny data's batches have fewer trained positions than EVA's 32 components:
    peft would skip every one and cycle forever; refused in one line before any step."""
    from ftbench.errors import ConfigError

    m = method("eva", tiny_model_dir, tmp_path)
    with pytest.raises(ConfigError) as err:
        four_step_losses(m, tiny_data(m.backbone, batch_size=4), steps=1)
    assert str(err.value).startswith("tuner lora: EVA's SVD needs at least r x rho = 32 positions in a training "
                                     "batch (peft skips smaller batches and would cycle forever); this run's largest "
                                     "batch has ")
    assert str(err.value).endswith(" trained positions (eva_config.use_label_mask)")
    assert err.value.hint == "use a larger data.batch_size, or eva_config.use_label_mask: false"


def test_eva_estimate_has_uniform_ranks(tiny_model_dir, tmp_path):
    """ftbench estimate (meta, no data) cannot run EVA's SVD: it gives LoRA's uniform r = 16, which the
    run's breakdown equals when rho is 1 (no redistribution); with the shipped rho 2 the run's ranks
    come from the data."""
    from peft import EvaConfig, LoraConfig

    from ftbench.backbone import Backbone
    from ftbench.estimate import estimate
    from ftbench.tuners import Peft
    from test_memory import B, T, adamw, measure

    def tuner():
        return Peft(peft_config=LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                           init_lora_weights="eva", eva_config=EvaConfig(rho=1.0)), lr=2e-4)

    real = measure(tiny_model_dir, tuner(), optimizer=adamw(), steps=2)
    est = estimate(Backbone(model=str(tiny_model_dir)), tuner(), batch_size=B, seq_len=T, precision="32-true",
                   optimizer=adamw())
    for part in ("weights", "gradients"):
        assert est[part] == real[part]
    assert est["optimizer"]["bytes"] == real["optimizer"]["bytes"] == 2 * LORA16 * 4 + 2 * 7 * LAYERS * 4
    assert est["activations"]["bytes"] == real["activations"]["bytes"]


@pytest.mark.parametrize("name", ["rslora", "loraplus", "eva"])
def test_reference_is_the_backbone_exactly_after_training(tiny_model_dir, tmp_path, name):
    m = method(name, tiny_model_dir, tmp_path, "sft", "--model.init_args.warmup_steps", "0")
    dm = tiny_data(m.backbone, **EVA_BATCH.get(name, {}))
    four_step_losses(m, dm, steps=3)
    batch = next(iter(dm.val_dataloader()))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    m.model.eval()
    with torch.no_grad():
        expected = m.backbone.load_model().eval()(input_ids=ids, attention_mask=mask, use_cache=False).logits
        assert not torch.allclose(m(ids, mask), expected)  # trained
        with m.tuner.reference(m.model) as ref:
            assert torch.equal(m(ids, mask, model=ref), expected)


# ---------------------------------------------------------------------- LoRA+
@pytest.mark.parametrize("optim", ["adamw", "adamw8bit", "adafactor"])
def test_loraplus_rates_read_back_from_the_optimizer(tiny_model_dir, tmp_path, optim):
    """B matrices at 16 x the tuner's 2e-4, A matrices at it, through a real fit, with any optimizer."""
    m = method("loraplus", tiny_model_dir, tmp_path, "sft", "--model.init_args.optimizer",
               str(ROOT / "configs/optim" / f"{optim}.yaml"), "--model.init_args.warmup_steps", "0")
    seen: dict = {}

    def read(objective):
        opt = objective.trainer.optimizers[0]
        names = {id(p): n for n, p in objective.model.named_parameters()}
        seen.update({names[id(p)]: g["lr"] for g in opt.param_groups for p in g["params"]})
        seen["class"] = type(opt).__name__

    four_step_losses(m, tiny_data(m.backbone), steps=1, after_setup=read)
    klass = seen.pop("class")
    assert klass == {"adamw": "AdamW", "adamw8bit": "AdamW8bit", "adafactor": "Adafactor"}[optim]
    a = {n: lr for n, lr in seen.items() if "lora_A" in n}
    b = {n: lr for n, lr in seen.items() if "lora_B" in n}
    assert len(a) == len(b) == 7 * LAYERS and len(seen) == 2 * 7 * LAYERS
    assert set(a.values()) == {2e-4} and set(b.values()) == {2e-4 * 16.0}  # peft: lr * loraplus_lr_ratio


def test_loraplus_settings_are_checked():
    from peft import IA3Config, LoraConfig

    from ftbench.errors import ConfigError
    from ftbench.tuners import Peft

    with pytest.raises(ConfigError, match=r"^tuner.loraplus_lr_ratio: LoRA\+ needs tuner.lr \(the A matrices' rate; "
                                          r"B's is 16.0 x it\)$"):
        Peft(peft_config=LoraConfig(r=8), loraplus_lr_ratio=16.0)
    with pytest.raises(ConfigError, match=r"^tuner.loraplus_lr_ratio: must be > 0 \(the paper: 16\), got 0.0$"):
        Peft(peft_config=LoraConfig(r=8), loraplus_lr_ratio=0.0, lr=1e-3)
    with pytest.raises(ConfigError, match=r"^tuner.loraplus_lr_ratio: LoRA\+ sets the rate of LoRA's B matrices; "
                                          r"tuner ia3 has none$"):
        Peft(peft_config=IA3Config(), loraplus_lr_ratio=16.0, lr=1e-3)


# ---------------------------------------------------------------------- ftbench estimate = measured
@pytest.mark.parametrize("name", CONFIGS)
def test_estimate_equals_measured_step(tiny_model_dir, tmp_path, name):
    """Each variant's shipped tuner under SFT with AdamW (LoRA+: its grouping, built as a run builds it):
    the estimate on meta equals the measured breakdown part for part. (On meta every initialisation
    gives LoRA's shapes: there are no values to take an SVD or a quantization of.)"""
    from ftbench.backbone import Backbone
    from ftbench.estimate import estimate
    from test_memory import B, T, adamw, measure

    tuner = method(name, tiny_model_dir, tmp_path).tuner
    real = measure(tiny_model_dir, tuner, optimizer=adamw(), steps=2)
    tuner = method(name, tiny_model_dir, tmp_path).tuner
    est = estimate(Backbone(model=str(tiny_model_dir)), tuner, batch_size=B, seq_len=T, precision="32-true",
                   optimizer=adamw())
    assert est["weights"] == real["weights"]
    assert est["gradients"] == real["gradients"]
    for key in ("bytes", "tensors", "by_dtype", "by_entry", "step_tensors", "step_bytes"):
        assert est["optimizer"][key] == real["optimizer"][key], key
    # AdamW: two float32 moments and a step per A and B matrix
    assert est["optimizer"]["bytes"] == 2 * LORA16 * 4 + 2 * 7 * LAYERS * 4
    assert est["activations"]["bytes"] == real["activations"]["bytes"]
    assert est["largest_transient"]["bytes"] == real["largest_transient"]["bytes"]
