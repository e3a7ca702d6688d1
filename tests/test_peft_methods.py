"""The peft tuner (``ftbench.tuners.Peft``): every shipped peft config on the tiny Llama, under SFT.

Pinned numbers (tests/pins/peft_methods.json, ``python scripts/regen_pins.py peft_methods``): for each
shipped config in configs/tuner/ that uses ``ftbench.tuners.Peft`` (LoRA itself is pinned in
tests/pins/foundation.json), the exact trainable-parameter count on the tiny Llama and the training
losses of a 4-step fp32 Lightning fit (tests/pinning.py) with configs/objective/sft.yaml as shipped: its
optimizer at the tuner's learning rate and its schedule, whose 5 warm-up steps scale the rate by 0, 0.2,
0.4, 0.6 over these 4 steps (the first step leaves the weights where they are).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ftbench.evaluation.evaluator import Evaluator
from ftbench.evaluation.options import EvaluationOptions
from helpers import tiny_data
from pinning import four_step_losses, load_pins

PIN_NAME = "peft_methods"
ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ("ia3", "prefix_tuning", "prompt_tuning", "dora", "loha", "lokr", "vera", "adalora", "oft")
NAMES = {"ia3": "ia3", "prefix_tuning": "prefix_tuning", "prompt_tuning": "prompt_tuning", "dora": "dora",
         "loha": "loha", "lokr": "lokr", "vera": "vera", "adalora": "adalora", "oft": "oft"}


def config_path(name: str) -> Path:
    return ROOT / "configs" / "tuner" / f"{name}.yaml"


SFT_YAML = ROOT / "configs" / "objective" / "sft.yaml"


def method_from_config(name: str, model_dir: Path, out: Path):
    """The SFT objective with the shipped tuner, as the CLI builds it, on the tiny backbone."""
    from ftbench.cli import cli_main

    cli = cli_main(["--backbone.model", str(model_dir), "--tuner", str(config_path(name)),
                    "--model", str(SFT_YAML), "--evaluate.max_new_tokens", "4",
                    "--data", str(ROOT / "configs/data/instruction.yaml"), "--data.init_args.builtin_size", "80",
                    "--trainer.logger", "false", "--out", str(out)], run=False)
    return cli.model


def trainable(objective) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in objective.model.named_parameters() if p.requires_grad}


def compute_pins(tmp_dir: Path) -> dict:
    from ftbench.testing import build_tiny_llama

    path = build_tiny_llama(tmp_dir / "tiny")
    pins = {}
    for name in CONFIGS:
        m = method_from_config(name, path, tmp_dir / "out")
        losses = four_step_losses(m, tiny_data(m.backbone))
        pins[name] = {"trainable": m.parameter_counts()["trainable"], "losses": losses}
    return pins


@pytest.fixture(scope="module")
def pins():
    return load_pins(PIN_NAME)


def peft_method(backbone, config, max_new_tokens: int = 6, **tuner_kw):
    """SFT with ``Peft(peft_config=config)`` (AdamW, torch's defaults unless ``lr`` is given)."""
    from ftbench.objectives import SFT
    from ftbench.tuners import Peft

    return SFT(backbone=backbone, tuner=Peft(peft_config=config, **tuner_kw),
               evaluator=Evaluator(EvaluationOptions(max_new_tokens=max_new_tokens)))


def generate_answers(m, batch, max_new_tokens: int = 6) -> list[str]:
    return m.evaluator.generate(batch["gen_input_ids"], batch["gen_attention_mask"], max_new_tokens)


# ---------------------------------------------------------------------- every shipped config
@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_config_count_losses_and_training(tiny_model_dir, tmp_path, pins, name):
    m = method_from_config(name, tiny_model_dir, tmp_path)
    assert type(m).__name__ == "SFT" and type(m.tuner).__name__ == "Peft" and m.tuner.name == NAMES[name]
    assert m.method_label == f"sft+{NAMES[name]}"
    before: dict = {}
    losses = four_step_losses(m, tiny_data(m.backbone), after_setup=lambda o: before.update(trainable(o)))
    assert m.parameter_counts()["trainable"] == pins[name]["trainable"]
    assert losses == pytest.approx(pins[name]["losses"], rel=1e-4)
    # every trained tensor moved in 4 steps (tensors initialised to zero move from step 1, the
    # ones multiplied by them from step 2)
    after = trainable(m)
    assert [n for n in before if torch.equal(before[n], after[n])] == []


def test_counts_match_the_arithmetic(pins):
    # tiny Llama: hidden 64, 2 blocks, 4 heads of 16, 2 key/value heads (k/v width 32), MLP 128
    assert pins["prompt_tuning"]["trainable"] == 20 * 64  # 20 virtual token embeddings
    assert pins["prefix_tuning"]["trainable"] == 20 * 2 * 2 * 32  # 20 tokens x 2 blocks x (key, value) x 2 kv heads x 16
    assert pins["ia3"]["trainable"] == 2 * (32 + 32 + 128)  # k, v outputs and down_proj inputs, 2 blocks
    # DoRA r=16 on 7 linears: LoRA A, B plus one magnitude per output feature
    assert pins["dora"]["trainable"] == 2 * (16 * (2 * 128 + 2 * 96 + 3 * 192) + (64 + 32 + 32 + 64 + 128 + 128 + 64))


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_yaml_parses(name):
    from ftbench.cli import cli_main

    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", "--tuner", str(config_path(name)), "--model", str(SFT_YAML), "--print_config"])
    assert exc.value.code in (0, None)


# ---------------------------------------------------------------------- prompt learning
def test_prompt_tuning_eval_logits_align_with_labels(backbone):
    """Prompt tuning prepends virtual tokens to the logits; Peft.align_logits drops them, so the SFT
    per-token loss equals the peft model's own loss (which pads the labels)."""
    import peft

    from ftbench.objectives.sft import sequence_losses

    m = peft_method(backbone, peft.PromptTuningConfig(num_virtual_tokens=5))
    m.configure_model()
    batch = next(iter(tiny_data(backbone).val_dataloader()))
    logits = m(batch["input_ids"], batch["attention_mask"]).detach()
    assert logits.shape[:2] == batch["input_ids"].shape
    loss_sum, n_tok = sequence_losses(logits, batch["labels"])
    own = m.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert float(loss_sum.sum() / n_tok.sum()) == pytest.approx(float(own.detach()), rel=1e-5)
    assert float(m.loss(batch)[0].detach()) == pytest.approx(float(own.detach()), rel=1e-5)


def _greedy_by_training_forward(m, ids: torch.Tensor, n: int) -> list[int]:
    seq = ids
    for _ in range(n):
        logits = m(seq, torch.ones_like(seq))
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return seq[0, ids.shape[1]:].tolist()


def _perturbed(backbone, config):
    m = peft_method(backbone, config)
    torch.manual_seed(0)
    m.configure_model()
    m.model.eval()
    with torch.no_grad():  # a trained-looking prompt, far from the random init
        for p in m.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    return m


@pytest.mark.parametrize("kind", ["prefix", "prompt", "p_tuning"])
def test_generation_is_greedy_decoding_of_the_training_forward(backbone, kind):
    import peft

    config = {"prefix": peft.PrefixTuningConfig(num_virtual_tokens=4),
              "prompt": peft.PromptTuningConfig(num_virtual_tokens=4),
              "p_tuning": peft.PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=16)}[kind]
    m = _perturbed(backbone, config)
    batch = next(iter(tiny_data(backbone).val_dataloader()))
    tok = backbone.tokenizer
    with torch.no_grad():
        answers = generate_answers(m, batch)
        for r, (ids, mask) in enumerate(zip(batch["gen_input_ids"], batch["gen_attention_mask"])):
            row = ids[mask.bool()].unsqueeze(0)
            ref = _greedy_by_training_forward(m, row, 6)
            assert m.tuner.greedy_prompt_learning(m.model, row, 6, None) == ref
            if tok.eos_token_id in ref:
                ref = ref[: ref.index(tok.eos_token_id)]
            assert answers[r] == tok.decode(ref, skip_special_tokens=True)


def test_other_methods_use_the_shared_generation(backbone):
    import peft

    from ftbench.tuners import Tuner

    m = peft_method(backbone, peft.IA3Config())
    m.configure_model()
    m.model.eval()
    batch = next(iter(tiny_data(backbone).val_dataloader()))
    args = (m.model, backbone.tokenizer, batch["gen_input_ids"], batch["gen_attention_mask"], 6)
    with torch.no_grad():
        assert torch.equal(m.tuner.generate(*args, do_sample=False), Tuner.generate(m.tuner, *args, do_sample=False))
    assert m.tuner.num_virtual_tokens == 0


# ---------------------------------------------------------------------- the reference
def _reference_config(kind: str):
    import peft

    return {"lora": peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
            "prompt": peft.PromptTuningConfig(num_virtual_tokens=4),
            "prefix": peft.PrefixTuningConfig(num_virtual_tokens=4)}[kind]


@pytest.mark.parametrize("kind", ["lora", "prompt", "prefix"])
def test_reference_is_the_untouched_backbone_after_training(backbone, kind):
    """Under ``tuner.reference(model)`` (peft's ``disable_adapter``) the trained model's logits are
    exactly the backbone's, also for prompt tuning, whose trained forward prepends virtual tokens;
    after the block the trained logits are back."""
    m = peft_method(backbone, _reference_config(kind), lr=1e-2)
    dm = tiny_data(backbone)
    before: dict = {}
    four_step_losses(m, dm, steps=3, after_setup=lambda o: before.update(trainable(o)))
    assert [n for n in before if torch.equal(before[n], trainable(m)[n])] == []  # training moved every adapter weight
    batch = next(iter(dm.val_dataloader()))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    plain = backbone.load_model().eval()
    m.model.eval()
    with torch.no_grad():
        expected = plain(input_ids=ids, attention_mask=mask, use_cache=False).logits
        trained = m(ids, mask)
        assert trained.shape == expected.shape and not torch.allclose(trained, expected)
        with m.tuner.reference(m.model) as ref:
            assert torch.equal(m(ids, mask, model=ref), expected)
        assert torch.equal(m(ids, mask), trained)


# ---------------------------------------------------------------------- AdaLoRA
def test_adalora_reallocates_ranks_in_a_lightning_fit(backbone):
    import lightning as L
    import peft

    config = peft.AdaLoraConfig(init_r=4, target_r=2, total_step=6, tinit=1, tfinal=2, deltaT=1,
                                target_modules=["q_proj", "v_proj"])
    m = peft_method(backbone, config)
    dm = tiny_data(backbone)
    L.Trainer(accelerator="cpu", devices=1, max_steps=6, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0).fit(m, datamodule=dm)
    ranks = [int((p != 0).sum()) for n, p in m.model.named_parameters() if "lora_E" in n]
    assert len(ranks) == 4 and sum(ranks) < 4 * 4  # budget 2 a layer on average, from 4
    assert m.model.peft_config["default"].rank_pattern is not None


def test_adalora_total_step_mismatch_is_warned(backbone):
    import peft

    config = peft.AdaLoraConfig(init_r=4, target_r=2, total_step=60, tinit=5, tfinal=5, target_modules=["q_proj"])
    m = peft_method(backbone, config)
    # what configure_model does inside a fit: the tuner learns the trainer's optimizer steps
    m._trainer = SimpleNamespace(estimated_stepping_batches=12, state=SimpleNamespace(fn="fit"),
                                 strategy=SimpleNamespace(root_device=torch.device("cpu")))
    with pytest.warns(UserWarning, match="total_step=60 but the trainer will take 12"):
        m.configure_model()
    tuner = m.tuner
    tuner.total_steps = 60
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tuner.resolved_config(torch.nn.Module()).total_step == 60


def test_config_checks(backbone):
    import peft

    from ftbench.errors import ConfigError
    from ftbench.naming import peft_label
    from ftbench.tuners import Peft

    with pytest.raises(ConfigError, match="peft_config is required"):
        Peft()
    with pytest.raises(ConfigError, match="must be a peft.PeftConfig"):
        Peft(peft_config={"r": 4})
    t = Peft(peft_config=peft.LoraConfig(r=2, use_dora=True))
    assert t.name == "dora" and t.resolved_config(torch.nn.Module()).task_type == "CAUSAL_LM"
    assert t.peft_config.task_type is None  # the given config is left as it was
    assert peft_method(backbone, peft.LoraConfig(r=2, use_dora=True)).method_label == "sft+dora"
    assert (peft_label("LoraConfig"), peft_label("LoraConfig", True), peft_label("IA3Config"),
            peft_label("PrefixTuningConfig"), peft_label("AdaLoraConfig")) == ("lora", "dora", "ia3", "prefix_tuning",
                                                                                "adalora")
