"""Methods on the tiny Llama: trainable-parameter counts, pinned losses of 4 seeded fp32 steps through
Lightning (the shared loop is what is pinned), which weights a step changes, and exact-match
evaluation. Pins: ``python scripts/regen_pins.py foundation`` writes tests/pins/foundation.json."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from ftbench.backbone import Backbone
from ftbench.data.instruction import InstructionData
from ftbench.methods import Baseline, FullFinetune, LoRA
from ftbench.methods.base import FTMethod, normalize_answer
from pinning import load_pins

PIN_NAME = "foundation"
STEPS = 4
METHODS = {"full": FullFinetune, "lora": LoRA, "baseline": Baseline}

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


def make_method(name: str, model_dir: str | Path, **kw) -> FTMethod:
    return METHODS[name](backbone=Backbone(model=str(model_dir)), **kw)


def make_data(backbone: Backbone, **kw) -> InstructionData:
    kw = {"source": "builtin:instruction", "builtin_size": 64, "batch_size": 4, "max_length": 96,
          "val_fraction": 0.1, "test_fraction": 0.1, "seed": 0, **kw}
    return InstructionData(backbone=backbone, **kw)


class LossRecorder(L.Callback):
    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def trainer(max_steps: int, callbacks=(), **kw) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, precision="32-true", logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, limit_val_batches=0, callbacks=list(callbacks), **kw)


def train_losses(model_dir: str | Path, name: str, steps: int = STEPS) -> tuple[list[float], FTMethod]:
    L.seed_everything(0, verbose=False)
    method = make_method(name, model_dir)
    rec = LossRecorder()
    trainer(steps, [rec]).fit(method, datamodule=make_data(method.backbone))
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
    method = make_method("lora", tiny_model_dir, r=4, target_modules=["q_proj", "v_proj"])
    method.configure_model()
    # r=4: q 4*(64+64) + v 4*(64+32) = 896 per layer, x 2 layers
    assert method.parameter_counts()["trainable"] == 1_792


def test_baseline_has_nothing_to_train(tiny_model_dir):
    method = make_method("baseline", tiny_model_dir)
    method.configure_model()
    with pytest.raises(ValueError) as e:
        trainer(1).fit(method, datamodule=make_data(method.backbone))
    assert str(e.value) == "Baseline: nothing to train (no parameter requires grad)"


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
    trainer(steps).fit(method, datamodule=make_data(method.backbone))
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
    method.generate_answers = answers  # what the greedy decoder returned
    dm = make_data(method.backbone, builtin_size=100, test_fraction=0.2, eval_batch_size=8)
    trainer(1).test(method, datamodule=dm, verbose=False)
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
    """``generate_answers`` on a left-padded batch = argmax decoding of each unpadded prompt alone."""
    method = make_method("baseline", tiny_model_dir, max_new_tokens=3)
    method.configure_model()
    method.model.eval()
    dm = make_data(method.backbone, eval_batch_size=4)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    assert len(set(len(e.prompt_ids) for e in dm.splits["test"][:4])) > 1  # some rows are left-padded
    out = method.generate_answers(batch)
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


def test_normalize_answer():
    assert normalize_answer("  1  2\n3 ") == "1 2 3"
    assert normalize_answer("APPLE") != normalize_answer("apple")  # exact match is case-sensitive
