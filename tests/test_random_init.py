"""``backbone.random_init``: a folder with only a ``config.json`` trains from seeded random weights
(memory and speed checks, scaling studies), and no study reports such a run's accuracy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ftbench.backbone import Backbone
from ftbench.cli import main
from ftbench.errors import BackboneError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def config_only(tiny_model_dir, tmp_path) -> Path:
    """The tiny model's config and tokenizer, no weights."""
    folder = tmp_path / "tiny-config"
    folder.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, folder / f.name)
    return folder


def error_of(fn) -> str:
    with pytest.raises(BackboneError) as e:
        fn()
    return str(e.value)


def test_random_weights_are_seeded_in_the_backbone_dtype_and_leave_the_generator_alone(config_only, tmp_path):
    before = torch.get_rng_state()
    b = Backbone(model=str(config_only), random_init=True, dtype="bfloat16", cache_dir=str(tmp_path / "cache"))
    model = b.load_model()
    assert torch.equal(torch.get_rng_state(), before)  # the run's seed still drives LoRA, dropout, data order
    assert type(model).__name__ == "LlamaForCausalLM" and {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert sum(p.numel() for p in model.parameters()) == 139_584  # the tiny config's 2 x 64-dim layers + 512 vocab
    # from_config's initialisation with seed 0 (ftbench.random_init.SEED), pinned
    assert float(model.model.embed_tokens.weight.detach().float().sum()) == pytest.approx(-6.853582382202148, abs=1e-4)
    again = Backbone(model=str(config_only), random_init=True, dtype="bfloat16", cache_dir=str(tmp_path / "cache"))
    assert torch.equal(again.load_model().lm_head.weight, model.lm_head.weight)  # built once, cached
    assert len(list((tmp_path / "cache" / "random").iterdir())) == 1
    # the folder's own tokenizer; the record says random_init
    assert b.tokenizer.convert_tokens_to_ids("<pad>") == model.config.pad_token_id
    assert b.describe()["random_init"] is True and Backbone().describe()["random_init"] is False
    # a score head on random weights (a reward model's memory): the same loading path
    assert type(b.load_model(head="score")).__name__ == "LlamaForSequenceClassification"


def test_a_tokenizer_given_apart_and_one_larger_than_the_vocabulary(tiny_model_dir, tmp_path):
    folder = tmp_path / "bare"
    folder.mkdir()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config))
    b = Backbone(model=str(folder), tokenizer=str(tiny_model_dir), random_init=True, cache_dir=str(tmp_path / "c"))
    assert b.load_model().config.vocab_size == len(b.tokenizer)
    small = tmp_path / "small"
    small.mkdir()
    (small / "config.json").write_text(json.dumps({**config, "vocab_size": 100}))
    b = Backbone(model=str(small), tokenizer=str(tiny_model_dir), random_init=True, cache_dir=str(tmp_path / "c"))
    assert error_of(b.load_model) == (
        f"backbone.random_init: the tokenizer has {len(b.tokenizer)} tokens, more than the vocab_size 100 of "
        f"{str(small)!r}: its ids would index outside the embedding")


def test_random_init_errors(tiny_model_dir, tmp_path):
    assert error_of(Backbone(model="embedded", random_init=True).load_model) == (
        "backbone.random_init: needs backbone.model to be a folder with a config.json, got 'embedded'")
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    msg = error_of(Backbone(model=str(tmp_path), tokenizer=str(tiny_model_dir), random_init=True).load_model)
    assert msg.startswith(f"backbone.model: cannot read the config of {str(tmp_path)!r}: ")
    assert "no-such-architecture" in msg


# ---------------------------------------------------------------------------- a run of random weights
def argv(model: Path, out: Path, *extra: str, subcommand: str = "fit") -> list[str]:
    return [subcommand, "--backbone.model", str(model), "--backbone.random_init", "true",
            "--tuner", "configs/tuner/lora.yaml", "--model", "configs/objective/sft.yaml",
            "--data", "configs/data/instruction.yaml", "--data.init_args.builtin_size", "60",
            "--trainer", "configs/trainer/cpu.yaml", "--trainer.max_steps", "1", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--out", str(out), *extra]


@pytest.mark.parametrize("extra, subcommand, refusal", [
    ((), "fit", "set --test_after_fit false"),
    (("--test_after_fit", "false"), "fit", "set --evaluate.generate_in_validation false (validation keeps its loss)"),
    (("--test_after_fit", "false", "--evaluate.generate_in_validation", "false", "--evaluate.lm_eval_tasks", "[x]"),
     "fit", "--evaluate.lm_eval_tasks refused"),
    ((), "test", "`ftbench test` refused (measure its memory and speed with fit --test_after_fit false)"),
], ids=["test_after_fit", "generate_in_validation", "lm_eval", "test"])
def test_a_run_of_random_weights_measures_no_accuracy(config_only, tmp_path, capsys, monkeypatch, extra, subcommand,
                                                      refusal):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as e:
        main(argv(config_only, tmp_path / "out", *extra, subcommand=subcommand))
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.strip() == ("ftbench: error: backbone.random_init: true trains random weights, whose accuracy "
                           f"measures nothing: {refusal}")


def test_random_init_is_a_setting(config_only, monkeypatch):
    """It changes the run id; left at its default it leaves every existing id alone."""
    from ftbench.runcli import read_run

    monkeypatch.chdir(ROOT)
    on = read_run(argv(config_only, Path("out"), "--test_after_fit", "false"))
    off = read_run([a for a in argv(config_only, Path("out"), "--test_after_fit", "false")
                    if a not in ("--backbone.random_init", "true")])
    assert on.settings["backbone"]["random_init"] is True and "random_init" not in off.settings["backbone"]
    assert on.label == off.label == "sft+lora" and on.run_id != off.run_id


def test_the_report_refuses_the_accuracy_of_random_weights(tmp_path, capsys):
    from ftbench.sweep.report import runs_frame
    from ftbench.sweep.report.cli import main as report_main
    from ftbench.sweep.report.records import ReportError

    def record(run_id: str, random: bool, final: dict) -> dict:
        return {"run_info": {"run_id": run_id, "subcommand": "fit", "seed": 1, "config": {},
                             "settings": {"backbone": {"model": "m", **({"random_init": True} if random else {})}}},
                "train_info": {"method": "sft+lora", "status": "completed", "metrics": [], "final": final,
                               "memory": {"peak_bytes": 2**20}}}

    memory_only = record("sft+lora-r", True, {"val/loss": 2.0, "train/loss": 2.1})
    assert runs_frame([memory_only, record("sft+lora-p", False, {"test/accuracy": 0.5})])["val_loss"].iloc[0] == 2.0
    tested = record("sft+lora-t", True, {"val/loss": 2.0, "test/loss": 2.2, "test/accuracy": 0.0})
    message = ("run sft+lora-t trained random weights (backbone.random_init: true) but records test/accuracy: a random "
               "model's accuracy measures nothing, so no study reports it; report its memory and speed from a run "
               "without accuracy metrics")
    with pytest.raises(ReportError) as e:
        runs_frame([memory_only, tested])
    assert str(e.value) == message
    folder = tmp_path / "records"
    folder.mkdir()
    (folder / "sft+lora-t.json").write_text(json.dumps(tested))
    assert report_main([str(folder), "--no-plots"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"


def test_a_weightless_folder_without_random_init_is_one_line(config_only, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = [a for a in argv(config_only, tmp_path / "out", "--test_after_fit", "false") if a not in
            ("--backbone.random_init", "true")]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"ftbench: error: backbone.model: {str(config_only)!r} has a config.json but no weights (*.safetensors); "
        "set backbone.random_init: true to train it from random weights")
