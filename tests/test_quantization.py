"""Quantized backbones (QLoRA 4-bit NF4/FP4 and 8-bit) through bitsandbytes, on the tiny Llama.

Pinned numbers (tests/pins/quantization.json, ``python scripts/regen_pins.py quantization``): LoRA's
trainable-parameter count and the training losses of a 4-step fp32 Lightning fit (tests/pinning.py;
constant lr 1e-2, no warm-up) on the unquantized, NF4, FP4 and int8 backbones, and
the bytes of the backbone's weights in each format. The 4-bit and 8-bit kernels of bitsandbytes on CPU
are deterministic (dequantize-then-matmul in float32; int8 rows are scaled in float16), so the pins,
written by another process, are compared with the fp32 tolerance (rel 1e-4).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from ftbench.evaluation.evaluator import Evaluator
from ftbench.evaluation.options import EvaluationOptions
from helpers import lora as lora_tuner, tiny_data
from pinning import four_step_losses, load_pins

PIN_NAME = "quantization"
ROOT = Path(__file__).resolve().parent.parent
QUANTS = ("none", "nf4", "fp4", "int8")
SHIPPED = sorted(ROOT.glob("configs/backbone/*nf4*.yaml")) + sorted(ROOT.glob("configs/backbone/*fp4*.yaml")) \
    + sorted(ROOT.glob("configs/backbone/*int8*.yaml")) \
    + [ROOT / "configs/optim" / n for n in ("adamw8bit.yaml", "paged_adamw8bit.yaml")]
SFT_YAML = ROOT / "configs/objective/sft.yaml"
LORA_YAML = ROOT / "configs/tuner/lora.yaml"
REL = 1e-4


# ---------------------------------------------------------------------- helpers
def adamw(lr: float = 1e-2):
    # weight_decay 0: a parameter with no gradient must not move (the no-silent-training check relies on it)
    return functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.0)


def lora(backbone, r: int = 4, optimizer=None):
    """SFT with LoRA r on every linear but the head (alpha 2r, no dropout): QLoRA on a quantized backbone."""
    from ftbench.objectives import SFT

    return SFT(backbone=backbone, tuner=lora_tuner(r), optimizer=optimizer or adamw(), evaluator=Evaluator(EvaluationOptions(max_new_tokens=4)))


def trainable(objective) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in objective.model.named_parameters() if p.requires_grad}


def fit_after_validation(objective, dm, steps: int = 2) -> tuple[dict, dict]:
    """Validate (eval mode, no grad), then fit ``steps`` steps after a sanity check (also eval, no
    grad): the forwards that repack 4-bit weights on AVX512-BF16 CPUs. Returns trainable parameters
    before and after."""
    import lightning as L

    torch.manual_seed(0)
    objective.configure_model()
    before = trainable(objective)
    kw = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=1)
    L.Trainer(**kw).validate(objective, datamodule=dm, verbose=False)
    L.Trainer(max_steps=steps, num_sanity_val_steps=1, **kw).fit(objective, datamodule=dm)
    return before, trainable(objective)


def unchanged(before: dict, after: dict) -> list[str]:
    return [n for n in before if torch.equal(before[n], after[n])]


def compute_pins(tmp_dir: Path) -> dict:
    from ftbench.backbone import Backbone
    from ftbench.testing import build_tiny_llama

    path = build_tiny_llama(tmp_dir / "tiny")
    pins = {}
    for q in QUANTS:
        bb = Backbone(model=str(path), quantization=q)
        m = lora(bb)
        losses = four_step_losses(m, tiny_data(bb))
        pins[q] = {"trainable": m.parameter_counts()["trainable"], "losses": losses,
                   **bb.memory_footprint(m.model)}
    bb = Backbone(model=str(path), quantization="nf4", double_quant=True)
    pins["nf4_double_quant_weight_bytes"] = bb.memory_footprint(bb.load_model())["weight_bytes"]
    return pins


@pytest.fixture(scope="module")
def pins():
    return load_pins(PIN_NAME)


def backbone_for(tiny_model_dir, q, **kw):
    from ftbench.backbone import Backbone

    return Backbone(model=str(tiny_model_dir), quantization=q, **kw)


# ---------------------------------------------------------------------- configs
def test_bnb_config_kinds():
    from ftbench.quantization import QuantizationError, bnb_config

    nf4 = bnb_config("nf4", compute_dtype=torch.bfloat16, double_quant=True)
    assert nf4.load_in_4bit and nf4.bnb_4bit_quant_type == "nf4" and nf4.bnb_4bit_use_double_quant
    assert nf4.bnb_4bit_compute_dtype == torch.bfloat16
    fp4 = bnb_config("fp4")
    assert fp4.load_in_4bit and fp4.bnb_4bit_quant_type == "fp4" and not fp4.bnb_4bit_use_double_quant
    int8 = bnb_config("int8")
    assert int8.load_in_8bit and not int8.load_in_4bit
    with pytest.raises(QuantizationError, match="double_quant"):
        bnb_config("int8", double_quant=True)
    with pytest.raises(QuantizationError, match="not one of"):
        bnb_config("int4")


def test_backbone_passes_double_quant_and_compute_dtype(tiny_model_dir):
    bb = backbone_for(tiny_model_dir, "nf4", double_quant=True, compute_dtype="bfloat16")
    cfg = bb.quantization_config()
    assert cfg.bnb_4bit_use_double_quant and cfg.bnb_4bit_compute_dtype == torch.bfloat16
    assert backbone_for(tiny_model_dir, "nf4").quantization_config().bnb_4bit_compute_dtype == torch.float32
    d = bb.describe()
    assert (d["quantization"], d["double_quant"], d["compute_dtype"], d["prepare_kbit"]) == ("nf4", True, "bfloat16", True)
    assert backbone_for(tiny_model_dir, "none").quantization_config() is None


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_yaml_parses(path):
    from ftbench.cli import cli_main

    given = ["--backbone", str(path)] if path.parent.name == "backbone" else ["--model.init_args.optimizer", str(path)]
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", "--tuner", str(LORA_YAML), "--model", str(SFT_YAML), *given, "--print_config"])
    assert exc.value.code in (0, None)


# ---------------------------------------------------------------------- loading and memory
@pytest.mark.parametrize("q", ["nf4", "fp4", "int8"])
def test_quantized_load_and_footprint(tiny_model_dir, q):
    from bitsandbytes.nn import Linear4bit, Linear8bitLt

    bb = backbone_for(tiny_model_dir, q)
    model = bb.load_model()
    kind = Linear8bitLt if q == "int8" else Linear4bit
    linears = [m for m in model.modules() if isinstance(m, kind)]
    assert len(linears) == 2 * 7  # q, k, v, o, gate, up, down in 2 blocks; the head stays unquantized
    if q != "int8":
        assert all(m.support_avx512bf16_for_cpu is False for m in linears)  # after_quantized_load
    fp = bb.memory_footprint(model)
    assert fp["storage_format"] == f"bnb-{q}"
    plain = backbone_for(tiny_model_dir, "none")
    ref = plain.load_model()
    lin_elems = sum(m.in_features * m.out_features for m in linears)
    assert lin_elems == 73728  # 2 blocks x (2*64*64 + 2*32*64 + 3*128*64)
    if q == "int8":  # 1 byte a weight + a float32 scale per output row
        expect_q = lin_elems + 4 * sum(m.out_features for m in linears)
    else:  # 2 weights a byte + a float32 absmax per 64-weight block + the 16-entry float32 code per layer
        expect_q = lin_elems // 2 + 4 * lin_elems // 64 + 16 * 4 * len(linears)
    assert fp["weight_bytes_by_storage"][f"bnb-{q}"] == expect_q
    unquantized = 4 * (sum(p.numel() for p in ref.parameters()) - lin_elems)
    assert fp["weight_bytes_by_storage"]["float32"] == unquantized
    assert fp["weight_bytes"] == expect_q + unquantized
    full = plain.memory_footprint(ref)
    assert full == {"weight_bytes": 4 * sum(p.numel() for p in ref.parameters()), "storage_format": "float32",
                    "weight_bytes_by_storage": {"float32": 4 * sum(p.numel() for p in ref.parameters())}}
    assert fp["weight_bytes"] < full["weight_bytes"]


def test_footprint_leaves_adapters_out(tiny_model_dir, pins):
    bb = backbone_for(tiny_model_dir, "nf4")
    m = lora(bb)
    m.configure_model()
    assert bb.memory_footprint(m.model)["weight_bytes"] == pins["nf4"]["weight_bytes"]
    assert bb.memory_footprint(bb.load_model())["weight_bytes"] == pins["nf4"]["weight_bytes"]


def test_double_quant_footprint_pinned(tiny_model_dir, pins):
    bb = backbone_for(tiny_model_dir, "nf4", double_quant=True)
    model = bb.load_model()
    state = next(m for m in model.modules() if type(m).__name__ == "Linear4bit").weight.quant_state
    assert state.nested and state.absmax.dtype == torch.uint8  # absmax itself quantized to 8 bits
    # on a 64-dim model the nested state (a 256-entry code per layer) outweighs what it saves
    assert bb.memory_footprint(model)["weight_bytes"] == pins["nf4_double_quant_weight_bytes"]


# ---------------------------------------------------------------------- LoRA on quantized backbones
def test_lora_trainable_count_same_on_every_backbone(tiny_model_dir, pins):
    counts = {}
    for q in QUANTS:
        m = lora(backbone_for(tiny_model_dir, q))
        m.configure_model()
        counts[q] = m.parameter_counts()["trainable"]
    # r=4 on 7 linears x 2 blocks: 4*(in+out) each = 4*(2*128 + 2*96 + 3*192) x 2
    assert counts == {q: 8192 for q in QUANTS}
    assert all(pins[q]["trainable"] == 8192 for q in QUANTS)


def test_total_counts_parameters_not_packed_bytes(tiny_model_dir):
    """A 4-bit weight stores two parameters a byte; the total must count parameters."""
    totals = {}
    for q in QUANTS:
        m = lora(backbone_for(tiny_model_dir, q))
        m.configure_model()
        totals[q] = m.parameter_counts()["total"]
    assert len(set(totals.values())) == 1, totals


@pytest.mark.parametrize("name", ["full", "freeze"])
def test_tuners_of_the_backbone_weights_refuse_a_quantized_backbone(tiny_model_dir, name):
    from ftbench.objectives import SFT
    from ftbench.tuners import Freeze, Full

    m = SFT(backbone=backbone_for(tiny_model_dir, "nf4"), tuner=Full() if name == "full" else Freeze())
    with pytest.raises(ValueError) as err:
        m.configure_model()
    assert str(err.value) == (
        f"tuner {name}: a nf4 backbone cannot train its own weights (quantized weights take no gradient); "
        "use backbone.quantization: none, or LoRA on it (QLoRA)"
    )


@pytest.mark.parametrize("q", QUANTS)
def test_pinned_four_step_losses(tiny_model_dir, pins, q):
    bb = backbone_for(tiny_model_dir, q)
    losses = four_step_losses(lora(bb), tiny_data(bb))
    assert losses == pytest.approx(pins[q]["losses"], rel=REL)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("q", ["nf4", "fp4", "int8"])
def test_validation_then_training_updates_every_lora_weight(tiny_model_dir, q):
    """ftbench never trains silently: after a validation and a sanity check (eval-mode, no-grad
    forwards), two training steps move every LoRA matrix (B at step 1, A at step 2)."""
    bb = backbone_for(tiny_model_dir, q)
    m = lora(bb)
    before, after = fit_after_validation(m, tiny_data(bb))
    assert len(before) == 28  # A and B of 14 linears
    assert unchanged(before, after) == []


def test_trap_is_detected_without_the_fix(tiny_model_dir, monkeypatch):
    """The check above can fail: without after_quantized_load, on a CPU where bitsandbytes repacks
    4-bit weights (AVX512-BF16), LoRA below the last layers gets no gradient after a validation."""
    from ftbench import quantization

    if not quantization.cpu_repacks_4bit():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack 4-bit weights here")
    monkeypatch.setattr(quantization, "after_quantized_load", lambda model: model)
    bb = backbone_for(tiny_model_dir, "nf4")
    before, after = fit_after_validation(lora(bb), tiny_data(bb))
    frozen = unchanged(before, after)
    # on this machine: the A matrices of q, k, v, gate and up in both blocks stay where they started
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight" in frozen


def test_prepare_kbit_off_keeps_dtype(tiny_model_dir):
    for flag, dtype in ((True, torch.float32), (False, torch.bfloat16)):
        bb = backbone_for(tiny_model_dir, "nf4", dtype="bfloat16", prepare_kbit=flag)
        m = lora(bb)
        m.configure_model()
        assert m.model.get_input_embeddings().weight.dtype == dtype
        assert m.parameter_counts()["trainable"] == 8192


# ---------------------------------------------------------------------- optimizers from bitsandbytes
@pytest.mark.parametrize("name", ["adamw8bit", "paged_adamw8bit"])
def test_bnb_optimizer_from_config(tiny_model_dir, tmp_path, name):
    import bitsandbytes as bnb

    from ftbench.cli import cli_main

    args = ["--backbone.model", str(tiny_model_dir), "--backbone.quantization", "nf4",
            "--tuner", str(LORA_YAML), "--model", str(SFT_YAML),
            "--model.init_args.optimizer", str(ROOT / f"configs/optim/{name}.yaml"),
            "--model.init_args.optimizer.init_args.min_8bit_size", "256", "--evaluate.max_new_tokens", "4",
            "--model.init_args.warmup_steps", "0",  # (the config's warm-up starts at lr 0)
            "--data", str(ROOT / "configs/data/instruction.yaml"), "--data.init_args.builtin_size", "80",
            "--data.init_args.max_length", "96", "--data.init_args.batch_size", "4",
            "--trainer", str(ROOT / "configs/trainer/cpu.yaml"), "--trainer.max_steps", "2",
            "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--out", str(tmp_path), "--run_id", "opt", "--test_after_fit", "false"]
    cli = cli_main(args, run=False)
    cli.model.configure_model()
    before = trainable(cli.model)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    opt = cli.trainer.optimizers[0]
    assert type(opt) is (bnb.optim.AdamW8bit if name == "adamw8bit" else bnb.optim.PagedAdamW8bit)
    assert all(g["lr"] == 1e-3 for g in opt.param_groups)  # the tuner's lr (lora.yaml)
    states = [opt.state[p] for g in opt.param_groups for p in g["params"]]
    assert len(states) == 28 and all(s["state1"].dtype == torch.uint8 for s in states)  # every LoRA matrix >= 256
    assert unchanged(before, trainable(cli.model)) == []


# ---------------------------------------------------------------------- the record
@pytest.mark.parametrize("q", ["nf4", "int8"])
def test_record_has_quantization_and_memory(tiny_model_dir, tmp_path, pins, q):
    from ftbench.cli import cli_main

    cli_main(["fit", "--backbone.model", str(tiny_model_dir), "--backbone.quantization", q,
              "--tuner", str(LORA_YAML), "--model", str(SFT_YAML), "--evaluate.max_new_tokens", "4",
              "--data", str(ROOT / "configs/data/instruction.yaml"), "--data.init_args.builtin_size", "80",
              "--data.init_args.max_length", "96", "--data.init_args.batch_size", "4",
              "--data.init_args.eval_batch_size", "4",
              "--trainer", str(ROOT / "configs/trainer/cpu.yaml"), "--trainer.max_steps", "2",
              "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
              "--trainer.limit_test_batches", "1", "--trainer.logger", "false",
              "--trainer.enable_progress_bar", "false", "--out", str(tmp_path), "--run_id", f"q-{q}"])
    rec = json.loads((tmp_path / f"q-{q}.json").read_text())
    info = rec["train_info"]
    assert info["status"] == "completed" and info["global_steps"] == 2
    assert info["method"] == f"sft+lora+{q}"  # LoRA on a quantized backbone is its own row (QLoRA)
    bb = info["backbone"]
    assert bb["quantization"] == q and bb["storage_format"] == f"bnb-{q}"
    assert bb["weight_bytes"] == pins[q]["weight_bytes"]
    assert bb["weight_bytes_by_storage"] == pins[q]["weight_bytes_by_storage"]
    assert info["memory"]["peak_bytes"] > 0 and info["memory"]["source"]
    assert info["params"]["trainable"] == 2 * 16 * (2 * 128 + 2 * 96 + 3 * 192)  # lora.yaml: r=16
    assert rec["run_info"]["config"]["backbone"]["quantization"] == q
