"""Every shipped tuner config (configs/tuner/*.yaml) runs once with its shipped defaults: ``ftbench fit``
(2 steps and a validation with exact match) then ``test`` (exact match by greedy generation), through
the CLI with configs/objective/sft.yaml on the tiny Llama. A parse (tests/test_configs.py) cannot catch
a default that crashes at run time, e.g. prompt and prefix tuning once failed at test time because the
evaluation's ``max_new_tokens: null`` reached their greedy loop unresolved.

The shipped generation budget (``evaluate.max_new_tokens: null``: the data module's longest answer)
is left as it ships; only the run's size is cut (80 built-in rows, batch 4, 2 steps, one validation
and one test batch). ``none`` (nothing trains) is run as it is meant to be, with ``ftbench test``.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TUNERS = sorted(p.stem for p in (ROOT / "configs" / "tuner").glob("*.yaml"))
# (prompt tuning's shipped ``prompt_tuning_init: RANDOM`` is a str enum in peft: the saved config.yaml
# and the record write its value)
TRAINED = [n for n in TUNERS if n != "none"]
FIT = ("--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1")


def run(subcommand: str, tuner: str, model_dir: Path, out: Path, *extra: str, execute: bool = True):
    from ftbench.cli import cli_main

    given = [subcommand] if execute else []  # without a subcommand: build everything, run nothing
    return cli_main([*given, "--backbone.model", str(model_dir),
                     "--tuner", str(ROOT / "configs/tuner" / f"{tuner}.yaml"),
                     "--model", str(ROOT / "configs/objective/sft.yaml"),
                     "--data", str(ROOT / "configs/data/instruction.yaml"), "--data.init_args.builtin_size", "80",
                     "--data.init_args.max_length", "96", "--data.init_args.batch_size", "4",
                     "--data.init_args.eval_batch_size", "4",
                     "--trainer", str(ROOT / "configs/trainer/cpu.yaml"), "--trainer.limit_test_batches", "1",
                     "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
                     "--trainer.enable_model_summary", "false", "--out", str(out), "--run_id", tuner, *extra],
                    run=execute)


def test_every_tuner_config_is_covered():
    assert {"full", "freeze", "lora", "none", "adapter_houlsby", "prefix_tuning", "prompt_tuning"} <= set(TUNERS)


def check_metrics(final: dict) -> None:
    for key in ("val/loss", "val/accuracy", "test/loss", "test/accuracy", "train/loss"):
        assert math.isfinite(final[key]), (key, final)
    assert 0.0 <= final["test/accuracy"] <= 1.0


def check_trained(m) -> None:
    """The shipped learning rate moved something in 2 steps (the first at warm-up lr 0, the second at lr/5)."""
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    plain = m.backbone.load_model().eval()
    m.model.eval()
    with torch.no_grad():
        assert not torch.equal(m(ids, torch.ones_like(ids)), plain(input_ids=ids, use_cache=False).logits)


@pytest.mark.parametrize("name", TRAINED)
def test_shipped_tuner_fits_and_tests(tiny_model_dir, tmp_path, name):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # EVA's SVD wants r x rho = 32 trained positions in a batch: 8 rows of the tiny data have them
        cli = run("fit", name, tiny_model_dir, tmp_path, *FIT,
                  *(("--data.init_args.batch_size", "8") if name == "eva" else ()))
    if name == "adalora":  # its shipped total_step follows configs/trainer/cpu.yaml's 60 steps, not these 2
        assert any("total_step=60 but the trainer will take 2" in str(w.message) for w in caught)
    info = json.loads((tmp_path / f"{name}.json").read_text())["train_info"]
    assert info["status"] == "completed" and info["global_steps"] == 2
    assert info["method"] == f"sft+{cli.model.tuner.name}" and info["params"]["trainable"] > 0
    check_metrics(info["final"])
    check_trained(cli.model)


def test_none_tests_the_backbone_and_refuses_to_fit(tiny_model_dir, tmp_path):
    run("test", "none", tiny_model_dir, tmp_path)
    info = json.loads((tmp_path / "none.json").read_text())["train_info"]
    assert info["method"] == "sft+none" and info["params"]["trainable"] == 0
    assert math.isfinite(info["final"]["test/loss"]) and 0.0 <= info["final"]["test/accuracy"] <= 1.0
    with pytest.raises(ValueError, match=r"sft\+none: nothing to train"):
        run("fit", "none", tiny_model_dir, tmp_path / "fit", "--trainer.max_steps", "1")
