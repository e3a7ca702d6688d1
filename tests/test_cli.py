"""The CLI: docstring help for every field, one shared backbone object, the run id, and bad values
refused at parse time."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from ftbench.cli import cli_main
from ftbench.runcli import read_run

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


def test_help_of_a_tuner_an_objective_and_a_data_module():
    code, out, _ = run_cli(["fit", "--tuner.help", "Freeze"])
    assert code == 0
    text = flat(out)
    assert ("--tuner.trainable_layers TRAINABLE_LAYERS How many of the last transformer blocks train "
            "(1 = the last block). (type: int, default: 1)") in text
    assert "--tuner.lr LR Learning rate this method trains with; when set it replaces the optimizer's ``lr``" in text
    code, out, _ = run_cli(["fit", "--model.help", "SFT"])
    assert code == 0
    text = flat(out)
    assert "--model.warmup_steps WARMUP_STEPS Linear warm-up steps of the schedule." in text
    assert "--model.generate_in_validation" not in text  # an evaluation option: --evaluate.generate_in_validation
    code, out, _ = run_cli(["fit", "--data.help", "InstructionData"])
    assert code == 0
    assert ("--data.truncation {truncate,drop} What to do with longer rows: ``truncate`` "
            "(cut the end) or ``drop``. Counted.") in flat(out)


def test_bad_values_are_refused_at_parse_time():
    code, _, err = run_cli(["fit", "--tuner", "configs/tuner/lora.yaml", "--model", "configs/objective/sft.yaml",
                            "--data", "configs/data/instruction.yaml", "--backbone.dtype", "float8"])
    assert code == 2
    assert "backbone.dtype" in err and "float8" in err
    code, _, err = run_cli(["fit", "--tuner", "configs/tuner/lora.yaml", "--model", "configs/objective/sft.yaml",
                            "--data", "configs/data/instruction.yaml", "--data.init_args.truncation", "wrap"])
    assert code == 2 and "wrap" in err


def test_one_backbone_and_tuner_object_is_shared(tiny_model_dir, tmp_path):
    cli = cli_main(["--backbone.model", str(tiny_model_dir), "--tuner", "configs/tuner/lora.yaml",
                    "--model", "configs/objective/sft.yaml", "--data", "configs/data/instruction.yaml",
                    "--trainer", "configs/trainer/cpu.yaml", "--out", str(tmp_path)], run=False)
    assert cli.model.backbone is cli.datamodule.backbone
    assert cli.model.backbone.model == str(tiny_model_dir)
    assert type(cli.model).__name__ == "SFT" and type(cli.model.tuner).__name__ == "Peft"
    assert cli.model.tuner.peft_config.r == 16 and cli.model.tuner.lr == 1e-3
    assert cli.model.method_label == "sft+lora"
    assert cli.run_id.startswith("sft+lora-")
    assert cli.trainer.default_root_dir == str(tmp_path / cli.run_id)
    assert not list(tmp_path.glob("*.json"))  # the record is written when the run starts, not before


def test_the_runs_seed_orders_the_training_data_and_the_split_stays(tiny_model_dir, tmp_path):
    def data(*extra):
        cli = cli_main(["--backbone.model", str(tiny_model_dir), "--tuner", "configs/tuner/lora.yaml",
                        "--model", "configs/objective/sft.yaml", "--data", "configs/data/instruction.yaml",
                        "--data.init_args.builtin_size", "60", "--trainer", "configs/trainer/cpu.yaml",
                        "--out", str(tmp_path), *extra], run=False)
        dm = cli.datamodule
        dm.setup("fit")
        order = [b["input_ids"][0].tolist() for b in dm.train_dataloader()]
        return dm, order, cli.run_config["data"]["init_args"]["order_seed"]

    default, order42, recorded = data()
    assert (default.seed, default.order_seed, recorded) == (42, 42, None)  # seed_everything defaults to 42
    seeded, order7, recorded = data("--seed_everything", "7")
    assert (seeded.seed, seeded.order_seed, recorded) == (42, 7, None)  # the record keeps it as given
    assert seeded.splits["test"] == default.splits["test"] and seeded.splits["val"] == default.splits["val"]
    assert order7 != order42
    given, _, recorded = data("--seed_everything", "7", "--data.init_args.order_seed", "3")
    assert (given.order_seed, recorded) == (3, 3)


def test_run_id_is_stable_and_ignores_what_is_not_a_setting():
    base = ["fit", "--model", "configs/objective/sft.yaml", "--tuner", "configs/tuner/lora.yaml",
            "--data", "configs/data/instruction.yaml", "--trainer.max_steps", "10", "--seed_everything", "1"]
    rid = read_run(base).run_id
    assert rid.startswith("sft+lora-") and len(rid) == len("sft+lora-") + 10
    # keys in another order, results elsewhere, another progress bar: the same run
    assert read_run(["fit", "--out", "elsewhere", "--trainer.enable_progress_bar", "false", *base[5:],
                     *base[1:5]]).run_id == rid
    # a value given equal to its default is no setting (lora_dropout 0.0 and beta-like defaults)
    assert read_run(base + ["--tuner.init_args.peft_config.init_args.lora_dropout", "0.0",
                            "--trainer.accelerator", "auto"]).run_id == rid
    assert read_run(["test", *base[1:]]).run_id != rid
    assert read_run(base + ["--seed_everything", "2"]).run_id != rid
    assert read_run(base + ["--tuner.init_args.peft_config.init_args.r", "8"]).run_id != rid
    assert read_run(base + ["--backbone.quantization", "nf4"]).run_id.startswith("sft+lora+nf4-")
    dora = read_run(base + ["--tuner.init_args.peft_config.init_args.use_dora", "true"])
    assert dora.label == "sft+dora" and dora.settings["tuner"]["init_args"]["peft_config"]["init_args"]["use_dora"]


def test_fit_and_the_same_sweep_point_get_the_same_run_id(tmp_path):
    """One definition of "the same run": ``ftbench fit ARGS`` and a sweep point with the same ARGS."""
    import yaml

    from ftbench.sweep.grid import load_sweep

    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({
        "base": {"backbone": str(ROOT / "configs/backbone/embedded.yaml"),
                 "objective": str(ROOT / "configs/objective/sft.yaml"),
                 "data": str(ROOT / "configs/data/instruction.yaml"),
                 "trainer": str(ROOT / "configs/trainer/cpu.yaml"), "trainer.max_steps": 7},
        "grid": {"tuner": [str(ROOT / "configs/tuner/lora.yaml"), str(ROOT / "configs/tuner/full.yaml")],
                 "lr": [3.0e-4]},
    }))
    points = load_sweep(sweep).runs
    for point in points:
        argv = [a for a in point.argv("elsewhere") if a not in ("--run_id", point.run_id)]
        assert read_run(argv).run_id == point.run_id
    # as a user types it: relative paths from the repository root, keys in another order
    typed = ["fit", "--trainer", "configs/trainer/cpu.yaml", "--tuner", "configs/tuner/lora.yaml",
             "--backbone", "configs/backbone/embedded.yaml", "--model", "configs/objective/sft.yaml",
             "--data", "configs/data/instruction.yaml", "--trainer.max_steps", "7", "--tuner.init_args.lr", "3.0e-4",
             "--out", "runs"]
    assert read_run(typed).run_id == points[0].run_id
