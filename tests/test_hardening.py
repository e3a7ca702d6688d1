"""A hostile user's inputs: known errors end in one line (no traceback), nothing finished is lost,
sweeps are checked before they run, and W&B never blocks a run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ftbench.cli import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("FTBENCH_TRACEBACK", raising=False)


def fit_argv(tiny: Path, out: Path, *extra: str, tuner: str = "lora",
             data: str = "configs/data/instruction.yaml") -> list[str]:
    return ["fit", "--backbone.model", str(tiny), "--tuner", f"configs/tuner/{tuner}.yaml",
            "--model", "configs/objective/sft.yaml", "--data", data,
            "--data.init_args.builtin_size", "60", "--data.init_args.batch_size", "4",
            "--trainer", "configs/trainer/cpu.yaml", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
            "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
            "--test_after_fit", "false", "--out", str(out), *extra]


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    """``ftbench ARGV`` in this process: (exit status, stderr). An exception that escapes is a traceback."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code, capsys.readouterr().err


def last_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("ftbench: ")]
    assert lines, err[-2000:]
    return lines[0]


def bad_file(tmp: Path, name: str, content: bytes) -> str:
    path = tmp / name
    path.write_bytes(content)
    return str(path)


# ---------------------------------------------------------------------------- one-line errors
CASES = {
    "malformed JSON": (lambda t: ["--data.init_args.source", bad_file(t, "d.jsonl", b'{"instruction": "a", "output": "b"}\n{oops\n')],
                       "d.jsonl:2: invalid JSON: Expecting property name enclosed in double quotes (column 2)"),
    "missing field": (lambda t: ["--data.init_args.source", bad_file(t, "m.jsonl", b'{"instruction": "a"}\n')],
                      "m.jsonl:1: field 'output': missing"),
    "empty file": (lambda t: ["--data.init_args.source", bad_file(t, "e.jsonl", b"")], "e.jsonl: no rows (the file is empty)"),
    "not UTF-8": (lambda t: ["--data.init_args.source", bad_file(t, "u.jsonl", b'{"instruction": "\xff"}\n')],
                  "u.jsonl:1: not UTF-8 (byte 0xff)"),
    "bad model path": (lambda t: ["--backbone.model", str(t / "nowhere")], "is neither an existing folder, a .gguf file"),
    "not a GGUF": (lambda t: ["--backbone.model", bad_file(t, "x.gguf", b"not gguf")], "backbone.model: cannot read GGUF file"),
    "negative tuner lr": (lambda t: ["--tuner.init_args.lr", "-0.1"], "tuner.lr must be a positive finite number, got -0.1"),
    "negative optimizer lr": (lambda t: ["--tuner.init_args.lr", "null", "--model.init_args.optimizer.init_args.lr", "-1"],
                              "model.init_args.optimizer: Invalid learning rate: -1.0"),
    "max_steps 0": (lambda t: ["--trainer.max_steps", "0"], "trainer.max_steps: 0 trains nothing"),
    "--out is a file": (lambda t: ["--out", bad_file(t, "f.txt", b"x")], "f.txt: exists and is not a folder"),
    "--out not writable": (lambda t: ["--out", "/proc/x"], "--out /proc/x: cannot write there"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_known_errors_end_in_one_line(case, tiny_model_dir, tmp_path, capsys):
    extra, message = CASES[case]
    out = tmp_path / "runs"
    code, err = run_main(fit_argv(tiny_model_dir, out) + extra(tmp_path), capsys)
    assert code == 2
    assert "Traceback" not in err
    line = last_line(err)
    assert line.startswith("ftbench: error: ") and message in line, line


def test_full_fine_tuning_on_a_4bit_backbone_is_one_line(tiny_model_dir, tmp_path, capsys):
    code, err = run_main(fit_argv(tiny_model_dir, tmp_path, "--backbone.quantization", "nf4", tuner="full"), capsys)
    assert code == 2 and "Traceback" not in err
    assert last_line(err) == ("ftbench: error: tuner full: a nf4 backbone cannot train its own weights (quantized "
                              "weights take no gradient); use backbone.quantization: none, or LoRA on it (QLoRA)")
    record = json.loads(next(tmp_path.glob("*.json")).read_text())  # the run's record keeps the traceback
    assert record["train_info"]["status"] == "failed" and "Traceback" in record["train_info"]["error"]["traceback"]


def test_traceback_on_request(tiny_model_dir, tmp_path):
    from ftbench.errors import ConfigError

    with pytest.raises(ConfigError):
        main(fit_argv(tiny_model_dir, tmp_path, "--trainer.max_steps", "0", "--traceback"))
    os.environ.pop("FTBENCH_TRACEBACK", None)


def test_misspelt_option_is_not_taken_for_a_prefix(tiny_model_dir, tmp_path, capsys):
    code, err = run_main(fit_argv(tiny_model_dir, tmp_path, "--trainer.max_step", "5"), capsys)
    assert code == 2 and "unrecognized arguments: --trainer.max_step 5" in err
    assert not list(tmp_path.glob("*.json"))


# ---------------------------------------------------------------------------- no record destroyed
def test_a_completed_record_survives_a_rerun(tiny_model_dir, tmp_path, capsys):
    argv = fit_argv(tiny_model_dir, tmp_path)
    main(argv)
    (record,) = tmp_path.glob("*.json")
    before = record.read_bytes()
    assert json.loads(before)["train_info"]["status"] == "completed"
    code, err = run_main(argv, capsys)
    assert code == 2
    assert last_line(err) == (f"ftbench: error: {record}: this run has a completed record; running it again "
                              "would replace it")
    assert "ftbench: hint: add --overwrite true to replace it, or give another --out" in err
    assert record.read_bytes() == before  # byte for byte
    main(argv + ["--overwrite", "true"])  # asked for: replaced by the new, completed run
    assert json.loads(record.read_text())["train_info"]["status"] == "completed" and record.read_bytes() != before


# ---------------------------------------------------------------------------- sweeps
def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env


def test_sweep_with_bad_keys_is_refused_before_any_run(tmp_path, tiny_model_dir):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({
        "out": str(tmp_path / "results"),
        "base": {"backbone.model": str(tiny_model_dir), "objective": str(ROOT / "configs/objective/sft.yaml"),
                 "data": str(ROOT / "configs/data/instruction.yaml"), "trainer": str(ROOT / "configs/trainer/cpu.yaml")},
        "grid": {"tuner": [str(ROOT / "configs/tuner/lora.yaml"), str(ROOT / "configs/tuner/full.yaml")],
                 "trainer.max_step": [3]},
        "runs": [{"tuner": str(ROOT / "configs/tuner/none.yaml"), "tuner.init_args.r": 4}],
    }))
    res = subprocess.run([sys.executable, "-m", "ftbench.cli", "sweep", str(sweep)], env=_env(), cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stdout + res.stderr
    assert f"error: {sweep}: 3 point(s) do not parse; nothing was run:" in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.startswith("  point ")]
    assert len(lines) == 3
    assert lines[0].endswith("trainer.max_step=3, tuner=lora): unrecognized arguments: --trainer.max_step 3")
    assert lines[1].endswith("trainer.max_step=3, tuner=full): unrecognized arguments: --trainer.max_step 3")
    assert "tuner=none, tuner.init_args.r=4): " in lines[2] and "Option 'r' is not accepted" in lines[2]
    assert not (tmp_path / "results").exists() or not list((tmp_path / "results").glob("*.json"))


def test_runs_without_a_grid_run_no_bare_base_and_infinity_is_refused(tmp_path):
    from ftbench.sweep.grid import SweepError, load_sweep

    (tmp_path / "a.yaml").write_text("base: {trainer.max_steps: 2}\nruns:\n  - {seed: 1}\n  - {seed: 2}\n")
    assert [r.overrides.get("seed_everything") for r in load_sweep(tmp_path / "a.yaml").runs] == [1, 2]
    (tmp_path / "b.yaml").write_text("base: {trainer.max_steps: 2}\n")
    assert len(load_sweep(tmp_path / "b.yaml").runs) == 1  # the base alone is the one point
    (tmp_path / "c.yaml").write_text("grid: {lr: [.inf, 1.0e-3]}\n")
    with pytest.raises(SweepError) as e:
        load_sweep(tmp_path / "c.yaml")
    assert str(e.value) == f"{tmp_path / 'c.yaml'}: grid.lr: [inf, 0.001] is not a finite number"


def test_sweep_refuses_an_unwritable_out(tmp_path, monkeypatch, capsys):
    import ftbench.sweep.cli as sweep_cli
    from ftbench.sweep.grid import load_sweep

    (tmp_path / "file").write_text("x")
    sweep = tmp_path / "s.yaml"
    sweep.write_text(f"out: {tmp_path / 'file'}\nbase: {{trainer.max_steps: 2}}\n")
    monkeypatch.setattr(sweep_cli, "check_points", lambda sweep, runs: [])  # the parse is tested above
    assert sweep_cli.run_sweep(load_sweep(sweep)) == 2
    assert f"error: --out {tmp_path / 'file'}: exists and is not a folder" in capsys.readouterr().err


# ---------------------------------------------------------------------------- W&B
def test_wandb_with_a_key_and_no_server_goes_offline_quickly(capsys):
    from ftbench.wandb_mode import offline_unless_reachable

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"WANDB_API_KEY": "k" * 40, "WANDB_BASE_URL": f"http://127.0.0.1:{port}"}
    t0 = time.monotonic()
    offline_unless_reachable(env)
    assert time.monotonic() - t0 < 3.5
    assert env["WANDB_MODE"] == "offline"
    assert f"ftbench: warning: W&B server http://127.0.0.1:{port} did not answer within 3 s: logging offline" in capsys.readouterr().err
    without_key: dict[str, str] = {}
    offline_unless_reachable(without_key)
    # offline, and every W&B call bounded (ftbench.wandb_mode.WANDB_BOUNDS: init 30 s, service 30 s, http 10 s, finish 60 s)
    assert without_key == {"WANDB_MODE": "offline", "WANDB_INIT_TIMEOUT": "30", "WANDB__SERVICE_WAIT": "30",
                           "WANDB_HTTP_TIMEOUT": "10", "WANDB_FINISH_TIMEOUT": "60"}
    explicit = {"WANDB_API_KEY": "k", "WANDB_MODE": "disabled"}
    offline_unless_reachable(explicit)
    assert explicit["WANDB_MODE"] == "disabled"


def test_no_test_rows_is_said_not_hidden(tiny_model_dir, tmp_path, capsys):
    argv = fit_argv(tiny_model_dir, tmp_path, "--data.init_args.test_fraction", "0")
    argv[argv.index("--test_after_fit") + 1] = "true"
    main(argv)
    assert ("ftbench: warning: the data has no test rows (test_fraction 0 and no test_source): no test metrics, and "
            "the report's exact match column stays empty for this run") in capsys.readouterr().err
    (record,) = tmp_path.glob("*.json")
    final = json.loads(record.read_text())["train_info"]["final"]
    assert not [k for k in final if k.startswith("test/")] and "val/loss" in final
