"""Bottleneck adapters (Houlsby / Pfeiffer) on the tiny Llama, and on tiny GPT-2, Qwen2 and Mistral
models built from configs in-process.

Pinned numbers (tests/pins/adapters.json, ``python scripts/regen_pins.py adapters``): training
losses of a 4-step fp32 Lightning fit (tests/pinning.py) of each placement on the tiny Llama
(``ftbench.tuners.Adapters`` under ``ftbench.objectives.SFT``: constant lr 1e-2, no warm-up).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from ftbench.evaluation.evaluator import Evaluator
from ftbench.evaluation.options import EvaluationOptions
from helpers import tiny_data
from pinning import four_step_losses, load_pins

PIN_NAME = "adapters"
ROOT = Path(__file__).resolve().parent.parent
SHIPPED = [ROOT / "configs/tuner/adapter_houlsby.yaml", ROOT / "configs/tuner/adapter_pfeiffer.yaml"]
D, LAYERS = 64, 2  # the tiny Llama


def per_adapter(d: int, m: int) -> int:
    return 2 * d * m + d + m  # down (d*m + m) and up (m*d + d)


def tuner(placement="houlsby", **kw):
    from ftbench.tuners import Adapters

    return Adapters(placement=placement, **kw)


def adapters(backbone, placement="houlsby", **kw):
    """SFT with bottleneck adapters, AdamW at lr 1e-2 (no weight decay), 4 new tokens."""
    from ftbench.objectives import SFT

    optimizer = functools.partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.0)
    return SFT(backbone=backbone, tuner=tuner(placement, **kw), optimizer=optimizer,
               evaluator=Evaluator(EvaluationOptions(max_new_tokens=4)))


def compute_pins(tmp_dir: Path) -> dict:
    from ftbench.backbone import Backbone
    from ftbench.testing import build_tiny_llama

    bb = Backbone(model=str(build_tiny_llama(tmp_dir / "tiny")))
    dm = tiny_data(bb)
    return {p: {"losses": four_step_losses(adapters(bb, p), dm)} for p in ("houlsby", "pfeiffer")}


def trainable(objective) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in objective.model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------- placement and counts
@pytest.mark.parametrize("placement,per_block", [("houlsby", 2), ("pfeiffer", 1)])
def test_trainable_count_is_the_formula(backbone, placement, per_block):
    m = adapters(backbone, placement)  # reduction factor 16: m = 64 // 16 = 4
    m.configure_model()
    counts = m.parameter_counts()
    assert counts["trainable"] == LAYERS * per_block * per_adapter(D, 4)
    assert counts["trainable"] == {"houlsby": 2320, "pfeiffer": 1160}[placement]
    names = [n for n, p in m.model.named_parameters() if p.requires_grad]
    assert all(".bottleneck_adapter." in n for n in names)
    where = {n.split(".")[3] for n in names}  # model.layers.<i>.<sublayer>.bottleneck_adapter...
    assert where == ({"self_attn", "mlp"} if placement == "houlsby" else {"mlp"})


def test_bottleneck_size_and_norms(backbone):
    m = adapters(backbone, "houlsby", bottleneck_size=10, train_norms=True)
    m.configure_model()
    norms = (2 * LAYERS + 1) * D  # input and post-attention RMSNorm per block, and the final norm
    assert m.parameter_counts()["trainable"] == LAYERS * 2 * per_adapter(D, 10) + norms


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_starts_exactly_as_the_backbone(backbone, placement):
    torch.manual_seed(0)
    ids = torch.randint(0, 400, (2, 12))
    ref = backbone.load_model().eval()
    m = adapters(backbone, placement)
    m.configure_model()
    m.model.eval()
    with torch.no_grad():
        assert torch.equal(m.model(ids).logits, ref(ids).logits)
        # and an adapter with a non-zero up-projection does change them (the hooks are live)
        next(mod for mod in m.model.modules() if type(mod).__name__ == "BottleneckAdapter").up.bias.fill_(0.1)
        assert not torch.allclose(m.model(ids).logits, ref(ids).logits)


def _tiny_arch(kind: str) -> nn.Module:
    from transformers import (GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    torch.manual_seed(0)
    small = dict(vocab_size=128, hidden_size=D, intermediate_size=128, num_hidden_layers=LAYERS,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=D, n_layer=LAYERS, n_head=4, n_positions=64))
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**small))
    return MistralForCausalLM(MistralConfig(**small))


@pytest.mark.parametrize("kind", ["gpt2", "qwen2", "mistral"])
@pytest.mark.parametrize("placement,per_block", [("houlsby", 2), ("pfeiffer", 1)])
def test_other_architectures(backbone, kind, placement, per_block):
    model = _tiny_arch(kind).eval()
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        ref = model(ids).logits
    prepared = tuner(placement).prepare(model, backbone)
    trained = [n for n, p in prepared.named_parameters() if p.requires_grad]
    assert sum(p.numel() for p in prepared.parameters() if p.requires_grad) == LAYERS * per_block * per_adapter(D, 4)
    assert len(trained) == LAYERS * per_block * 4
    with torch.no_grad():
        assert torch.equal(prepared(ids).logits, ref)
    prepared.train()
    prepared(ids, labels=ids).loss.backward()
    # the gradient reaches every adapter (the up-projection's bias gets it whatever ReLU does)
    ups = [p for n, p in prepared.named_parameters() if n.endswith("up.bias")]
    assert len(ups) == LAYERS * per_block and all(p.grad is not None and p.grad.abs().sum() > 0 for p in ups)


def test_unsupported_architecture_fails_clearly(backbone):
    from ftbench.tuners.adapters import AdapterPlacementError

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mixer = nn.Linear(8, 8)

    class Odd(nn.Module):
        _no_split_modules = ["Block"]

        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"hidden_size": 8, "num_hidden_layers": 2})()
            self.blocks = nn.ModuleList([Block(), Block()])

    with pytest.raises(AdapterPlacementError, match=r"Block has no MLP sublayer .*mlp, feed_forward, ffn.*children: mixer"):
        tuner("pfeiffer").prepare(Odd(), backbone)

    class NoBlocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"hidden_size": 8, "num_hidden_layers": 3})()
            self.body = nn.Linear(8, 8)

    with pytest.raises(AdapterPlacementError, match="cannot find the transformer blocks of NoBlocks"):
        tuner().prepare(NoBlocks(), backbone)


# ---------------------------------------------------------------------- training
def test_pinned_four_step_losses(backbone):
    pins = load_pins(PIN_NAME)
    dm = tiny_data(backbone)
    for placement in ("houlsby", "pfeiffer"):
        losses = four_step_losses(adapters(backbone, placement), dm)
        assert losses == pytest.approx(pins[placement]["losses"], rel=1e-4)
        assert losses[-1] < losses[0]


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_validation_then_training_updates_every_adapter(tiny_model_dir, quantization):
    """Never train silently: after a validation and a sanity check (eval mode, no grad), two steps
    move every adapter weight (the up-projection at step 1, the down-projection at step 2)."""
    import lightning as L

    from ftbench.backbone import Backbone

    bb = Backbone(model=str(tiny_model_dir), quantization=quantization)
    m = adapters(bb)
    dm = tiny_data(bb)
    torch.manual_seed(0)
    m.configure_model()
    before = trainable(m)
    kw = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=1)
    L.Trainer(**kw).validate(m, datamodule=dm, verbose=False)
    L.Trainer(max_steps=2, num_sanity_val_steps=1, **kw).fit(m, datamodule=dm)
    after = trainable(m)
    assert len(before) == LAYERS * 2 * 4
    assert [n for n in before if torch.equal(before[n], after[n])] == []


# ---------------------------------------------------------------------- the reference
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_reference_is_the_untouched_backbone_after_training(backbone, placement):
    """Under ``tuner.reference(model)`` the trained model computes exactly the backbone's logits (the
    adapters switched off, no second copy); after the block the trained logits are back."""
    dm = tiny_data(backbone)
    m = adapters(backbone, placement)
    before: dict = {}
    four_step_losses(m, dm, steps=3, after_setup=lambda o: before.update(trainable(o)))
    assert [n for n in before if torch.equal(before[n], trainable(m)[n])] == []  # training moved every adapter
    batch = next(iter(dm.val_dataloader()))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    plain = backbone.load_model().eval()
    m.model.eval()
    with torch.no_grad():
        expected = plain(input_ids=ids, attention_mask=mask, use_cache=False).logits
        trained = m(ids, mask)
        assert not torch.allclose(trained, expected)
        with m.tuner.reference(m.model) as ref:
            assert torch.equal(m(ids, mask, model=ref), expected)
        assert torch.equal(m(ids, mask), trained)


def test_reference_refused_when_norms_train(backbone):
    m = adapters(backbone, train_norms=True)
    m.configure_model()
    with pytest.raises(RuntimeError, match="train_norms"):
        with m.tuner.reference(m.model):
            pass


# ---------------------------------------------------------------------- saving
def test_save_and_load_only_the_adapters(backbone, tmp_path):
    from safetensors.torch import load_file

    dm = tiny_data(backbone)
    m = adapters(backbone, "houlsby", train_norms=True)
    four_step_losses(m, dm, steps=2)
    m.save_trained(tmp_path / "a")
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    saved = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert sum(t.numel() for t in saved.values()) == m.parameter_counts()["trainable"]
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["bottleneck_size"] == 4

    fresh = adapters(backbone, "houlsby", train_norms=True)
    fresh.configure_model()
    fresh.tuner.load(fresh.model, tmp_path / "a")
    batch = next(iter(dm.val_dataloader()))
    m.model.eval()
    fresh.model.eval()
    with torch.no_grad():
        assert torch.equal(fresh(batch["input_ids"], batch["attention_mask"]),
                           m(batch["input_ids"], batch["attention_mask"]))
    other = adapters(backbone, "pfeiffer", train_norms=True)
    other.configure_model()
    with pytest.raises(ValueError, match="were saved with"):
        other.tuner.load(other.model, tmp_path / "a")


def test_cli_run_records_and_saves_adapters(tiny_model_dir, tmp_path):
    from ftbench.cli import cli_main

    cli_main(["fit", "--backbone.model", str(tiny_model_dir), "--tuner", str(SHIPPED[0]),
              "--model", str(ROOT / "configs/objective/sft.yaml"), "--evaluate.max_new_tokens", "4",
              "--data", str(ROOT / "configs/data/instruction.yaml"), "--data.init_args.builtin_size", "80",
              "--data.init_args.max_length", "96", "--data.init_args.batch_size", "4",
              "--data.init_args.eval_batch_size", "4",
              "--trainer", str(ROOT / "configs/trainer/cpu.yaml"), "--trainer.max_steps", "2",
              "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
              "--trainer.limit_test_batches", "1", "--trainer.logger", "false",
              "--trainer.enable_progress_bar", "false", "--out", str(tmp_path), "--run_id", "ad",
              "--save_weights", "true"])
    info = json.loads((tmp_path / "ad.json").read_text())["train_info"]
    assert info["status"] == "completed" and info["method"] == "sft+adapters"
    assert info["params"]["trainable"] == 2320
    assert info["backbone"]["weight_bytes"] == 4 * (info["params"]["total"] - 2320)  # adapters left out
    assert info["saved"]["files"] == 2 and 4 * 2320 < info["saved"]["bytes"] < 4 * 2320 + 8192


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_yaml_parses(path):
    from ftbench.cli import cli_main

    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", "--tuner", str(path), "--model", str(ROOT / "configs/objective/sft.yaml"), "--print_config"])
    assert exc.value.code in (0, None)
