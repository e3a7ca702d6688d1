"""Pipelines: a run starts from another run's trained weights (``backbone.init_from``; in a sweep
``init_from: NAME``), its reference model is the upstream model, and sweeps order, skip and resume
stages."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from ftbench.sweep.runs import record_status
from ftbench.sweep.grid import SweepError, load_sweep
from ftbench.tuners.saved import load_backbone

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
TRAINER = {"accelerator": "cpu", "devices": 1, "max_steps": 2, "val_check_interval": 2, "limit_val_batches": 1,
           "num_sanity_val_steps": 0, "enable_checkpointing": False, "enable_progress_bar": False, "logger": False}


def _sweep(tmp: Path, tiny: Path, runs: list[dict], **base) -> Path:
    (tmp / "trainer.yaml").write_text(yaml.safe_dump(TRAINER))
    spec = {"out": str(tmp / "results"),
            "base": {"backbone.model": str(tiny), "objective": str(CONFIGS / "objective/sft.yaml"),
                     "data": str(CONFIGS / "data/instruction.yaml"), "data.init_args.builtin_size": 60,
                     "trainer": "trainer.yaml", "test_after_fit": False, **base},
            "runs": runs}
    path = tmp / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


LORA = str(CONFIGS / "tuner/lora.yaml")
FULL = str(CONFIGS / "tuner/full.yaml")


# ---------------------------------------------------------------------------- the sweep file
def test_stages_are_ordered_and_refer_by_run_id(tmp_path, tiny_model_dir):
    path = _sweep(tmp_path, tiny_model_dir, [
        {"init_from": "sft", "tuner": FULL},               # listed before the run it starts from
        {"name": "sft", "tuner": LORA},
        {"tuner": LORA, "lr": 3.0e-4},
    ])
    runs = load_sweep(path).runs
    assert [r.name for r in runs] == ["sft", None, None]
    sft, full, other = runs
    assert full.upstream == {"backbone.init_from": sft} and not other.upstream
    assert full.overrides["backbone.init_from"] == f"run:{sft.run_id}"
    assert sft.overrides["save_weights"] is True and "save_weights" not in other.overrides
    argv = full.argv("OUT")
    assert argv[argv.index("--backbone.init_from") + 1] == os.path.join("OUT", sft.run_id, "weights")
    # a changed upstream stage is a changed downstream run; an unrelated run keeps its id
    changed = _sweep(tmp_path, tiny_model_dir, [
        {"init_from": "sft", "tuner": FULL}, {"name": "sft", "tuner": LORA, "lr": 5.0e-4},
        {"tuner": LORA, "lr": 3.0e-4}])
    sft2, full2, other2 = load_sweep(changed).runs
    assert sft2.run_id != sft.run_id and full2.run_id != full.run_id and other2.run_id == other.run_id


@pytest.mark.parametrize("runs, message", [
    ([{"init_from": "nobody", "tuner": LORA}],
     "backbone.init_from: 'nobody' is neither a run name of this sweep (named runs: none) nor an existing folder"),
    ([{"name": "a", "init_from": "b", "tuner": LORA}, {"name": "b", "init_from": "a", "tuner": FULL}],
     "the runs' references form a cycle: a -> b -> a"),
    ([{"name": "a", "init_from": "a", "tuner": LORA}], "run 'a': backbone.init_from names the run itself"),
    ([{"name": "a", "tuner": LORA}, {"name": "a", "tuner": FULL}], "runs: the name 'a' is given to two runs"),
])
def test_bad_references_are_refused_before_anything_runs(tmp_path, tiny_model_dir, runs, message):
    path = _sweep(tmp_path, tiny_model_dir, runs)
    with pytest.raises(SweepError) as e:
        load_sweep(path)
    assert str(e.value) == f"{path}: {message}"


# ---------------------------------------------------------------------------- the weights and the reference
@pytest.fixture(scope="module")
def upstream(tiny_model_dir, tmp_path_factory):
    """A 3-step LoRA SFT run that saved its adapter, and that model's logits on a fixed batch."""
    from ftbench.cli import main

    out = tmp_path_factory.mktemp("upstream")
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        main(["fit", "--backbone.model", str(tiny_model_dir), "--tuner", LORA, "--model", "configs/objective/sft.yaml",
              "--data", "configs/data/instruction.yaml", "--data.init_args.builtin_size", "60",
              "--trainer", str(_trainer_file(out)), "--trainer.max_steps", "3", "--test_after_fit", "false",
              "--save_weights", "true", "--out", str(out), "--run_id", "sft"])
    finally:
        os.chdir(cwd)
    return out / "sft" / "weights"


def _trainer_file(d: Path) -> Path:
    (d / "trainer.yaml").write_text(yaml.safe_dump(TRAINER))
    return d / "trainer.yaml"


IDS = torch.tensor([[5, 17, 33, 2, 9, 41, 7, 12]])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits


def test_init_from_applies_the_upstream_weights_and_the_reference_is_the_upstream_model(tiny_model_dir, upstream):
    from peft import PeftModel

    from ftbench.backbone import Backbone
    from ftbench.objectives import SFT
    from ftbench.tuners import Full, Peft
    from peft import LoraConfig

    base = Backbone(model=str(tiny_model_dir))
    upstream_model = PeftModel.from_pretrained(base.load_model(), str(upstream)).eval()  # the adapter, not merged
    want = _logits(upstream_model)
    cold = _logits(base.load_model().eval())
    assert not torch.allclose(want, cold, atol=1e-3)  # the upstream run moved the model

    started = Backbone(model=str(tiny_model_dir), init_from=str(upstream))
    merged = load_backbone(started).eval()
    assert torch.allclose(_logits(merged), want, atol=1e-5, rtol=0)  # merged into the weights: float rounding only

    # a new LoRA on top: switched off, it is the upstream model (not the raw backbone)
    objective = SFT(backbone=started, tuner=Peft(peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                        init_lora_weights=False)))
    objective.configure_model()
    objective.model.eval()
    assert not torch.allclose(_logits(objective.model), want, atol=1e-3)  # the new adapter is not zero here
    with objective.tuner.reference(objective.model) as ref:
        assert torch.allclose(_logits(ref), want, atol=1e-5, rtol=0)
    # full fine-tuning from it: the frozen copy is the upstream model
    full = SFT(backbone=started, tuner=Full())
    full.configure_model()
    full.tuner.keep_reference(full.model)
    with torch.no_grad():
        for p in full.model.parameters():
            p.add_(0.01)
    with full.tuner.reference(full.model) as ref:
        assert torch.allclose(_logits(ref), want, atol=1e-5, rtol=0)


def test_a_reward_model_starts_from_an_sft_lora_stage(tiny_model_dir, upstream):
    # the rlhf pipeline's rm stage: the SFT adapter merged into a score-head model's body
    from peft import PeftModel

    from ftbench.backbone import Backbone

    base = Backbone(model=str(tiny_model_dir))
    sft = PeftModel.from_pretrained(base.load_model(), str(upstream)).merge_and_unload()
    rm = load_backbone(Backbone(model=str(tiny_model_dir), init_from=str(upstream)), head="score")
    assert rm.ftbench_head == "score"
    body = {k: v for k, v in sft.state_dict().items() if not k.startswith("lm_head")}
    got = rm.state_dict()
    assert set(body) <= set(got) and all(torch.equal(got[k], v) for k, v in body.items())
    cold = base.load_model(head="score").state_dict()
    assert not torch.equal(cold["model.layers.0.self_attn.q_proj.weight"], got["model.layers.0.self_attn.q_proj.weight"])


def test_init_from_refuses_what_it_cannot_apply(tiny_model_dir, upstream, tmp_path):
    from ftbench.backbone import Backbone
    from ftbench.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        load_backbone(Backbone(model=str(tiny_model_dir), init_from=str(tmp_path / "none")))
    assert str(e.value) == f"backbone.init_from: {str(tmp_path / 'none')!r} is not a folder saved by a run (--save_weights)"
    with pytest.raises(ConfigError) as e:
        load_backbone(Backbone(model=str(tiny_model_dir), init_from=str(upstream), quantization="nf4"))
    assert "would round it into its quantized weights" in str(e.value)


# ---------------------------------------------------------------------------- sweeps run stages
def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env


def test_a_failed_stage_skips_its_dependants_and_the_rest_goes_on(tmp_path, tiny_model_dir):
    path = _sweep(tmp_path, tiny_model_dir, [
        {"name": "sft", "tuner": LORA, "data.init_args.source": str(tmp_path / "missing.jsonl")},
        {"init_from": "sft", "tuner": FULL},
        {"tuner": LORA, "lr": 3.0e-4},
    ])
    sft, full, other = load_sweep(path).runs
    res = subprocess.run([sys.executable, "-m", "ftbench.cli", "sweep", str(path)], env=_env(), cwd=tmp_path,
                         capture_output=True, text=True, timeout=400)
    assert res.returncode == 1, res.stdout + res.stderr
    out = tmp_path / "results"
    assert [record_status(out / f"{r.run_id}.json") for r in (sft, full, other)] == ["failed", "skipped", "completed"]
    skipped = json.loads((out / f"{full.run_id}.json").read_text())["train_info"]
    assert skipped["error"] == {"type": "UpstreamNotCompleted",
                                "message": f"upstream run sft ({sft.run_id}, backbone.init_from) is failed"}
    assert f"[2/3] {full.run_id}: skipped: upstream run sft" in res.stdout


def test_resume_after_kill_between_stages_redoes_nothing_finished(tmp_path, tiny_model_dir):
    path = _sweep(tmp_path, tiny_model_dir, [{"name": "sft", "tuner": LORA}, {"init_from": "sft", "tuner": FULL}])
    sft, full = load_sweep(path).runs
    out = tmp_path / "results"
    proc = subprocess.Popen([sys.executable, "-m", "ftbench.cli", "sweep", str(path)], env=_env(), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while record_status(out / f"{sft.run_id}.json") != "completed":
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)  # between the stages (or early in the second)
    proc.wait()
    first = (out / f"{sft.run_id}.json").read_bytes()
    assert (out / sft.run_id / "weights" / "adapter_model.safetensors").is_file()
    res = subprocess.run([sys.executable, "-m", "ftbench.cli", "sweep", str(path)], env=_env(), cwd=tmp_path,
                         capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (out / f"{sft.run_id}.json").read_bytes() == first  # the finished stage was not redone
    assert f"] {sft.run_id}: ftbench" not in res.stdout and f"] {full.run_id}: ftbench" in res.stdout
    record = json.loads((out / f"{full.run_id}.json").read_text())
    assert record["train_info"]["status"] == "completed"
    # the record keeps the path relative to where the sweep ran (no folder of the machine in a record)
    assert record["train_info"]["backbone"]["init_from"] == os.path.join("results", sft.run_id, "weights")
