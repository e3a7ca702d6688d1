"""scripts/gpu_check.py runs on a CPU with a tiny model (--tiny), the same path a GPU user runs, so it
cannot rot: random-initialised fits with the estimate beside them, host syncs counted, the quickstart
run and the summary; and every point of the GPU plan parses through the run's own parser."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


def test_the_tiny_check_runs_end_to_end(gpu_check, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "check"
    assert gpu_check.main([str(out), "--tiny", "--in-process", "--methods", "lora", "--batch-sizes", "2",
                           "--steps", "4"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    [row] = summary["rows"]
    assert (row["model"], row["method"], row["batch"], row["status"]) == ("tiny", "lora", 2, "ok")
    # the estimate of the same settings (bf16 weights, bf16-true, batch 2 x 32 tokens), to the byte, and
    # the run's own tensors measured at its third batch
    assert summary["estimates"]["tiny-lora-b2"]["predicted_peak_bytes"] == 1_117_040
    assert row["estimate_over_run_breakdown"] == pytest.approx(0.99771, abs=1e-4)
    assert row["allocated_mib"] is None and row["cuda_syncs_per_step"] is None  # no CUDA here
    assert row["tokens_per_s"] > 0
    # one LoRA step's value reads on the CPU: AdamW's step counter for each of the 28 LoRA matrices, transformers'
    # packed-sequence check of the position ids, the finite-loss check (on CUDA it reads every 50 steps), the
    # throughput callback's trained-token count (an int on CPU; on CUDA added on the device, read at the end)
    assert (row["device_reads_per_step"], row["host_reads_per_step"]) == (0, 31)
    record = json.loads((out / "records" / "tiny-lora-b2.json").read_text())
    assert record["run_info"]["settings"]["backbone"]["random_init"] is True
    assert record["train_info"]["backbone"]["random_init"] is True
    assert record["train_info"]["host_syncs"]["host_read_sites"] == {
        "_local_scalar_dense at precision/precision.py:123": 28,
        "_local_scalar_dense at transformers/masking_utils.py:761": 1,
        "_local_scalar_dense at objectives/step.py:66": 1, "_local_scalar_dense at bench/measure.py:333": 1}
    assert "final" in record["train_info"] and not any(k.startswith("test/") for k in record["train_info"]["final"])
    # the quickstart LoRA run on the tiny model with weights (fp32, 2 steps): its pinned test figures
    quick = summary["quickstart"]
    assert quick["status"] == "completed" and quick["exact_match"] == 0.0
    assert quick["test_loss"] == pytest.approx(6.264102, abs=1e-4)
    text = (out / "summary.md").read_text()
    assert "| tiny | lora | 2 | ok | 1.1 | – | – | – | – | 1.1 | 0.998 |" in text
    # a rerun into the same folder reuses the completed records
    assert gpu_check.main([str(out), "--tiny", "--in-process", "--methods", "lora", "--batch-sizes", "2",
                           "--steps", "4"]) == 0
    assert json.loads((out / "summary.json").read_text())["rows"][0]["status"] == "reused"


def test_every_point_of_the_gpu_plan_parses(gpu_check, tmp_path, monkeypatch):
    """The default plan (24 fits on configs/models/) as the run's parser reads it: no GPU needed."""
    from ftbench.config_reading import identity
    from ftbench.runcli import parse_run, run_parser, validation_problem

    monkeypatch.chdir(ROOT)
    args = gpu_check.parse_args([str(tmp_path)])
    models = {n: (str(ROOT / "configs" / "models" / n), b) for n, b in gpu_check.MODELS.items()}
    points = gpu_check.plan(args, models)
    assert len(points) == 24 and {p.method for p in points} == set(gpu_check.METHODS)
    labels = set()
    for p in {(p.model, p.method): p for p in points}.values():  # the batch size is one number of the argv
        config = parse_run(gpu_check.fit_argv(p, args, tmp_path / "records", None))
        assert validation_problem(config) is None, p.run_id
        labels.add(identity(run_parser(), config).label)
    assert labels == {"sft+full", "sft+lora", "sft+lora+nf4"}


def test_the_shipped_model_configs_have_the_real_shapes():
    """Parameter counts of Qwen2-0.5B, Qwen2-1.5B and Llama-3.2-1B (their vocabularies: the logits'
    memory is the real one), built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    counts = {}
    for name in ("qwen2-0.5b", "qwen2-1.5b", "llama-3.2-1b"):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ROOT / "configs" / "models" / name))
        counts[name] = sum(p.numel() for p in model.parameters())
    assert counts == {"qwen2-0.5b": 494_032_768, "qwen2-1.5b": 1_543_714_304, "llama-3.2-1b": 1_235_814_400}


def test_without_a_gpu_it_says_so(gpu_check, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    assert gpu_check.main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        "gpu_check: needs a CUDA GPU (torch.cuda.is_available() is False here); --tiny runs the same path on a CPU "
        "with a tiny model")
