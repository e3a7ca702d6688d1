"""KTO on the tiny Llama: TRL's unpaired rows (strings, chat messages, CSV) and paired sets unpaired, the
in-batch KL rows (the previous row's completion, cyclic), the KL estimate and its clamp through the
objective, the weighting warning, pinned losses of 4 seeded fp32 steps through the real training step,
the shipped YAML through the CLI, and each data or setting error as one line through the real CLI."""

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
from ftbench.data.base import DataFormatError
from ftbench.data.unpaired import UnpairedData
from ftbench.objectives import KTO
from ftbench.objectives.kto import weighting_warning
from ftbench.objectives.losses import kto_loss, sequence_logps
from helpers import lora

ROOT = Path(__file__).resolve().parent.parent


def make_kto(model_dir, **kw) -> KTO:
    kw.setdefault("warmup_steps", 0)
    kw.setdefault("lr_scheduler", "constant")
    return KTO(backbone=Backbone(model=str(model_dir)), tuner=lora(lr=1e-3), **kw)


def make_data(backbone: Backbone, **kw) -> UnpairedData:
    kw = {"source": "builtin:capitals", "builtin_size": 64, "batch_size": 4, "max_length": 96, "val_fraction": 0.125,
          "test_fraction": 0.125, "seed": 0, **kw}
    return UnpairedData(backbone=backbone, **kw)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


ROWS = [{"prompt": f"Say {w}", "completion": w, "label": i % 3 != 0} for i, w in
        enumerate(["apple", "river", "stone", "cloud", "green", "table", "water", "light"])]


def setup_rows(backbone, source, **kw) -> UnpairedData:
    dm = make_data(backbone, source=source, val_fraction=0.0, test_fraction=0.0, **kw)
    dm.setup("fit")
    return dm


# ---------------------------------------------------------------------------- data
def test_unpaired_rows_strings_chat_csv_json_and_saved_datasets(backbone, tmp_path):
    dm = setup_rows(backbone, write_jsonl(tmp_path / "u.jsonl", ROWS))
    train = dm.splits["train"]
    assert len(train) == 8 and dm.labels_count == {"desirable": 5, "undesirable": 3}
    assert sorted(e.label for e in train) == sorted(r["label"] for r in ROWS)
    e = train[0]
    assert e.example.input_ids == e.prompt_ids + e.completion_ids  # the prompt masked, the completion trained
    assert e.example.labels == [-100] * len(e.prompt_ids) + e.completion_ids

    chat = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "completion": [{"role": "assistant", "content": r["completion"]}], "label": r["label"]} for r in ROWS]
    dm_chat = setup_rows(backbone, write_jsonl(tmp_path / "c.jsonl", chat), prompt_template="chat")
    assert dm_chat.labels_count == {"desirable": 5, "undesirable": 3}

    csv = tmp_path / "u.csv"
    csv.write_text("prompt,completion,label\n" + "".join(f"{r['prompt']},{r['completion']},{str(r['label']).upper()}\n"
                                                          for r in ROWS))
    dm_csv = setup_rows(backbone, str(csv))
    assert [e.label for e in dm_csv.splits["train"]] == [e.label for e in dm.splits["train"]]

    as_json = tmp_path / "u.json"
    as_json.write_text(json.dumps(ROWS))
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    for source in (str(as_json), str(tmp_path / "saved")):
        other = setup_rows(backbone, source)
        assert [e.label for e in other.splits["train"]] == [e.label for e in dm.splits["train"]], source


def test_a_paired_set_is_unpaired(backbone, tmp_path):
    pairs = [{"prompt": f"Say {w}", "chosen": w.upper(), "rejected": w} for w in ["apple", "river", "stone"]]
    dm = setup_rows(backbone, write_jsonl(tmp_path / "p.jsonl", pairs))
    train = dm.splits["train"]
    assert len(train) == 6 and dm.labels_count == {"desirable": 3, "undesirable": 3}
    tok = backbone.tokenizer
    by_prompt: dict = {}
    for e in train:
        by_prompt.setdefault(tuple(e.prompt_ids), []).append((e.label, tok.decode(e.completion_ids, skip_special_tokens=True)))
    for rows in by_prompt.values():  # each pair: its chosen desirable, its rejected undesirable
        (good,), (bad,) = [c for lab, c in rows if lab], [c for lab, c in rows if not lab]
        assert good.strip() == bad.strip().upper()
    # the built-in pairs: builtin_size pairs -> twice as many rows, split by prompt
    built = make_data(backbone)
    built.setup("fit")
    total = sum(len(v) for v in built.splits.values())
    assert total == 128 and built.labels_count["desirable"] == built.labels_count["undesirable"]


@pytest.mark.parametrize("row, expected", [
    ({"prompt": "p", "completion": "c", "label": "yes"}, "field 'label': must be true or false, got 'yes'"),
    ({"prompt": "p", "completion": "c", "label": 1}, "field 'label': must be true or false, got 1"),
    ({"prompt": "p", "completion": "c"}, "field 'label': missing"),
    ({"prompt": "p", "completion": "  ", "label": True}, "field 'completion': empty (a label needs a completion to judge)"),
])
def test_row_errors_name_file_line_field(backbone, tmp_path, row, expected):
    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], row])
    with pytest.raises(DataFormatError) as err:
        setup_rows(backbone, path)
    assert str(err.value).startswith(f"{path}:2: {expected}")


def test_kl_rows_pair_each_prompt_with_the_previous_completion(backbone, tmp_path):
    dm = setup_rows(backbone, write_jsonl(tmp_path / "u.jsonl", ROWS))
    rows = dm.splits["train"][:3]
    batch = dm.collator(generation=False)(rows)
    assert batch["kto_labels"].tolist() == [e.label for e in rows]
    for i, j in enumerate([2, 0, 1]):  # x_1 gets y_3, x_i gets y_(i-1)
        real = batch["kl_attention_mask"][i].bool()
        assert batch["kl_input_ids"][i][real].tolist() == rows[i].prompt_ids + rows[j].completion_ids
        assert batch["kl_labels"][i][real].tolist() == [-100] * len(rows[i].prompt_ids) + rows[j].completion_ids
    alone = dm.collator(generation=False)(rows[:1])
    assert "kl_input_ids" not in alone  # a batch of one has no mismatched completion


def test_a_last_batch_of_one_row_is_dropped(backbone, tmp_path):
    dm = setup_rows(backbone, write_jsonl(tmp_path / "u.jsonl", ROWS[:7]), batch_size=3)  # 3 + 3 + 1
    assert [len(b["kto_labels"]) for b in dm.train_dataloader()] == [3, 3]


# ---------------------------------------------------------------------------- the objective
def test_kl_estimate_and_losses_through_the_objective(tiny_model_dir):
    method = make_kto(tiny_model_dir, desirable_weight=1.0, undesirable_weight=1.5)
    method.configure_model()
    dm = make_data(method.backbone)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    with torch.no_grad():  # move the policy away from the reference (LoRA B = 0 at the start)
        for name, p in method.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    out = method.compute(batch, training=True)
    with torch.no_grad():
        pol, _ = sequence_logps(method(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        pol_kl, _ = sequence_logps(method(batch["kl_input_ids"], batch["kl_attention_mask"]), batch["kl_labels"])
        with method.tuner.reference(method.model) as ref:
            ref_lp, _ = sequence_logps(method(batch["input_ids"], batch["attention_mask"], model=ref), batch["labels"])
            ref_kl, _ = sequence_logps(method(batch["kl_input_ids"], batch["kl_attention_mask"], model=ref),
                                       batch["kl_labels"])
    z = max(0.0, float((pol_kl - ref_kl).mean()))
    assert float(out["kl"]) == pytest.approx(z, abs=1e-5)
    want, _, _ = kto_loss(pol, ref_lp, batch["kto_labels"], pol_kl, ref_kl, 0.1, "kto", 1.0, 1.5)
    assert torch.allclose(out["losses"].detach(), want, atol=1e-5)
    # the clamp: with the KL rows' log-ratios pushed below 0, z is exactly 0
    low, _, _ = kto_loss(pol, ref_lp, batch["kto_labels"], ref_kl - 1.0, ref_kl, 0.1)
    assert torch.allclose(low, kto_loss(pol, ref_lp, batch["kto_labels"], ref_kl, ref_kl + 5.0, 0.1)[0])


def test_weighting_warning_has_the_numbers():
    assert weighting_warning(100, 100, 1.0, 1.0) is None  # 1:1
    assert weighting_warning(130, 100, 1.0, 1.0) is None  # 1.3 within 1 to 4/3
    assert weighting_warning(100, 0, 1.0, 1.0) is None  # one kind: refused elsewhere
    msg = weighting_warning(100, 300, 1.0, 1.0)
    assert msg == ("kto: desirable:undesirable after weighting is 100 x 1 : 300 x 1 = 0.333, outside TRL's recommended "
                   "1 to 4/3; e.g. desirable_weight in [3.000, 4.000] or undesirable_weight in [0.250, 0.333] (not both)")


# 4 seeded fp32 steps, LoRA r=8 (lr 1e-3) on builtin:capitals unpaired, 4 rows a batch. Step 0: policy =
# reference, z = 0 and every row's loss is 1 - sigmoid(0) = 0.5. apo_zero_unpaired is kto at z = 0: on these
# steps the KL estimate stays at or near 0, so the two differ from the third step on, and little.
PIN_NAME = "kto"
PINNED_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def pinned_run(model_dir, loss_type: str) -> list[float]:
    method = make_kto(model_dir, loss_type=loss_type)
    return four_step_losses(method, make_data(method.backbone))


def compute_pins(tmp_dir: Path) -> dict:
    from ftbench.testing import build_tiny_llama

    model_dir = build_tiny_llama(Path(tmp_dir) / "tiny")
    return {loss_type: pinned_run(model_dir, loss_type) for loss_type in PINNED_LOSS_TYPES}


@pytest.mark.parametrize("loss_type", PINNED_LOSS_TYPES)
def test_pinned_four_step_losses(tiny_model_dir, loss_type):
    losses = pinned_run(tiny_model_dir, loss_type)
    assert losses == pytest.approx(load_pins(PIN_NAME)[loss_type], abs=1e-5)
    assert losses[0] == pytest.approx(0.5, abs=1e-6)


# ---------------------------------------------------------------------------- CLI
def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "FTBENCH_TRACEBACK"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env


def cli(tiny: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "ftbench.cli", "fit", "--backbone.model", str(tiny), "--tuner",
            "configs/tuner/lora.yaml", "--model", "configs/objective/kto.yaml", "--data", "configs/data/unpaired_easy.yaml",
            "--trainer", "configs/trainer/cpu.yaml", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
            "--data.init_args.builtin_size", "40", "--data.init_args.eval_batch_size", "8",
            "--trainer.enable_progress_bar", "false", "--evaluate.max_new_tokens", "2", "--test_after_fit", "false",
            "--out", str(out), *extra]
    return subprocess.run(argv, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)


def one_line(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr + res.stdout
    lines = [line for line in res.stderr.splitlines() if line.startswith("ftbench: ")]
    assert len(lines) == 1 or (len(lines) == 2 and lines[1].startswith("ftbench: hint: ")), res.stderr[-3000:]
    return lines[0]


def test_shipped_yaml_runs_with_its_defaults(tiny_model_dir, tmp_path):
    res = cli(tiny_model_dir, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    [path] = list(tmp_path.glob("*.json"))
    info = json.loads(path.read_text())["train_info"]
    assert info["status"] == "completed" and info["method"] == "kto+lora" and info["global_steps"] == 2
    for key in ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert isinstance(info["final"][f"val/{key}"], float), key
    assert isinstance(info["metrics"][0]["train/kl"], float)


def test_errors_are_one_line(tiny_model_dir, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], {"prompt": "p", "completion": "c", "label": "no"}])
    assert one_line(cli(tiny_model_dir, tmp_path / "a", "--data.init_args.source", bad)) == (
        f"ftbench: error: {bad}:2: field 'label': must be true or false, got 'no'")
    good_only = write_jsonl(tmp_path / "good.jsonl", [{**r, "label": True} for r in ROWS])
    assert one_line(cli(tiny_model_dir, tmp_path / "b", "--data.init_args.source", good_only,
                        "--data.init_args.val_fraction", "0", "--data.init_args.test_fraction", "0")) == (
        f"ftbench: error: {good_only}: field 'label': every one of the 8 training rows is desirable (true); KTO needs "
        "undesirable rows too, or set model.init_args.undesirable_weight: 0")
    assert one_line(cli(tiny_model_dir, tmp_path / "c", "--data.init_args.batch_size", "1")) == (
        "ftbench: error: data.init_args.batch_size: KTO's KL estimate pairs each prompt with another row's completion "
        "of its batch and needs at least 2 rows, got 1")
    assert one_line(cli(tiny_model_dir, tmp_path / "d", "--model.init_args.desirable_weight", "-1")) == (
        "ftbench: error: model.init_args.desirable_weight: must be a finite number >= 0, got -1.0")


def test_estimate_steps_kto_with_its_kl_rows_and_counts_the_frozen_copy(tiny_model_dir):
    """``ftbench estimate`` steps KTO on ``memory_batch`` (rows and their KL rows): full tuning's frozen
    reference copy doubles the weights, LoRA's reference (the adapter switched off) adds none."""
    from ftbench.estimate import estimate
    from ftbench.tuners import Full

    def parts(tuner):
        backbone = Backbone(model=str(tiny_model_dir))
        method = KTO(backbone=backbone, tuner=tuner)
        return estimate(backbone, method.tuner, method, batch_size=2, seq_len=16, precision="32-true")

    one_model = 4 * 139_584 + 2 * 4 * 8  # float32 parameters + the rotary buffers (as tests/test_dpo.py)
    assert parts(Full(lr=1e-3))["weights"]["bytes"] == 2 * one_model
    assert parts(lora(lr=1e-3))["weights"]["bytes"] < 2 * one_model
