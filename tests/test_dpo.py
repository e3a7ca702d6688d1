"""The DPO objective on the tiny Llama: the reference is the untouched backbone (LoRA and adapters
exactly, full to 1e-6), one concatenated forward equals separate ones, the SFT term is the SFT loss on
the chosen responses, pinned losses of 4 seeded fp32 steps through Lightning with the reference on the
fly and precomputed (equal; no frozen copy for full), the on-disk cache (reused, invalidated by other
data, rows matched by their tokens), ``rewards/accuracies`` rising on the easy built-in pairs, every
shipped DPO YAML run through the CLI with its defaults, and the records and report of a DPO + reward
model run folder."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from ftbench.backbone import Backbone
from ftbench.evaluation.evaluator import Evaluator
from ftbench.evaluation.options import EvaluationOptions
from ftbench.objectives import DPO, SFT
from ftbench.objectives.dpo import ConservativeDPOWarning
from ftbench.objectives.losses import DPO_LOSS_TYPES, dpo_batch_loss, dpo_loss, sequence_logps, token_logps
from ftbench.objectives.reference_cache import ReferenceTable, data_fingerprint, row_keys
from ftbench.data.pairs import concatenate_pairs
from ftbench.objectives.sft import sequence_losses
from ftbench.tuners import Adapters, Freeze, Full, NoTuning
from helpers import LossRecorder, cpu_trainer, lora, preference_data
from pinning import load_pins

ROOT = Path(__file__).resolve().parent.parent
STEPS = 4


TUNERS = {"lora": lambda: lora(lr=1e-3), "adapters": lambda: Adapters(bottleneck_size=8, lr=1e-3),
          "full": lambda: Full(lr=1e-3), "freeze": lambda: Freeze(lr=1e-3), "none": NoTuning}
PIN_NAME = "dpo"


def make_dpo(model_dir, tuner: str = "lora", **kw) -> DPO:
    kw.setdefault("warmup_steps", 0)
    kw.setdefault("lr_scheduler", "constant")
    return DPO(backbone=Backbone(model=str(model_dir)), tuner=TUNERS[tuner](), **kw)


def train(method: DPO, steps: int = STEPS, **data_kw) -> list[float]:
    L.seed_everything(0, verbose=False)
    rec = LossRecorder()
    cpu_trainer(steps, [rec]).fit(method, datamodule=preference_data(method.backbone, **data_kw))
    return rec.losses


def first_batch(backbone: Backbone, split: str = "train", **kw) -> dict:
    dm = preference_data(backbone, **kw)
    dm.setup("fit")
    loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
    return next(iter(loader))


def untouched_logps(model_dir, batch) -> torch.Tensor:
    """Summed completion log-probs of cat([chosen, rejected]) under a freshly loaded backbone."""
    model = Backbone(model=str(model_dir)).load_model()
    cat = concatenate_pairs(batch, ("input_ids", "attention_mask", "labels"))
    with torch.no_grad():
        logits = model(input_ids=cat["input_ids"], attention_mask=cat["attention_mask"], use_cache=False).logits
    return sequence_logps(logits, cat["labels"])[0]


# ---------------------------------------------------------------------------- the reference
@pytest.mark.parametrize("name", ["lora", "adapters", "full"])
def test_reference_logps_are_the_untouched_backbone(tiny_model_dir, name):
    method = make_dpo(tiny_model_dir, name)
    train(method, steps=3)
    batch = first_batch(method.backbone, "val")
    n = batch["chosen_input_ids"].shape[0]
    want = untouched_logps(tiny_model_dir, batch)
    cat = concatenate_pairs(batch, ("input_ids", "attention_mask", "labels"))
    with torch.no_grad():
        ref_c, ref_r = method.reference_logps(batch, cat)
        policy, _ = method.sequence_logps(cat)
    got = torch.cat([ref_c, ref_r])
    if name == "full":  # a frozen copy: the same weights, other tensors
        assert torch.allclose(got, want, atol=1e-6, rtol=0)
    else:  # the same weights with the added modules switched off: bit for bit
        assert torch.equal(got, want)
    assert not torch.allclose(policy, want, atol=1e-3)  # while the policy has moved
    assert got.shape == (2 * n,)


def test_one_concatenated_forward_equals_separate_forwards(tiny_model_dir):
    method = make_dpo(tiny_model_dir, "none")
    method.configure_model()
    batch = first_batch(method.backbone)
    n = batch["chosen_input_ids"].shape[0]
    cat = concatenate_pairs(batch, ("input_ids", "attention_mask", "labels"))
    assert cat["input_ids"].shape[0] == 2 * n
    with torch.no_grad():
        both, lengths = method.sequence_logps(cat)
        for k, side in enumerate(("chosen", "rejected")):
            logits = method(batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"])
            alone, count = sequence_logps(logits, batch[f"{side}_labels"])
            assert torch.allclose(both[k * n:(k + 1) * n], alone, atol=1e-5, rtol=0)
            assert torch.equal(lengths[k * n:(k + 1) * n], count)
    # sums over the completion tokens only: the prompt is masked
    assert torch.equal(lengths[:n], (batch["chosen_labels"][:, 1:] != -100).sum(1))


def test_concatenation_pads_the_narrower_side(tiny_model_dir):
    batch = {"chosen_input_ids": torch.tensor([[5, 6, 7]]), "chosen_attention_mask": torch.tensor([[1, 1, 1]]),
             "chosen_labels": torch.tensor([[-100, 6, 7]]),
             "rejected_input_ids": torch.tensor([[5, 8]]), "rejected_attention_mask": torch.tensor([[1, 1]]),
             "rejected_labels": torch.tensor([[-100, 8]])}
    cat = concatenate_pairs(batch, ("input_ids", "attention_mask", "labels"))
    assert cat["input_ids"].tolist() == [[5, 6, 7], [5, 8, 0]]
    assert cat["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert cat["labels"].tolist() == [[-100, 6, 7], [-100, 8, -100]]


def test_loss_is_dpo_loss_plus_the_sft_term(tiny_model_dir):
    """The training loss = mean dpo_loss + sft_weight x the SFT objective's loss on the chosen responses."""
    method = make_dpo(tiny_model_dir, "lora", sft_weight=0.5, beta=0.2, loss_type="robust", label_smoothing=0.1)
    method.configure_model()
    batch = first_batch(method.backbone)
    out = method.compute(batch)
    n = batch["chosen_input_ids"].shape[0]
    cat = out["cat"]
    ref, _ = method.sequence_logps(cat)  # LoRA B = 0: policy = reference before a step
    losses, _, _ = dpo_loss(out["policy_chosen"], out["policy_rejected"], ref[:n].detach(), ref[n:].detach(), 0.2,
                            "robust", 0.1)
    assert torch.allclose(out["losses"], losses, atol=1e-6)
    sft = SFT(backbone=method.backbone, tuner=NoTuning())
    sft.model = method.model
    loss_sum, n_tok = sequence_losses(sft(batch["input_ids"], batch["attention_mask"]), batch["labels"])
    assert float(out["sft_loss"]) == pytest.approx(float(loss_sum.sum() / n_tok.sum()), abs=1e-5)
    # policy = reference: every pair's log-ratio is 0, so robust's loss is log 2 for any e
    assert torch.allclose(out["losses"], torch.full((n,), 0.6931472), atol=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError) as e:
        DPO(loss_type="kto")
    assert str(e.value) == ("objective dpo: unknown loss_type 'kto'; expected one of sigmoid, ipo, hinge, robust, "
                            "exo_pair, nca_pair, bco_pair, sppo_hard, apo_zero, apo_down, discopop, sigmoid_norm, aot, "
                            "aot_unpaired, sft")
    with pytest.raises(ValueError) as e:
        DPO(beta=0.0)
    assert str(e.value) == "objective dpo: beta must be a positive finite number, got 0.0"
    with pytest.raises(ValueError) as e:
        DPO(loss_type="ipo", label_smoothing=0.1)
    assert str(e.value) == "objective dpo: label_smoothing is not used by loss_type 'ipo'; set it to 0 (got 0.1)"
    with pytest.raises(ValueError) as e:
        DPO(sft_weight=-1.0)
    assert str(e.value) == "objective dpo: sft_weight must be >= 0, got -1.0"


# ---------------------------------------------------------------------------- pinned losses
# 4 seeded fp32 steps of full DPO (sigmoid, beta 0.1, lr 1e-3) on builtin:capitals, 4 pairs a batch.
# Step 0: policy = reference, so the loss is log 2 = 0.693147 (pins "full").
def test_pinned_losses_on_the_fly_and_precomputed_are_equal(tiny_model_dir, tmp_path):
    on_the_fly = make_dpo(tiny_model_dir, "full")
    losses = train(on_the_fly)
    assert losses == pytest.approx(load_pins(PIN_NAME)["full"], abs=1e-5)
    assert losses[0] == pytest.approx(0.6931472, abs=1e-6)
    ref = on_the_fly.reference_model  # a frozen copy, for full tuning: a submodule (moved, counted, checkpointed)
    assert ref is on_the_fly.tuner._reference and ref is not on_the_fly.model and not ref.training
    assert {id(p) for p in ref.parameters()} <= {id(p) for p in on_the_fly.parameters()}
    assert not any(p.requires_grad for p in ref.parameters())
    assert on_the_fly.parameter_counts()["total"] == sum(p.numel() for p in ref.parameters())  # not counted twice

    pre = make_dpo(tiny_model_dir, "full", precompute_reference=True, reference_cache_dir=str(tmp_path))
    pre_losses = train(pre)
    assert pre.tuner._reference is None and pre.reference_model is None  # no frozen copy ...
    assert not pre.needs_reference and on_the_fly.needs_reference
    assert pre.reference_source == "computed" and len(pre.reference_table) == 64  # ... the 64 pairs' numbers instead
    assert pre_losses == pytest.approx(losses, abs=1e-6)


def test_precomputed_lora_equals_on_the_fly(tiny_model_dir, tmp_path):
    losses = train(make_dpo(tiny_model_dir, "lora"))
    pre_losses = train(make_dpo(tiny_model_dir, "lora", precompute_reference=True, reference_cache_dir=str(tmp_path)))
    assert pre_losses == pytest.approx(losses, abs=1e-6)
    assert losses[0] == pytest.approx(0.6931472, abs=1e-6) and losses[-1] < losses[0]


# ---------------------------------------------------------------------------- the cache
def test_cache_is_reused_and_invalidated_by_other_data(tiny_model_dir, tmp_path):
    first = make_dpo(tiny_model_dir, "full", precompute_reference=True, reference_cache_dir=str(tmp_path))
    train(first, steps=1)
    [path] = list(tmp_path.glob("*.pt"))
    assert first.reference_source == "computed" and first.reference_cache_file == path
    stamp = path.stat().st_mtime_ns

    second = make_dpo(tiny_model_dir, "full", precompute_reference=True, reference_cache_dir=str(tmp_path))
    second._compute_reference_table = lambda meta, dm=None: pytest.fail("the cache file was not read")
    train(second, steps=1)
    assert second.reference_source == "cache" and second.reference_cache_file == path
    assert path.stat().st_mtime_ns == stamp and list(tmp_path.glob("*.pt")) == [path]
    assert torch.equal(second.reference_table.chosen, first.reference_table.chosen)

    other = make_dpo(tiny_model_dir, "full", precompute_reference=True, reference_cache_dir=str(tmp_path))
    train(other, steps=1, builtin_size=48)  # other data: another fingerprint, another file
    assert other.reference_source == "computed" and other.reference_cache_file != path
    assert len(list(tmp_path.glob("*.pt"))) == 2 and len(other.reference_table) == 48

    # without a trainer (e.g. to precompute before a sweep): the data module is given
    alone = make_dpo(tiny_model_dir, "full", precompute_reference=True, reference_cache_dir=str(tmp_path))
    alone.configure_model()
    dm = preference_data(alone.backbone)
    dm.setup("fit")
    assert len(alone.ensure_reference_table(dm)) == 64
    assert alone.reference_source == "cache" and alone.reference_cache_file == path


def test_rows_are_matched_by_their_tokens_not_their_position(tiny_model_dir):
    backbone = Backbone(model=str(tiny_model_dir))
    dm = preference_data(backbone)
    dm.setup("fit")
    rows = dm.splits["train"][:4]
    collate = dm.collator(generation=False)
    keys = row_keys(collate(rows))
    assert len(set(keys)) == 4
    assert row_keys(collate(rows[::-1])) == keys[::-1]  # order
    assert row_keys(collate(rows[:1])) == keys[:1]  # padding: alone, the row is padded less
    wide = collate(rows)
    def pad(key):  # what the collator pads each field with
        return -100 if key.endswith("labels") else 0 if key.endswith("mask") else 3

    wider = {k: torch.nn.functional.pad(v, (0, 5), value=pad(k)) if torch.is_tensor(v) and v.dim() == 2 else v
             for k, v in wide.items()}
    assert row_keys(wider) == keys  # more padding, same key
    assert data_fingerprint(keys) == data_fingerprint(keys[::-1] + keys[:1])
    table = ReferenceTable(keys, torch.arange(4.0), -torch.arange(4.0))
    chosen, rejected = table.lookup(keys[::-1])
    assert chosen.tolist() == [3.0, 2.0, 1.0, 0.0] and rejected.tolist() == [-3.0, -2.0, -1.0, -0.0]
    with pytest.raises(KeyError, match="1 of 2 pairs of this batch have no reference log-probs"):
        table.lookup([keys[0], "0" * 32])


def test_full_model_that_moved_is_refused_as_its_own_reference(tiny_model_dir, tmp_path):
    method = make_dpo(tiny_model_dir, "full", precompute_reference=True, reference_cache_dir=str(tmp_path))
    L.seed_everything(0, verbose=False)
    dm = preference_data(method.backbone)
    t = cpu_trainer(1)
    t.fit(method, datamodule=dm)  # precomputed before the step, from the untouched weights
    method.reference_table = None
    with pytest.raises(RuntimeError, match="tuner full changes the backbone's own weights and they have changed"):
        method._compute_reference_table({})


def test_estimate_counts_the_frozen_copy_and_not_a_precomputed_reference(tiny_model_dir):
    """``ftbench estimate`` (the meta device) steps DPO on ``memory_batch``: full tuning's frozen copy
    doubles the weights, a precomputed reference (carried by the batch) holds none; LoRA holds none either."""
    from ftbench.estimate import estimate

    def parts(tuner, **kw):
        backbone = Backbone(model=str(tiny_model_dir))
        method = DPO(backbone=backbone, tuner=TUNERS[tuner](), **kw)
        return estimate(backbone, method.tuner, method, batch_size=2, seq_len=16, precision="32-true")

    full, full_pre = parts("full"), parts("full", precompute_reference=True)
    # one model: 139,584 float32 parameters + the rotary buffers inv_freq and original_inv_freq (8 floats each)
    assert full_pre["weights"]["bytes"] == 4 * 139_584 + 2 * 4 * 8
    assert full["weights"]["bytes"] == 2 * full_pre["weights"]["bytes"]
    assert full_pre["predicted_peak_bytes"] < full["predicted_peak_bytes"]
    lora_, lora_pre = parts("lora"), parts("lora", precompute_reference=True)
    assert lora_["weights"]["bytes"] == lora_pre["weights"]["bytes"]
    assert lora_["activations"]["bytes"] == lora_pre["activations"]["bytes"] > 0


# ---------------------------------------------------------------------------- learning
# LoRA r=8, lr 1e-3, 12 steps (one epoch) of 4 pairs on builtin:capitals; validation on its 8 held-out
# pairs. Before: policy = reference, every implicit reward is 0 and a tie is not a win (strict) (pins "rise").
def easy_pairs_run(model_dir) -> tuple[dict, dict]:
    """The validation metrics before and after 12 steps on the easy pairs."""
    method = make_dpo(model_dir, "lora", evaluator=Evaluator(EvaluationOptions(max_new_tokens=4)))
    dm = preference_data(method.backbone)
    L.seed_everything(0, verbose=False)
    t = cpu_trainer(12, limit_val_batches=None, val_check_interval=12)
    t.validate(method, datamodule=dm, verbose=False)
    before = {k: float(v) for k, v in t.callback_metrics.items()}
    t.fit(method, datamodule=dm)
    after = {k: float(v) for k, v in t.callback_metrics.items()}
    return before, after


def test_rewards_accuracies_rise_on_the_easy_pairs(tiny_model_dir):
    pins = load_pins(PIN_NAME)["rise"]
    before, after = easy_pairs_run(tiny_model_dir)
    assert pins["start"] == 0.0 and pins["end"] == 1.0  # from chance (all ties) to every pair
    assert before["val/rewards/accuracies"] == pins["start"]
    assert before["val/rewards/margins"] == 0.0 and before["val/loss"] == pytest.approx(0.6931472, abs=1e-6)
    assert after["val/rewards/accuracies"] == pytest.approx(pins["end"], abs=1e-6)
    assert after["val/rewards/margins"] == pytest.approx(pins["end_margin"], abs=1e-4)
    assert after["val/loss"] == pytest.approx(pins["end_loss"], abs=1e-4)
    assert after["val/pairwise_accuracy"] == after["val/rewards/accuracies"]
    for key in ("train/loss", "train/rewards/chosen", "train/rewards/rejected", "train/rewards/accuracies",
                "train/rewards/margins", "train/logps/chosen", "train/logps/rejected", "val/accuracy",
                "val/logps/chosen", "val/logps/rejected", "val/rewards/chosen", "val/rewards/rejected"):
        assert key in after, key


# ---------------------------------------------------------------------------- CLI, records, report
def fit_args(tiny: Path, out: Path, objective: str, *extra: str, tuner: str = "lora") -> list[str]:
    return ["fit", "--backbone.model", str(tiny), "--tuner", f"configs/tuner/{tuner}.yaml",
            "--model", f"configs/objective/{objective}.yaml", "--data", "configs/data/preference_easy.yaml",
            "--trainer", "configs/trainer/cpu.yaml", "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
            "--data.init_args.builtin_size", "64", "--data.init_args.eval_batch_size", "8",
            "--trainer.enable_progress_bar", "false", "--out", str(out), *extra]


def only_record(out: Path, prefix: str) -> dict:
    [path] = [p for p in out.glob("*.json") if p.stem.startswith(prefix)]
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def preference_runs(tiny_model_dir, tmp_path_factory):
    """A DPO and a reward-model run through the CLI, into one folder."""
    from ftbench.cli import cli_main

    out = tmp_path_factory.mktemp("preference-runs")
    mp = pytest.MonkeyPatch()
    mp.chdir(ROOT)
    try:
        cli_main(fit_args(tiny_model_dir, out, "dpo", "--evaluate.max_new_tokens", "4"))
        cli_main(fit_args(tiny_model_dir, out, "reward"))
    finally:
        mp.undo()
    return out


def test_dpo_record_has_trl_metrics(preference_runs):
    r = only_record(preference_runs, "dpo+lora-")
    info = r["train_info"]
    assert info["status"] == "completed" and info["method"] == "dpo+lora" and info["objective"] == "dpo"
    [entry] = info["metrics"]
    for stage in ("val", "test"):
        for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                     "logps/chosen", "logps/rejected", "pairwise_accuracy", "accuracy"):
            assert isinstance(info["final"][f"{stage}/{name}"], float), f"{stage}/{name}"
    for name in ("loss", "rewards/chosen", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert isinstance(entry[f"train/{name}"], float)
    assert info["throughput"]["trained_tokens"] > 0 and info["memory"]["peak_bytes"] > 0
    assert info["saved"]["bytes"] > 0
    # exact match through the data set's answer metrics, as SFT: every evaluated row in the predictions file
    assert info["predictions"]["rows"] == {"val": 6, "test": 6}  # 64 capitals pairs: 10 % val, 10 % test
    rows = [json.loads(line) for line in (preference_runs / info["predictions"]["path"]).read_text().splitlines()]
    assert {r["stage"] for r in rows} == {"val", "test"} and all(r["reference"].isupper() for r in rows)


def test_reward_record_has_trl_metrics(preference_runs):
    info = only_record(preference_runs, "reward+lora-")["train_info"]
    assert info["status"] == "completed" and info["method"] == "reward+lora" and info["objective"] == "reward"
    # LoRA r=16 on every linear (32,768) + the new score head (1 x 64)
    assert info["params"]["trainable"] == 32_768 + 64
    [entry] = info["metrics"]
    for stage in ("val", "test"):
        for name in ("loss", "accuracy", "pairwise_accuracy", "margin", "mean_reward", "min_reward", "max_reward"):
            assert isinstance(info["final"][f"{stage}/{name}"], float), f"{stage}/{name}"
    for name in ("loss", "accuracy", "margin", "mean_reward", "min_reward", "max_reward"):
        assert isinstance(entry[f"train/{name}"], float)


def test_report_on_a_dpo_and_reward_model_folder(preference_runs, tmp_path):
    out = tmp_path / "report"
    done = subprocess.run([sys.executable, "-m", "ftbench.cli", "report", str(preference_runs), "--out", str(out),
                           "--no-plots"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    md = (out / "report.md").read_text()
    assert "dpo+lora" in md and "reward+lora" in md
    with open(next(out.glob("*.csv"))) as f:
        rows = {row["method"]: row for row in csv.DictReader(f)}
    for column in ("val/rewards/accuracies", "test/rewards/accuracies", "test/rewards/margins", "test/logps/chosen",
                   "test/pairwise_accuracy", "test/accuracy"):
        assert rows["dpo+lora"][column] != "", column
    for column in ("test/accuracy", "test/pairwise_accuracy", "test/margin", "test/mean_reward", "test/min_reward",
                   "test/max_reward"):
        assert rows["reward+lora"][column] != "", column
    # the new metrics in the markdown table, by --columns
    shown = subprocess.run([sys.executable, "-m", "ftbench.cli", "report", str(preference_runs), "--out",
                            str(tmp_path / "shown"), "--no-plots", "--columns",
                            "method,test/pairwise_accuracy,test/rewards/*"],
                           capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert shown.returncode == 0, shown.stderr
    table = (tmp_path / "shown" / "report.md").read_text()
    for title in ("test/pairwise_accuracy", "test/rewards/accuracies", "test/rewards/margins"):
        assert title in table


@pytest.mark.parametrize("objective", ["ipo", "dpo_precomputed", "mpo", "apo_zero"])
def test_shipped_dpo_yaml_runs_with_its_defaults(tiny_model_dir, tmp_path, monkeypatch, objective):
    from ftbench.cli import cli_main

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("FTBENCH_CACHE", str(tmp_path / "cache"))  # precomputed reference log-probs go here
    cli_main(fit_args(tiny_model_dir, tmp_path, objective, "--evaluate.max_new_tokens", "4",
                      "--test_after_fit", "false"))
    info = only_record(tmp_path, "dpo+lora-")["train_info"]
    assert info["status"] == "completed" and info["global_steps"] == 3
    assert isinstance(info["final"]["val/rewards/accuracies"], float)
    if objective == "dpo_precomputed":
        assert len(list((tmp_path / "cache" / "reference_logps").glob("*.pt"))) == 1


# ---------------------------------------------------------------------------- every TRL loss type
@pytest.mark.parametrize("loss_type", [t for t in DPO_LOSS_TYPES if t != "sigmoid"] + [["sigmoid", "bco_pair", "sft"]],
                         ids=lambda t: t if isinstance(t, str) else "mpo")
def test_every_loss_type_is_dpo_batch_loss_on_the_model(tiny_model_dir, loss_type):
    """The objective's loss is dpo_batch_loss on the model's summed log-probs (and, for sft, its per-token ones)."""
    smoothing = {"exo_pair": 0.1, "aot": 0.1, "robust": 0.1}.get(loss_type if isinstance(loss_type, str) else "", 0.0)
    weights = None if isinstance(loss_type, str) else [0.8, 0.2, 1.0]
    method = make_dpo(tiny_model_dir, "none", beta=0.3, loss_type=loss_type, label_smoothing=smoothing,
                      loss_weights=weights, discopop_tau=0.5)
    method.configure_model()
    batch = first_batch(method.backbone)
    n = batch["chosen_input_ids"].shape[0]
    with torch.no_grad():
        out = method.compute(batch)
        cat = out["cat"]
        ref = untouched_logps(tiny_model_dir, batch)  # NoTuning: the policy is the reference
        tokens, mask = token_logps(method(cat["input_ids"], cat["attention_mask"]), cat["labels"])
        lengths = mask.sum(-1)
        want = dpo_batch_loss(out["policy_chosen"], out["policy_rejected"], ref[:n], ref[n:], 0.3, loss_type, smoothing,
                              lengths[:n], lengths[n:], 0.5, weights, tokens[:n], mask[:n])
    assert float(out["loss"]) == pytest.approx(float(want), abs=1e-5)
    assert float(out["losses"].mean()) == pytest.approx(float(out["loss"]), abs=1e-5)  # evaluation's rows average to it


def test_new_settings_are_checked():
    with pytest.raises(ValueError) as e:
        DPO(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2])
    assert str(e.value) == ("objective dpo: loss_weights has 2 weights for the 3 loss types ['sigmoid', 'bco_pair', "
                            "'sft']; give one weight per type")
    with pytest.raises(ValueError) as e:
        DPO(loss_type="exo_pair")
    assert str(e.value) == "objective dpo: loss_type 'exo_pair' needs label_smoothing in (0, 1) (its log(e) term), got 0.0"
    with pytest.raises(ValueError) as e:
        DPO(loss_type=["bco_pair", "sft"], label_smoothing=0.1)
    assert str(e.value) == ("objective dpo: label_smoothing is not used by loss_type any of ['bco_pair', 'sft']; "
                            "set it to 0 (got 0.1)")
    with pytest.raises(ValueError) as e:
        DPO(loss_type="discopop", discopop_tau=0.0)
    assert str(e.value) == "objective dpo: discopop_tau must be > 0, got 0.0"
    with pytest.warns(ConservativeDPOWarning) as caught:
        DPO(label_smoothing=0.1)
    assert len(caught) == 1 and str(caught[0].message) == (
        "objective dpo: label_smoothing 0.1 with loss_type sigmoid is conservative DPO (as TRL <= 0.28, LLaMA-Factory "
        "and torchtune compute it); TRL 1.x ignores label_smoothing for sigmoid, so its numbers differ")


# 4 seeded fp32 steps of full MPO (sigmoid + bco_pair + sft, 0.8 / 0.2 / 1.0, beta 0.1, lr 1e-3), 4 pairs a batch.
# Step 0: sigmoid and bco_pair at policy = reference: 0.8 log 2 + 0.2 x 2 log 2, plus the random backbone's NLL
# (pins "mpo").
def mpo_losses(model_dir) -> list[float]:
    return train(make_dpo(model_dir, "full", loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]))


def test_pinned_mpo_losses(tiny_model_dir):
    assert mpo_losses(tiny_model_dir) == pytest.approx(load_pins(PIN_NAME)["mpo"], abs=1e-5)


def compute_pins(tmp_dir: Path) -> dict:
    from ftbench.testing import build_tiny_llama

    model_dir = build_tiny_llama(Path(tmp_dir) / "tiny")
    before, after = easy_pairs_run(model_dir)
    rise = {"start": before["val/rewards/accuracies"], "end": after["val/rewards/accuracies"],
            "end_margin": after["val/rewards/margins"], "end_loss": after["val/loss"]}
    return {"full": train(make_dpo(model_dir, "full")), "rise": rise, "mpo": mpo_losses(model_dir)}
