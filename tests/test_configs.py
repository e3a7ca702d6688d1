"""Every shipped YAML parses through the CLI (``--print_config``), so no config rots.

Files are found by glob when the tests are collected, so configs added later are picked up:

* ``configs/<dir>/*.yaml`` and ``experiments/**/<dir>/*.yaml`` with ``<dir>`` one of ``tuner``,
  ``objective``, ``optim``, ``data``, ``backbone``, ``trainer`` are values of ``--tuner``, ``--model``,
  ``--model.init_args.optimizer``, ``--data``, ``--backbone``, ``--trainer``;
* ``configs/sweeps/*.yaml`` (and ``experiments/**/sweeps/``) go through ``load_sweep``, and every run
  of the sweep through the CLI;
* any other YAML under ``experiments/`` is a sweep when it has ``base``/``grid``/``runs``, or a whole
  config (``--config``) when its top-level keys are the CLI's;
* anything else fails the test: a file nobody can tell how to use is a defect.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any, Optional

import pytest
import yaml

from ftbench.cli import cli_main

ROOT = Path(__file__).resolve().parent.parent
VALUE_DIRS = {"tuner": "tuner", "objective": "model", "optim": "model.init_args.optimizer", "data": "data",
              "backbone": "backbone", "trainer": "trainer"}
SWEEP_DIRS = {"sweeps"}
CONFIG_KEYS = {"seed_everything", "trainer", "model", "tuner", "data", "backbone", "out", "run_id", "save_weights",
               "test_after_fit", "validate_before_fit", "warmup_batches", "ckpt_path", "optimizer", "lr_scheduler"}
SWEEP_KEYS = {"base", "grid", "runs"}
# what a value file is combined with, so that the CLI has a whole run to parse
DEFAULTS = {"tuner": "configs/tuner/lora.yaml", "model": "configs/objective/sft.yaml",
            "data": "configs/data/instruction.yaml"}


def shipped_yaml() -> list[Path]:
    # run outputs (records, Lightning's log folders) under experiments/*/results/ (or a study's own out,
    # experiments/rlhf/family/) are not configs
    files = [p for d in ("configs", "experiments") for ext in ("yaml", "yml") for p in (ROOT / d).rglob(f"*.{ext}")
             if not {"results", "lightning_logs"} & set(p.relative_to(ROOT).parts)]
    return sorted(files)


def classify(path: Path) -> tuple[str, Optional[str]]:
    """``("value", key)``, ``("sweep", None)``, ``("config", None)`` or ``("unknown", reason)``."""
    rel = path.relative_to(ROOT)
    parent = path.parent.name
    if rel.parts[0] not in ("configs", "experiments"):
        return "unknown", f"{rel} is outside configs/ and experiments/"
    if parent in VALUE_DIRS:
        return "value", VALUE_DIRS[parent]
    if parent in SWEEP_DIRS:
        return "sweep", None
    if rel.parts[0] == "experiments":
        content = yaml.safe_load(path.read_text())
        if isinstance(content, dict) and content:
            if SWEEP_KEYS & set(content):
                return "sweep", None
            if set(content) <= CONFIG_KEYS:
                return "config", None
    return "unknown", (f"{rel}: not under configs/<{'|'.join([*VALUE_DIRS, *SWEEP_DIRS])}>/ and not a "
                       f"sweep or whole config under experiments/")


def print_config(argv: list[str]) -> dict[str, Any]:
    """Run the CLI with ``--print_config``; it must exit 0. Returns the printed config."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        cli_main([*argv, "--print_config"])
    assert e.value.code in (0, None), f"exit code {e.value.code} for {argv}"
    printed = yaml.safe_load(out.getvalue())
    assert isinstance(printed, dict) and "trainer" in printed
    return printed


@pytest.fixture(autouse=True)
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # configs refer to each other by relative path


FILES = shipped_yaml()


def test_configs_are_found():
    names = {str(p.relative_to(ROOT)) for p in FILES}
    assert {"configs/tuner/lora.yaml", "configs/tuner/full.yaml", "configs/tuner/none.yaml",
            "configs/tuner/freeze.yaml", "configs/objective/sft.yaml", "configs/optim/adamw.yaml",
            "configs/data/instruction.yaml", "configs/trainer/cpu.yaml", "configs/backbone/embedded.yaml",
            "configs/sweeps/quickstart.yaml"} <= names


def test_classifier_refuses_what_it_cannot_place(tmp_path):
    assert classify(ROOT / "configs/tuner/lora.yaml") == ("value", "tuner")
    assert classify(ROOT / "configs/objective/sft.yaml") == ("value", "model")
    assert classify(ROOT / "configs/sweeps/quickstart.yaml") == ("sweep", None)
    kind, reason = classify(ROOT / "configs/optimizers/adamw.yaml")
    assert kind == "unknown" and reason.startswith("configs/optimizers/adamw.yaml: ")


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(ROOT)) for p in FILES])
def test_shipped_yaml_parses_through_the_cli(path):
    kind, key = classify(path)
    assert kind != "unknown", key
    rel = str(path.relative_to(ROOT))
    content = yaml.safe_load(path.read_text())
    if kind == "value":
        argv = ["fit"]
        for k, default in DEFAULTS.items():
            if k != key:
                argv += [f"--{k}", default]
        printed = print_config(argv + [f"--{key}", rel])
        for part in key.split(".")[:-1]:
            printed = printed[part]
        key = key.split(".")[-1]
        if isinstance(content, dict) and "class_path" in content:
            # the class the file names is the one parsed, with the file's arguments
            assert printed[key]["class_path"].rsplit(".", 1)[-1] == content["class_path"].rsplit(".", 1)[-1]
            for arg, value in (content.get("init_args") or {}).items():
                if not isinstance(value, (dict, list)):
                    assert printed[key]["init_args"][arg] == value, f"{rel}: init_args.{arg}"
        elif isinstance(content, dict):
            for arg, value in content.items():
                if not isinstance(value, (dict, list)):
                    assert printed[key][arg] == value, f"{rel}: {arg}"
    elif kind == "config":
        print_config(["fit", "--config", rel])
    else:
        from ftbench.sweep.grid import load_sweep

        sweep = load_sweep(path)
        assert sweep.runs, f"{rel}: a sweep without runs"
        for run in sweep.runs:
            print_config(run.argv("/tmp/ftbench-print-config"))
