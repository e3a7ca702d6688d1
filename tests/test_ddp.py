"""One run on several processes: a 2-process DDP fit on CPU (gloo) with the shipped ddp.yaml.

Lightning's DDP launcher starts the other rank by re-running the command line, so the fit runs as
``python -m ftbench.cli fit`` in a subprocess (as ``ftbench sweep`` runs it), never inside pytest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ["--data", str(ROOT / "configs" / "data" / "instruction.yaml"), "--data.init_args.builtin_size", "60",
        "--data.init_args.val_fraction", "0.1", "--data.init_args.max_length", "64", "--data.init_args.batch_size", "2"]
LORA = ["--tuner", "ftbench.tuners.Peft", "--tuner.init_args.peft_config", "peft.LoraConfig",
        "--tuner.init_args.peft_config.init_args.r", "4", "--tuner.init_args.peft_config.init_args.target_modules",
        "all-linear", "--model", "ftbench.objectives.SFT", "--evaluate.generate_in_validation", "false",
        "--model.init_args.warmup_steps", "0"]


def test_two_process_ddp_fit_on_cpu(tmp_path, tiny_model_dir):
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "ftbench.cli", "fit", "--backbone.model", str(tiny_model_dir), *LORA, *DATA,
           "--trainer", str(ROOT / "configs" / "trainer" / "ddp.yaml"), "--trainer.accelerator", "cpu",
           "--trainer.devices", "2", "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
           "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0", "--trainer.logger", "false",
           "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
           "--test_after_fit", "false", "--warmup_batches", "1", "--out", str(out), "--run_id", "ddp-run"]
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline", PYTHONPATH=str(ROOT), MASTER_PORT=str(29500 + os.getpid() % 2000))
    res = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)  # a collective mismatch hangs
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-4000:]
    # one record, written by rank 0 only (one summary line; no stray temporary files from rank 1)
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["ddp-run.json"]
    assert log.count("[ftbench] ddp-run:") == 1
    rec = json.loads((out / "ddp-run.json").read_text())
    info = rec["train_info"]
    assert info["status"] == "completed" and info["world_size"] == 2 and info["global_steps"] == 3
    assert rec["run_info"]["config"]["trainer"]["strategy"] == "ddp"
    assert str(rec["run_info"]["config"]["trainer"]["devices"]) == "2"  # the CLI keeps "2" (devices is int|str|list)
    # LoRA r=4 on q,o (64->64), k,v (64->32), gate,up (64->128), down (128->64), 2 layers:
    # 4 x (128 + 96 + 96 + 128 + 192 + 192 + 192) x 2 = 8,192 (the same on both ranks)
    assert info["params"]["trainable"] == 8192
    # each rank trained 3 steps of 2 rows; rank 0 counts its own trained tokens
    assert info["throughput"]["timed_batches"] == 2 and info["throughput"]["trained_tokens"] > 0
    assert len(info["metrics"]) == 1 and info["metrics"][0]["step"] == 3 and "val/loss" in info["metrics"][0]
