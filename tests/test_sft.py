"""The SFT objective with the full, freeze, LoRA and no tuners on the tiny Llama: trainable-parameter
counts, pinned losses of 4 seeded fp32 steps through Lightning (the shared loop is what is pinned),
which weights a step changes, the reference model, the score head, and exact-match evaluation.
Pins: ``python scripts/regen_pins.py foundation`` writes tests/pins/foundation.json."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from ftbench.backbone import Backbone
from ftbench.objectives import SFT
from ftbench.evaluation.metrics import fold_whitespace
from ftbench.evaluation.evaluator import Evaluator
from ftbench.evaluation.options import EvaluationOptions
from ftbench.tuners import Freeze, Full, NoTuning
from helpers import LossRecorder, cpu_trainer, instruction_data, lora
from pinning import load_pins

PIN_NAME = "foundation"
STEPS = 4


TUNERS = {"full": Full, "lora": lambda **kw: lora(alpha=16, **kw), "baseline": NoTuning, "freeze": Freeze}

# Tiny Llama: vocab 512, hidden 64, 2 layers, 4 heads of 16, 2 KV heads (kv dim 32), MLP 128, untied head.
#   embed 512*64 = 32,768 + lm_head 512*64 = 32,768
#   per layer: q 64*64 + k 64*32 + v 64*32 + o 64*64 = 12,288; gate/up/down 3*64*128 = 24,576;
#              2 RMSNorms 2*64 = 128  -> 36,992 x 2 layers = 73,984
#   final norm 64                     -> 139,584
FULL_PARAMS = 139_584
# LoRA r=8 on every linear but the head: r*(in+out) per layer:
#   q 8*128 + k 8*96 + v 8*96 + o 8*128 = 3,584; gate 8*192 + up 8*192 + down 8*192 = 4,608
#   -> 8,192 x 2 layers = 16,384
LORA_PARAMS = 16_384


def make_method(name: str, model_dir: str | Path, tuner_kw: dict | None = None, **kw) -> SFT:
    return SFT(backbone=Backbone(model=str(model_dir)), tuner=TUNERS[name](**(tuner_kw or {})), **kw)


def train_losses(model_dir: str | Path, name: str, steps: int = STEPS) -> tuple[list[float], SFT]:
    L.seed_everything(0, verbose=False)
    method = make_method(name, model_dir)
    rec = LossRecorder()
    cpu_trainer(steps, [rec]).fit(method, datamodule=instruction_data(method.backbone))
    return rec.losses, method


def compute_pins(tmp_dir: Path) -> dict:
    """The pinned numbers, from a tiny model built afresh in ``tmp_dir``."""
    from ftbench.testing import build_tiny_llama

    model_dir = build_tiny_llama(Path(tmp_dir) / "tiny")
    pins: dict = {}
    for name in ("full", "lora"):
        losses, method = train_losses(model_dir, name)
        pins[name] = {"losses": losses, **method.parameter_counts()}
    base = make_method("baseline", model_dir)
    base.configure_model()
    pins["baseline"] = base.parameter_counts()
    return pins


# ---------------------------------------------------------------------------- parameter counts
@pytest.mark.parametrize("name, trainable", [("full", FULL_PARAMS), ("lora", LORA_PARAMS), ("baseline", 0)])
def test_trainable_parameter_counts(tiny_model_dir, name, trainable):
    method = make_method(name, tiny_model_dir)
    method.configure_model()
    counts = method.parameter_counts()
    total = FULL_PARAMS + (LORA_PARAMS if name == "lora" else 0)
    assert counts == {"trainable": trainable, "total": total}
    pins = load_pins(PIN_NAME)[name]
    assert (pins["trainable"], pins["total"]) == (trainable, total)


def test_lora_rank_and_targets_change_the_count(tiny_model_dir):
    method = make_method("lora", tiny_model_dir, tuner_kw={"r": 4, "target_modules": ["q_proj", "v_proj"]})
    method.configure_model()
    # r=4: q 4*(64+64) + v 4*(64+32) = 896 per layer, x 2 layers
    assert method.parameter_counts()["trainable"] == 1_792


def test_baseline_has_nothing_to_train(tiny_model_dir):
    method = make_method("baseline", tiny_model_dir)
    method.configure_model()
    with pytest.raises(ValueError) as e:
        cpu_trainer(1).fit(method, datamodule=instruction_data(method.backbone))
    assert str(e.value) == "sft+none: nothing to train (no parameter requires grad)"


# ---------------------------------------------------------------------------- pinned losses
@pytest.mark.parametrize("name", ["full", "lora"])
def test_pinned_losses(tiny_model_dir, name):
    losses, _ = train_losses(tiny_model_dir, name)
    pinned = load_pins(PIN_NAME)[name]["losses"]
    assert len(pinned) == STEPS
    assert losses == pytest.approx(pinned, abs=1e-4)


def test_pins_are_sane():
    pins = load_pins(PIN_NAME)
    # a random 512-token model starts near ln(512) = 6.24; both methods start from the same backbone
    # and batch, so their first losses agree; full fine-tuning at lr 1e-3 then learns faster.
    assert pins["full"]["losses"][0] == pytest.approx(pins["lora"]["losses"][0], abs=1e-5)
    assert abs(pins["full"]["losses"][0] - 6.238) < 0.1
    assert pins["full"]["losses"][-1] < pins["full"]["losses"][0]


# ---------------------------------------------------------------------------- what a step changes
def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _changed_after(name: str, model_dir, steps: int) -> tuple[set[str], set[str]]:
    L.seed_everything(0, verbose=False)
    method = make_method(name, model_dir)
    method.configure_model()
    before = _snapshot(method.model)
    cpu_trainer(steps).fit(method, datamodule=instruction_data(method.backbone))
    after = _snapshot(method.model)
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    return changed, set(before)


def test_lora_step_changes_only_lora_weights(tiny_model_dir):
    changed, names = _changed_after("lora", tiny_model_dir, steps=2)
    lora = {k for k in names if "lora_" in k}
    assert len(lora) == 2 * 7 * 2  # A and B of 7 linears in 2 layers
    assert changed == lora  # (after 2 steps: A moves once B is no longer zero)


def test_full_step_changes_every_weight(tiny_model_dir):
    changed, names = _changed_after("full", tiny_model_dir, steps=1)
    assert len(names) == 2 + 2 * 9 + 1  # embed, head, 9 tensors a layer, final norm
    assert changed == names


# ---------------------------------------------------------------------------- evaluation
def _test_metrics(tiny_model_dir, answers) -> dict[str, float]:
    """Run ``trainer.test`` with generation replaced by ``answers(batch)``."""
    L.seed_everything(0, verbose=False)
    method = make_method("baseline", tiny_model_dir)
    method.evaluator.predict_answers = lambda batch, prompt_cache=None: answers(batch)  # what the greedy decoder returned
    dm = instruction_data(method.backbone, builtin_size=100, test_fraction=0.2, eval_batch_size=8)
    cpu_trainer(1).test(method, datamodule=dm, verbose=False)
    return {k: float(v) for k, v in trainer_metrics(method).items()}


def trainer_metrics(method):
    return method.trainer.callback_metrics


TASKS = ("arithmetic", "last_word", "sort_numbers", "uppercase", "count_words")


def test_exact_match_all_right(tiny_model_dir):
    m = _test_metrics(tiny_model_dir, lambda batch: [f"  {a}\n" for a in batch["answers"]])  # white space ignored
    assert m["test/accuracy"] == 1.0 and m["test/macro_accuracy"] == 1.0
    for t in TASKS:
        assert m[f"test/{t}/accuracy"] == 1.0
        assert m[f"test/{t}/loss"] > 0 and f"test/{t}/perplexity" in m
    assert m["test/perplexity"] == pytest.approx(torch.tensor(m["test/loss"]).exp().item(), rel=1e-5)


def test_exact_match_all_wrong(tiny_model_dir):
    m = _test_metrics(tiny_model_dir, lambda batch: [a + "0" for a in batch["answers"]])
    assert m["test/accuracy"] == 0.0 and m["test/macro_accuracy"] == 0.0
    assert {f"test/{t}/accuracy" for t in TASKS} <= set(m)


def test_exact_match_is_per_row_and_per_task(tiny_model_dir):
    """Right only on arithmetic rows: overall accuracy = their share, macro accuracy = 1/5."""
    seen: list[str] = []

    def answers(batch):
        seen.extend(batch["tasks"])
        return [a if t == "arithmetic" else "" for a, t in zip(batch["answers"], batch["tasks"])]

    m = _test_metrics(tiny_model_dir, answers)
    assert seen.count("arithmetic") > 0
    assert m["test/accuracy"] == pytest.approx(seen.count("arithmetic") / len(seen), abs=1e-6)
    assert m["test/arithmetic/accuracy"] == 1.0 and m["test/uppercase/accuracy"] == 0.0
    assert m["test/macro_accuracy"] == pytest.approx(0.2, abs=1e-6)


def test_greedy_generation_matches_a_hand_rolled_greedy_loop(tiny_model_dir):
    """The evaluator's ``predict_answers`` on a left-padded batch = argmax decoding of each unpadded prompt alone."""
    method = make_method("baseline", tiny_model_dir, evaluator=Evaluator(EvaluationOptions(max_new_tokens=3)))
    method.configure_model()
    method.model.eval()
    dm = instruction_data(method.backbone, eval_batch_size=4)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    assert len(set(len(e.prompt_ids) for e in dm.splits["test"][:4])) > 1  # some rows are left-padded
    out = method.evaluator.predict_answers(batch)
    tok = method.backbone.tokenizer
    expected = []
    with torch.no_grad():
        for ex in dm.splits["test"][:4]:
            ids = torch.tensor([ex.prompt_ids])
            new = []
            for _ in range(3):
                nxt = int(method.model(input_ids=ids).logits[0, -1].argmax())
                new.append(nxt)
                if nxt == tok.eos_token_id:
                    break
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
            expected.append(tok.decode(new, skip_special_tokens=True))
    assert out == expected


def test_fold_whitespace():
    assert fold_whitespace("  1  2\n3 ") == "1 2 3"
    assert fold_whitespace("APPLE") != fold_whitespace("apple")  # exact match is case-sensitive


# ---------------------------------------------------------------------------- freeze
# The last of the 2 blocks: q 64*64 + k 64*32 + v 64*32 + o 64*64 = 12,288; MLP 3*64*128 = 24,576;
# 2 RMSNorms 2*64 = 128 -> 36,992
FREEZE_LAST_BLOCK = 36_992


def test_freeze_trains_only_the_last_block(tiny_model_dir):
    method = make_method("freeze", tiny_model_dir)
    method.configure_model()
    assert method.parameter_counts() == {"trainable": FREEZE_LAST_BLOCK, "total": FULL_PARAMS}
    changed, names = _changed_after("freeze", tiny_model_dir, steps=1)
    assert changed == {k for k in names if k.startswith("model.layers.1.")}
    assert len(changed) == 9


def test_freeze_named_modules_and_extras(tiny_model_dir):
    method = make_method("freeze", tiny_model_dir, tuner_kw={"trainable_modules": ["mlp"], "extra_modules": ["norm"]})
    method.configure_model()
    # the last block's MLP 24,576 + the final norm 64
    assert method.parameter_counts()["trainable"] == 24_640
    with pytest.raises(ValueError) as e:
        make_method("freeze", tiny_model_dir, tuner_kw={"trainable_layers": 3}).configure_model()
    assert str(e.value) == "tuner freeze: trainable_layers=3 but the model has 2 blocks"
    with pytest.raises(ValueError) as e:
        make_method("freeze", tiny_model_dir, tuner_kw={"trainable_modules": ["ffn"]}).configure_model()
    assert str(e.value) == ("tuner freeze: trainable_modules: LlamaDecoderLayer has no 'ffn' "
                            "(its children: self_attn, mlp, input_layernorm, post_attention_layernorm)")


# ---------------------------------------------------------------------------- the reference model
def _batch(method):
    dm = instruction_data(method.backbone)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


# full/freeze: a frozen copy (to 1e-6: a copy's forward may round differently); LoRA: the adapter
# switched off, the backbone's own weights (exactly)
@pytest.mark.parametrize("name, atol", [("full", 1e-6), ("freeze", 1e-6), ("lora", 0.0)])
def test_reference_is_the_untouched_backbone(tiny_model_dir, name, atol):
    L.seed_everything(0, verbose=False)
    untouched = make_method("baseline", tiny_model_dir)
    untouched.configure_model()
    method = make_method(name, tiny_model_dir)
    method.configure_model()
    method.tuner.keep_reference(method.model)  # what an objective that needs a reference calls
    cpu_trainer(2).fit(method, datamodule=instruction_data(method.backbone))
    batch = _batch(method)
    with torch.no_grad():
        want = untouched(batch["input_ids"], batch["attention_mask"])
        trained = method(batch["input_ids"], batch["attention_mask"])
        with method.tuner.reference(method.model) as ref:
            got = method(batch["input_ids"], batch["attention_mask"], model=ref)
        after = method(batch["input_ids"], batch["attention_mask"])
    assert torch.equal(got, want) if atol == 0 else torch.allclose(got, want, atol=atol, rtol=0)
    assert not torch.allclose(trained, want, atol=1e-3)  # training moved the model ...
    assert torch.equal(after, trained)  # ... and it is back after the block


def test_full_without_keep_reference_refuses(tiny_model_dir):
    method = make_method("full", tiny_model_dir)
    method.configure_model()
    with pytest.raises(RuntimeError) as e:
        with method.tuner.reference(method.model):
            pass
    assert str(e.value) == ("tuner full: reference() needs keep_reference(model) before training "
                            "(a frozen copy of the weights as they were)")


# ---------------------------------------------------------------------------- the score head
def test_score_head_reads_the_last_real_token_when_pad_is_eos(tiny_model_dir):
    from ftbench.backbone import last_token_scores, score_module

    backbone = Backbone(model=str(tiny_model_dir))
    model = backbone.load_model(head="score")
    assert model.ftbench_head == "score"
    eos = backbone.tokenizer.eos_token_id
    model.config.pad_token_id = eos  # pad = EOS, as in SmolLM2 and Llama 3
    # row 0: 5 real tokens ending in EOS, then 3 pads (= EOS); row 1: 8 real tokens
    ids = torch.tensor([[5, 6, 7, 8, eos, eos, eos, eos], [9, 10, 11, 12, 13, 14, 15, eos]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0], [1] * 8])
    captured = []
    handle = score_module(model).register_forward_hook(lambda m, a, out: captured.append(out.detach()))
    with torch.no_grad():
        scores = last_token_scores(model, ids, mask)
    handle.remove()
    per_position = captured[0][..., 0]
    assert torch.equal(scores, torch.stack([per_position[0, 4], per_position[1, 7]]))
    # what pooling by "last token that is not the pad id" would have read for row 0: position 3
    assert not torch.equal(scores[0], per_position[0, 3])


def test_score_head_trains_under_every_tuner(tiny_model_dir):
    from ftbench.tuners import Adapters

    from ftbench.backbone import score_module

    for tuner in (lora(), Adapters(), Freeze(), NoTuning()):
        objective = SFT(backbone=Backbone(model=str(tiny_model_dir)), tuner=tuner)
        objective.head = "score"
        objective.configure_model()
        head = score_module(objective.model)
        assert any(p.requires_grad for p in head.parameters()), tuner.name
