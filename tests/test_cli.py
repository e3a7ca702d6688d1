"""The CLI: docstring help for every field, one shared backbone object, the run id, and bad values
refused at parse time."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from ftbench.cli import cli_main, run_id_for

ROOT = Path(__file__).resolve().parent.parent


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        cli_main(argv)
    return e.value.code, out.getvalue(), err.getvalue()


def flat(text: str) -> str:
    """argparse wraps help text; compare with white space folded."""
    return " ".join(text.split())


@pytest.fixture(autouse=True)
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def test_help_shows_backbone_docstrings():
    code, out, _ = run_cli(["fit", "--help"])
    assert code == 0
    text = flat(out)
    assert ("--backbone.trust_remote_code {true,false} Run code shipped with a hub model. "
            "Off unless a config turns it on. (type: bool, default: False)") in text
    assert "--backbone.model MODEL Local folder, Hugging Face hub id, path to a ``.gguf`` file, or ``embedded``" in text
    assert "--backbone.dtype {float32,bfloat16,float16} Dtype the weights are stored in" in text
    assert "--backbone.quantization {none,nf4,fp4,int8}" in text
    assert "--out OUT Directory of the run records. (type: str, default: runs)" in text
    assert "--warmup_batches WARMUP_BATCHES Training batches left out of the throughput figures." in text


def test_help_of_a_method_and_a_data_module():
    code, out, _ = run_cli(["fit", "--model.help", "LoRA"])
    assert code == 0
    text = flat(out)
    assert "--model.r R Rank of the update matrices. (type: int, default: 8)" in text
    assert "--model.warmup_steps WARMUP_STEPS Linear warm-up steps of the schedule." in text
    code, out, _ = run_cli(["fit", "--data.help", "InstructionData"])
    assert code == 0
    assert ("--data.truncation {truncate,drop} What to do with longer rows: ``truncate`` "
            "(cut the end) or ``drop``. Counted.") in flat(out)


def test_bad_values_are_refused_at_parse_time():
    code, _, err = run_cli(["fit", "--model", "configs/method/lora.yaml", "--data", "configs/data/instruction.yaml",
                            "--backbone.dtype", "float8"])
    assert code == 2
    assert "backbone.dtype" in err and "float8" in err
    code, _, err = run_cli(["fit", "--model", "configs/method/lora.yaml", "--data", "configs/data/instruction.yaml",
                            "--data.init_args.truncation", "wrap"])
    assert code == 2 and "wrap" in err


def test_one_backbone_object_is_shared(tiny_model_dir, tmp_path):
    cli = cli_main(["--backbone.model", str(tiny_model_dir), "--model", "configs/method/lora.yaml",
                    "--data", "configs/data/instruction.yaml", "--trainer", "configs/trainer/cpu.yaml",
                    "--out", str(tmp_path)], run=False)
    assert cli.model.backbone is cli.datamodule.backbone
    assert cli.model.backbone.model == str(tiny_model_dir)
    assert type(cli.model).__name__ == "LoRA" and cli.model.r == 16
    assert cli.trainer.default_root_dir == str(tmp_path / cli.run_id)
    assert not list(tmp_path.glob("*.json"))  # the record is written when the run starts, not before


def test_run_id_is_stable_and_ignores_where_results_go():
    a = {"model": {"class_path": "ftbench.methods.LoRA", "init_args": {"r": 8, "alpha": 16}},
         "trainer": {"max_steps": 10, "enable_progress_bar": True}, "out": "runs", "seed_everything": 1}
    b = {"seed_everything": 1, "out": "elsewhere",
         "trainer": {"enable_progress_bar": False, "max_steps": 10},
         "model": {"init_args": {"alpha": 16, "r": 8}, "class_path": "ftbench.methods.LoRA"}}
    rid = run_id_for(a, "fit")
    assert rid == run_id_for(b, "fit")
    assert rid.startswith("lora-") and len(rid) == len("lora-") + 10
    assert run_id_for(a, "test") != rid
    assert run_id_for({**a, "seed_everything": 2}, "fit") != rid
    c = {**a, "model": {"class_path": "ftbench.methods.LoRA", "init_args": {"r": 16, "alpha": 16}}}
    assert run_id_for(c, "fit") != rid
