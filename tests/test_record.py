"""The one-record-per-run JSON, written by the real CLI (in-process) on the tiny model: every field
present and typed, real measurements, secrets redacted, and failed runs recorded with their error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest

from ftbench.bench.record import REDACTED, classify_error, redact
from ftbench.cli import cli_main
from ftbench.data.base import DataFormatError
from ftbench.objectives.step import NonFiniteLossError

SECRET = "sk-test-0123456789abcdef"


class KeyedCallback(L.Callback):
    """A callback configured with an API key, as a logger or tracker integration would be."""

    def __init__(self, api_key: str = "", project: str = "p"):
        self.api_key, self.project = api_key, project


def fit_args(tiny: Path, out: Path, *extra: str, method: str = "lora") -> list[str]:
    return ["fit", "--backbone.model", str(tiny), "--tuner", f"configs/tuner/{method}.yaml",
            "--model", "configs/objective/sft.yaml",
            "--data", "configs/data/instruction.yaml", "--trainer", "configs/trainer/cpu.yaml",
            "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
            "--data.init_args.builtin_size", "200", "--trainer.enable_progress_bar", "false",
            "--evaluate.max_new_tokens", "8",  # exact match needs only a few tokens here
            "--out", str(out), *extra]


def only_record(out: Path) -> dict[str, Any]:
    [path] = list(out.glob("*.json"))
    record = json.loads(path.read_text())
    assert path.stem == record["run_info"]["run_id"]
    return record


@pytest.fixture(scope="module")
def completed(tiny_model_dir, tmp_path_factory, monkeypatch_module):
    out = tmp_path_factory.mktemp("runs")
    callback = json.dumps({"class_path": f"{__name__}.KeyedCallback", "init_args": {"api_key": SECRET}})
    monkeypatch_module.chdir(Path(__file__).parent.parent)  # configs/ are relative to the repository
    cli_main(fit_args(tiny_model_dir, out, "--trainer.callbacks+", callback))
    return out, only_record(out)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def typed(d: dict, **types) -> None:
    for key, t in types.items():
        assert key in d, f"missing {key!r}"
        assert isinstance(d[key], t), f"{key!r} is {type(d[key]).__name__}, expected {t}"


def test_record_layout(completed):
    _, r = completed
    assert r["schema"] == 1
    typed(r, run_info=dict, train_info=dict, meta_info=dict)

    run = r["run_info"]
    typed(run, run_id=str, subcommand=str, config=dict, seed=int, created=str, updated=str)
    assert run["subcommand"] == "fit" and run["seed"] == 42
    assert run["run_id"].startswith("sft+lora-") and len(run["run_id"]) == len("sft+lora-") + 10
    cfg = run["config"]
    assert "__path__" not in json.dumps(cfg, default=str)  # where config files were read from is this machine's business
    assert cfg["model"]["class_path"] == "ftbench.objectives.SFT"
    assert cfg["tuner"]["init_args"]["peft_config"]["init_args"]["r"] == 16
    assert cfg["trainer"]["max_steps"] == 3 and cfg["data"]["init_args"]["builtin_size"] == 200

    info = r["train_info"]
    typed(info, status=str, method=str, params=dict, memory=dict, throughput=dict, metrics=list, final=dict,
          saved=dict, data=dict, backbone=dict, started=str, ended=str, fit_seconds=float, global_steps=int)
    assert info["status"] == "completed" and info["method"] == "sft+lora" and info["global_steps"] == 3
    assert info["params"] == {"trainable": 32_768, "total": 139_584 + 32_768,  # r=16: 2 x 16,384
                              "trainable_pct": pytest.approx(100 * 32_768 / 172_352)}
    assert info["backbone"]["model"] == info["backbone"]["resolved"] and info["backbone"]["dtype"] == "float32"
    # 200 rows: 2% val, 5% test; rows sharing a held-out prompt are held out with it (none dropped)
    assert info["data"]["rows"] == {"train": 186, "val": 4, "test": 10}
    assert info["data"]["truncation"] == {"policy": "truncate", "seen": 200, "truncated": 0, "dropped": 0}

    meta = r["meta_info"]
    typed(meta, versions=dict, git=dict, hardware=dict, python=str)
    for pkg in ("torch", "lightning", "transformers", "peft"):
        assert isinstance(meta["versions"][pkg], str)
    assert set(meta["git"]) == {"commit", "dirty"}
    assert len(meta["git"]["commit"]) == 40 and isinstance(meta["git"]["dirty"], bool)
    typed(meta["hardware"], cpu=str, cpu_count=int, torch_threads=int)


def test_record_measurements(completed):
    _, r = completed
    info = r["train_info"]
    mem = info["memory"]
    assert mem["device"] == "cpu" and isinstance(mem["peak_bytes"], int)
    assert mem["peak_bytes"] > 50 * 2**20  # a Python process with torch loaded: never a silent 0
    assert mem["source"] in ("VmHWM (reset at start)", "ru_maxrss (whole process)")
    tp = info["throughput"]
    assert tp["warmup_batches"] == 2 and tp["timed_batches"] == 1  # 3 steps, 2 left out
    assert tp["trained_tokens"] > 0 and tp["trained_tokens_per_s"] > 0
    assert tp["padded_tokens_per_s"] >= tp["trained_tokens_per_s"]
    assert 0 <= tp["padding_fraction"] < 1
    assert info["saved"]["bytes"] > 32_768 * 4 and info["saved"]["path"] is None  # fp32 adapter, not kept
    # one validation at step 3, then test: metrics carry loss, perplexity and exact match
    [entry] = info["metrics"]
    assert entry["step"] == 3 and entry["val/loss"] > 0 and "train/loss" in entry
    for key in ("val/loss", "val/accuracy", "test/loss", "test/accuracy", "test/perplexity", "test/macro_accuracy",
                "train/loss"):
        assert isinstance(info["final"][key], float), key
    assert "test_memory" in info and info["test_memory"]["peak_bytes"] > 0


def test_api_key_never_reaches_the_record(completed):
    out, r = completed
    callbacks = r["run_info"]["config"]["trainer"]["callbacks"]
    assert [c["init_args"]["api_key"] for c in callbacks] == [REDACTED]
    assert SECRET not in json.dumps(r)


def test_api_key_is_not_written_anywhere_in_the_run_folder(completed):
    """The record is not the only file a run leaves: the saved config and logger files must not keep it."""
    out, _ = completed
    leaks = [str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and SECRET in p.read_text(errors="ignore")]
    assert leaks == []


def test_redact():
    cfg = {"api_key": SECRET, "wandb": {"API-KEY": "k", "token": "t", "max_tokens": 5, "tokenizer": None},
           "list": [{"password": "pw", "secret_name": ""}], "hf_token": True, "lr": 1e-3, "name": "x"}
    assert redact(cfg) == {"api_key": REDACTED, "wandb": {"API-KEY": REDACTED, "token": REDACTED, "max_tokens": 5,
                                                           "tokenizer": None},
                           "list": [{"password": REDACTED, "secret_name": ""}], "hf_token": True, "lr": 1e-3,
                           "name": "x"}
    assert cfg["api_key"] == SECRET  # a copy; the input is untouched


def test_classify_error():
    assert classify_error(NonFiniteLossError(3, float("nan"))) == "nan"
    assert classify_error(MemoryError()) == "oom"
    assert classify_error(RuntimeError("CUDA out of memory. Tried to allocate")) == "oom"
    assert classify_error(ValueError("x")) == "failed"


def test_nan_loss_run_is_recorded(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).parent.parent)
    args = fit_args(tiny_model_dir, tmp_path, "--tuner.init_args.lr", "1e30",
                    "--model.init_args.warmup_steps", "0", "--trainer.max_steps", "5", method="full")
    with pytest.raises(NonFiniteLossError) as e:
        cli_main(args)
    r = only_record(tmp_path)
    info = r["train_info"]
    assert info["status"] == "nan"
    assert info["error"]["type"] == "NonFiniteLossError"
    assert info["error"]["message"] == str(e.value)
    assert info["error"]["message"].startswith("training loss is ") and info["error"]["message"].endswith(
        f" at step {e.value.step}")
    assert 1 <= e.value.step < 5 and info["global_steps"] == e.value.step
    assert "NonFiniteLossError" in info["error"]["traceback"]
    assert isinstance(info["last_metrics"], dict)
    assert "ended" in info and info["method"] == "sft+full"


def test_bad_data_run_is_recorded(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).parent.parent)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    out = tmp_path / "runs"
    with pytest.raises(DataFormatError):
        cli_main(fit_args(tiny_model_dir, out, "--data.init_args.source", str(bad)))
    r = only_record(out)
    info = r["train_info"]
    assert info["status"] == "failed"
    assert info["error"]["type"] == "DataFormatError"
    assert info["error"]["message"] == f"{bad}:2: field 'output': missing"
    assert info["global_steps"] == 0
    assert r["run_info"]["config"]["data"]["init_args"]["source"] == str(bad)
