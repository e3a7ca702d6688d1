"""Issue 18, the data modules: a setting that cannot work ends the real CLI (a subprocess, as a user
runs it) in exit status 2 and one ``ftbench: error:`` line that names the option (at most one
``ftbench: hint:`` line more), never a traceback. Each value fails while the data module is built or
set up, before any training step, so the file stays fast."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# (data config, objective, bad option, bad value, the start of the one error line)
CASES = [
    ("instruction", "sft", "metrics", "[{metric: exact_match, regex: '('}]", "ftbench: error: data.metrics[0]: regex '(' does not compile"),
    ("domain", "sft", "max_length", "1", "ftbench: error: data.max_length: must be at least 2, got 1"),
    ("multitask", "sft", "temperature", "0", "ftbench: error: data.temperature: must be > 0, got 0"),
    ("preference", "dpo", "val_fraction", "1.5", "ftbench: error: data.val_fraction: must be in [0, 1), got 1.5"),
]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "FTBENCH_TRACEBACK"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env


@pytest.mark.parametrize("data, objective, option, value, expected", CASES, ids=[c[0] for c in CASES])
def test_a_bad_data_setting_is_one_line(data, objective, option, value, expected, tiny_model_dir, tmp_path):
    argv = [sys.executable, "-m", "ftbench.cli", "fit", "--backbone.model", str(tiny_model_dir),
            "--tuner", "configs/tuner/lora.yaml", "--model", f"configs/objective/{objective}.yaml",
            "--data", f"configs/data/{data}.yaml", f"--data.init_args.{option}", value,
            "--trainer", "configs/trainer/cpu.yaml", "--trainer.max_steps", "1", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--out", str(tmp_path / "out")]
    res = subprocess.run(argv, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr + res.stdout
    # a library may warn on stderr (bitsandbytes without its CPU kernels); ftbench's own lines are these
    lines = [line for line in res.stderr.splitlines() if line.startswith("ftbench: ")]
    assert lines and lines[0].startswith(expected), res.stderr[-3000:]
    assert len(lines) == 1 or (len(lines) == 2 and lines[1].startswith("ftbench: hint: ")), res.stderr[-3000:]
