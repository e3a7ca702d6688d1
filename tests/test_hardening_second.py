"""Hardening, second pass (issue 23): records stay inside --out, runs end within their limits, W&B
never blocks, a failing disk or a changed data file never corrupts a comparison, and the remaining
tracebacks are one line. Each test failed on the code before the fix."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from ftbench.cli import main
from test_hardening import fit_argv, run_main

ROOT = Path(__file__).resolve().parent.parent
ROWS = [{"instruction": f"What is {i} plus {i}?", "output": str(2 * i)} for i in range(40)]


@pytest.fixture(autouse=True)
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("FTBENCH_TRACEBACK", raising=False)


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("ftbench: error: ")]
    assert lines, err[-2000:]
    return lines[0]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def one_run(tiny_model_dir, tmp_path_factory):
    """One 2-step LoRA run on a data file, with the temporary folders the run made (for the size of
    what it trained): (out, record, source file, temporary folders)."""
    import tempfile

    from ftbench.bench import record as record_module

    tmp = tmp_path_factory.mktemp("one-run")
    source = write_jsonl(tmp / "rows.jsonl", ROWS)
    out = tmp / "runs"
    made: list[str] = []
    real = tempfile.TemporaryDirectory

    def spy(*args, **kwargs):
        folder = real(*args, **kwargs)
        made.append(folder.name)
        return folder

    cwd = os.getcwd()
    os.chdir(ROOT)
    record_module.tempfile.TemporaryDirectory = spy
    try:
        main(fit_argv(tiny_model_dir, out, "--data.init_args.source", str(source)))
    finally:
        record_module.tempfile.TemporaryDirectory = real
        os.chdir(cwd)
    (record,) = out.glob("*.json")
    return out, record, source, made


# ---------------------------------------------------------------------------------- safety
@pytest.mark.parametrize("run_id, problem", [
    ("../../trav/x", "contains a path separator"),
    ("/tmp/abs", "is an absolute path"),
    ("..", "is '.' or starts with '..'"),
    ("a\x1bb", "contains a control character"),
])
def test_run_id_is_a_file_name(run_id, problem, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "deep" / "out"
    code, err = run_main(fit_argv(tiny_model_dir, out, "--run_id", run_id), capsys)
    assert code == 2 and "Traceback" not in err
    assert error_line(err) == (f"ftbench: error: --run_id: {run_id!r} {problem}; it is a file name inside --out "
                               "(letters, digits, _ . -)")
    assert not list(tmp_path.rglob("*.json"))  # nothing written anywhere, inside --out or above it


def test_a_sweep_run_name_is_a_file_name(tmp_path):
    from ftbench.sweep.grid import SweepError, load_sweep

    (tmp_path / "s.yaml").write_text("base: {trainer.max_steps: 2}\nruns:\n  - {name: .., seed: 1}\n")
    with pytest.raises(SweepError) as e:
        load_sweep(tmp_path / "s.yaml")
    assert str(e.value) == f"{tmp_path / 's.yaml'}: runs[0].name: '..' is not a name (letters, digits, _ . -)"


def test_config_dump_keeps_no_machine_path(one_run):
    out, record, _, _ = one_run
    (dump,) = out.rglob("config.yaml")
    text = dump.read_text()
    assert "cwd=" not in text and "__path__" not in text and str(ROOT) not in text
    assert yaml.safe_load(text)["trainer"]["max_steps"] == 2


def test_the_trained_weights_are_measured_outside_out(one_run):
    out, record, _, made = one_run
    saved = json.loads(record.read_text())["train_info"]["saved"]
    assert saved["bytes"] > 0 and saved["path"] is None
    assert made and not any(Path(m).is_relative_to(out) for m in made)  # measured in $TMPDIR, not --out
    assert not any(Path(m).exists() for m in made)  # and removed at once


# ---------------------------------------------------------------------------------- limits
def test_generation_budget_past_the_context_is_one_line(tiny_model_dir, tmp_path, capsys):
    code, err = run_main(fit_argv(tiny_model_dir, tmp_path, "--evaluate.max_new_tokens", "1000000"), capsys)
    assert code == 2
    line = error_line(err)
    assert line.startswith("ftbench: error: evaluate.max_new_tokens: 1000000 new tokens after a ")
    assert line.endswith("-token prompt run past the model's context of 256 tokens")


def test_sigterm_stops_generation_between_tokens(tiny_model_dir, tmp_path, monkeypatch):
    """SIGTERM while the answers are generated: generation stops at the next token (not at its budget
    of 200), and the record says interrupted."""
    from ftbench.evaluation.evaluator import Evaluator
    from ftbench.tuners.base import Tuner

    widths: list[int] = []
    real_generate, real_tuner_generate = Evaluator.generate, Tuner.generate

    def generate(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler sets trainer.received_sigterm
        return real_generate(self, *args, **kwargs)

    def tuner_generate(self, *args, **kwargs):
        new = real_tuner_generate(self, *args, **kwargs)
        widths.append(new.shape[1])
        return new

    monkeypatch.setattr(Evaluator, "generate", generate)
    monkeypatch.setattr(Tuner, "generate", tuner_generate)
    argv = fit_argv(tiny_model_dir, tmp_path, "--evaluate.max_new_tokens", "200")
    with pytest.raises(SystemExit):
        main(argv)
    assert widths == [1]  # one token, then the stopping criterion saw the flag
    (record,) = tmp_path.glob("*.json")
    info = json.loads(record.read_text())["train_info"]
    assert info["status"] == "interrupted" and info["error"]["type"] == "SIGTERMException"


# ---------------------------------------------------------------------------------- W&B
class SilentServer:
    """A listener on 127.0.0.1 that accepts connections and never answers."""

    def __enter__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.accepted: list[socket.socket] = []
        self.stop = False
        threading.Thread(target=self._accept, daemon=True).start()
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _accept(self):
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def __exit__(self, *exc):
        self.stop = True
        self.sock.close()
        for conn in self.accepted:
            conn.close()


def test_wandb_server_that_never_answers_goes_offline_and_the_record_is_written(tiny_model_dir, tmp_path, capsys,
                                                                                 monkeypatch):
    for key in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(key)
    with SilentServer() as url:
        monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
        monkeypatch.setenv("WANDB_BASE_URL", url)
        monkeypatch.setenv("WANDB_DIR", str(tmp_path))
        argv = fit_argv(tiny_model_dir, tmp_path / "out", "--trainer.logger", "lightning.pytorch.loggers.WandbLogger",
                        "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.logger.init_args.project", "t")
        t0 = time.monotonic()
        main(argv)
        elapsed = time.monotonic() - t0
    err = capsys.readouterr().err
    assert (f"ftbench: warning: W&B server {url} did not answer within 3 s: logging offline (upload later with "
            "`wandb sync wandb/offline-run-*`)") in err
    assert os.environ["WANDB_MODE"] == "offline" and os.environ["WANDB_INIT_TIMEOUT"] == "30"
    assert elapsed < 90  # not wandb's ~2 minutes of retries
    (record,) = (tmp_path / "out").glob("*.json")
    assert json.loads(record.read_text())["train_info"]["status"] == "completed"


def test_wandb_init_that_fails_falls_back_to_offline(monkeypatch, capsys):
    from lightning.pytorch.loggers import WandbLogger

    from ftbench.wandb_mode import start_or_offline

    class Failing(WandbLogger):
        tries = 0

        @property
        def experiment(self):
            Failing.tries += 1
            if Failing.tries == 1:
                raise TimeoutError("init timed out after 30 s")
            return "offline run"

    logger = Failing(project="t", offline=False)
    trainer = SimpleNamespace(loggers=[logger])
    monkeypatch.delenv("WANDB_MODE", raising=False)
    start_or_offline(trainer)
    assert Failing.tries == 2 and os.environ["WANDB_MODE"] == "offline" and logger._wandb_init["mode"] == "offline"
    assert capsys.readouterr().err == ("ftbench: warning: W&B did not start (TimeoutError: init timed out after 30 s): "
                                       "logging offline (upload later with `wandb sync wandb/offline-run-*`)\n")


# ---------------------------------------------------------------------------------- comparisons
def test_the_record_keeps_a_fingerprint_of_each_data_file(one_run):
    import hashlib

    _, record, source, _ = one_run
    info = json.loads(record.read_text())["train_info"]
    data = source.read_bytes()
    key = next(k for k in info["data_fingerprints"] if k.endswith("rows.jsonl"))
    assert info["data_fingerprints"][key] == f"{len(data)}:{hashlib.sha256(data).hexdigest()[:16]}"


def _seed_of(record: Path, seed: int, fingerprint: str, run_id: str) -> dict:
    rec = json.loads(record.read_text())
    rec["run_info"]["seed"], rec["run_info"]["run_id"] = seed, run_id
    rec["run_info"]["config"]["seed_everything"] = seed
    rec["train_info"]["data_fingerprints"] = {"data/rows.jsonl": fingerprint}
    return rec


def test_the_report_refuses_one_point_over_two_data_versions(one_run):
    from ftbench.sweep.report.records import ReportError, runs_frame

    _, record, _, _ = one_run
    same = [_seed_of(record, 1, "56:aaaa", "r1"), _seed_of(record, 2, "56:aaaa", "r2")]
    assert list(runs_frame(same)["seed"]) == [1, 2]  # one data version: two seeds of one point
    with pytest.raises(ReportError) as e:
        runs_frame([same[0], _seed_of(record, 2, "37:bbbb", "r2")])
    assert str(e.value) == ("runs r1 and r2 are one grid point but read data/rows.jsonl in two versions (56:aaaa and "
                            "37:bbbb: bytes:sha256); rerun one of them on the same data, or report them from separate "
                            "folders")


def test_a_resumed_sweep_warns_when_a_source_changed(tmp_path):
    from ftbench.data.fingerprint import path_fingerprint
    from ftbench.sweep.cli import changed_sources

    source = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    then = path_fingerprint(str(source))
    (tmp_path / "r1.json").write_text(json.dumps({"run_info": {"run_id": "r1"}, "train_info": {
        "status": "completed", "data_fingerprints": {str(source): then}}}))
    assert changed_sources(tmp_path, [SimpleNamespace(run_id="r1")]) == []
    write_jsonl(source, ROWS[:25])  # rewritten between two invocations
    now = path_fingerprint(str(source))
    assert changed_sources(tmp_path, [SimpleNamespace(run_id="r1")]) == [
        f"ftbench: warning: {source} changed since run r1 read it ({then} -> {now}, bytes:sha256): the runs still to "
        "do read the new version, and the report will not group them with the completed ones"]


def test_diverged_is_recorded_and_marked(one_run):
    import math

    from ftbench.bench.record import diverged
    from ftbench.sweep.report import summary_line

    assert diverged(2.0, 3.0) is True and diverged(2.0, 2.9) is False
    uniform = math.log(49152)  # 10.803: lr 1e10 left the loss there
    assert diverged(2.5, 10.80, uniform) is True and diverged(10.9, 10.80, uniform) is False  # random init: not diverged
    assert diverged(None, 3.0) is None
    _, record, _, _ = one_run
    rec = json.loads(record.read_text())
    assert rec["train_info"]["diverged"] is False
    rec["train_info"]["diverged"] = True
    assert " sft+lora completed (diverged) " in summary_line(rec)


def test_overwrite_then_ctrl_c_keeps_the_completed_record(tiny_model_dir, tmp_path, monkeypatch):
    from ftbench.bench.record import RunRecorder

    argv = fit_argv(tiny_model_dir, tmp_path)
    main(argv)
    (record,) = tmp_path.glob("*.json")
    before = record.read_bytes()

    def ctrl_c(self, trainer, pl_module, outputs, batch, batch_idx):
        raise KeyboardInterrupt

    monkeypatch.setattr(RunRecorder, "on_train_batch_end", ctrl_c)
    sigint = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises((SystemExit, KeyboardInterrupt)):
            main(argv + ["--overwrite", "true"])
    finally:
        signal.signal(signal.SIGINT, sigint)  # Lightning ignores SIGINT after a Ctrl-C
    assert record.read_bytes() == before  # byte for byte
    attempt = json.loads(Path(str(record) + ".attempt").read_text())["train_info"]
    assert attempt["status"] == "interrupted"


# ---------------------------------------------------------------------------------- faults
def test_a_sweep_that_cannot_write_stops_in_one_line(tmp_path, monkeypatch, capsys):
    import ftbench.sweep.cli as sweep_cli
    import ftbench.sweep.runs as sweep_runs
    from ftbench.sweep.grid import load_sweep

    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text(f"out: {tmp_path / 'out'}\nbase: {{trainer.max_steps: 2}}\ngrid: {{seed: [1, 2, 3]}}\n")
    sweep = load_sweep(sweep_file)
    monkeypatch.setattr(sweep_cli, "check_points", lambda sweep, runs: [])

    def run_one(sweep, spec, i, progress):
        path = Path(sweep.out) / f"{spec.run_id}.json"
        if i == 1:
            path.write_text(json.dumps({"run_info": {"run_id": spec.run_id}, "train_info": {"status": "completed"}}))
            return "completed"
        path.write_text(json.dumps({"run_info": {"run_id": spec.run_id}, "train_info": {"status": "running"}}))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sweep_runs, "run_one", run_one)
    assert sweep_cli.run_sweep(sweep) == 1
    first, second, third = (Path(sweep.out) / f"{s.run_id}.json" for s in sweep.runs)
    assert capsys.readouterr().err == (f"error: cannot write in {sweep.out} (No space left on device): the sweep "
                                       f"stopped at run {sweep.runs[1].run_id}; completed records are kept, and the "
                                       "same command resumes once it can write\n")
    assert json.loads(first.read_text())["train_info"]["status"] == "completed"
    assert sweep_runs.record_status(second) == "interrupted"  # the next invocation reruns it
    assert not third.exists()


def test_a_failed_sweep_run_says_why_and_runs_this_package(tmp_path, capsys):
    import ftbench.sweep.runs as sweep_runs
    from ftbench.sweep.grid import load_sweep

    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "argv: $*"\necho "PYTHONPATH=$PYTHONPATH"\n'
                    'echo "ftbench: error: data.source: rows.jsonl: no rows (the file is empty)" >&2\nexit 2\n')
    fake.chmod(0o755)
    (tmp_path / "s.yaml").write_text(f"out: {tmp_path / 'out'}\nbase: {{trainer.max_steps: 2}}\n")
    sweep = load_sweep(tmp_path / "s.yaml")
    (tmp_path / "out").mkdir()
    spec = sweep.runs[0]
    with sweep_runs.Progress(1, live=False) as progress:
        status = sweep_runs.run_one(sweep, spec, 1, progress, python=str(fake))
    assert status == "failed"
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("      failed in ")]
    assert len(said) == 1 and said[0].split(" s: ", 1)[1].startswith(
        "data.source: rows.jsonl: no rows (the file is empty)  (log: ")
    log = (tmp_path / "out" / f"{spec.run_id}.log").read_text()
    assert log.splitlines()[0].startswith("argv: -P -m ftbench.cli fit ")  # -P: not an ftbench in the cwd
    assert log.splitlines()[1].startswith(f"PYTHONPATH={ROOT}")  # this package first


# ---------------------------------------------------------------------------------- one-line errors
def test_dpo_on_instruction_rows_is_one_line_before_the_model_loads(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import ftbench.objectives.base as base

    loaded = []
    monkeypatch.setattr(base, "load_backbone", lambda *a, **k: loaded.append(1))
    argv = fit_argv(tiny_model_dir, tmp_path)
    argv[argv.index("configs/objective/sft.yaml")] = "configs/objective/dpo.yaml"
    code, err = run_main(argv, capsys)
    assert code == 2 and "Traceback" not in err and not loaded
    assert error_line(err) == ("ftbench: error: objective dpo needs preference pairs (chosen and rejected answers); the "
                               "data module (InstructionData, builtin:instruction) gives instruction rows")
    assert "ftbench: hint: give a data config of regime preference (configs/data/*.yaml)" in err


def test_reward_model_at_an_sft_run_is_one_line(tmp_path, backbone):
    from ftbench.errors import ConfigError
    from ftbench.objectives.rewards import load_reward_model

    weights = tmp_path / "sft+lora-abc" / "weights"
    weights.mkdir(parents=True)
    (weights / "adapter_config.json").write_text("{}")
    (tmp_path / "sft+lora-abc.json").write_text(json.dumps({"train_info": {"objective": "sft", "method": "sft+lora"}}))
    with pytest.raises(ConfigError) as e:
        load_reward_model(weights, backbone)
    assert str(e.value) == (f"reward_model.path: {str(weights)!r} holds the weights of run sft+lora-abc (sft+lora: "
                            "objective sft), not a reward run (a reward model is what objective reward trains: "
                            "configs/objective/reward.yaml)")


def test_a_csv_with_a_byte_order_mark(tmp_path):
    from ftbench.data.base import read_rows

    path = tmp_path / "excel.csv"
    path.write_bytes("\ufeffinstruction,output\nWhat is 1 plus 1?,2\n".encode("utf-8"))
    (row,) = read_rows(path)
    assert row.fields == {"instruction": "What is 1 plus 1?", "output": "2"}


def test_empty_outputs_and_pair_texts_are_counted(tmp_path, backbone, capsys):
    from ftbench.data.instruction import InstructionData
    from ftbench.data.preference import PreferenceData

    rows = ROWS[:10] + [{"instruction": "Say nothing.", "output": ""}, {"instruction": "Again.", "output": "  "}]
    source = write_jsonl(tmp_path / "rows.jsonl", rows)
    InstructionData(backbone=backbone, source=str(source), val_fraction=0.0, test_fraction=0.0).setup("fit")
    assert capsys.readouterr().err == (f"ftbench: warning: {source}: 2 row(s) with an empty output (first: "
                                       f"{source}:11); they are kept\n")
    pairs = [{"prompt": f"Q{i}", "chosen": "yes", "rejected": "no"} for i in range(6)]
    pairs[2]["rejected"] = ""
    source = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    PreferenceData(backbone=backbone, source=str(source), val_fraction=0.0, test_fraction=0.0).setup("fit")
    assert capsys.readouterr().err == (f"ftbench: warning: {source}: 1 row(s) with an empty chosen or rejected text "
                                       f"(first: {source}:3); they are kept\n")


def test_jsonargparse_errors_are_one_line_naming_the_key_and_file(tiny_model_dir, tmp_path, capsys):
    code, err = run_main(fit_argv(tiny_model_dir, tmp_path, "--data.init_args.batch_size", "abc"), capsys)
    assert code == 2 and "usage:" not in err
    assert err.splitlines()[0] == ("ftbench: error: data.init_args.batch_size: Expected a <class 'int'>. Got value: abc")
    bad = tmp_path / "bad.yaml"
    bad.write_text("init_args:\n  beta: abc\n")
    argv = fit_argv(tiny_model_dir, tmp_path)
    argv[argv.index("configs/objective/sft.yaml")] = "configs/objective/dpo.yaml"
    code, err = run_main(argv[:7] + ["--model", str(bad)] + argv[7:], capsys)
    assert code == 2 and "usage:" not in err
    assert err.splitlines() == [f"ftbench: error: model.init_args.beta: Expected a <class 'float'>. Got value: abc "
                                f"(set in {bad})", "ftbench: hint: `ftbench fit --help` lists the options"]


# ---------------------------------------------------------------------------------- friction
def test_label_accuracy_first_word_and_not_negated():
    from ftbench.evaluation.metrics import build_metric

    texts = ["This email is not spam", "Spam.", "It is spam", "not spam, it is ham", "ham"]
    refs = ["ham", "spam", "spam", "ham", "ham"]
    first = build_metric({"metric": "label_accuracy", "labels": ["spam", "ham"]})  # the default: the first found
    first_word = build_metric({"metric": "label_accuracy", "labels": ["spam", "ham"], "label_mode": "first_word"})
    negation = build_metric({"metric": "label_accuracy", "labels": ["spam", "ham"], "label_mode": "not_negated"})
    assert first.row_values(texts, refs) == [0.0, 1.0, 1.0, 0.0, 1.0]
    assert first_word.row_values(texts, refs) == [0.0, 1.0, 0.0, 0.0, 1.0]
    assert negation.row_values(texts, refs) == [0.0, 1.0, 1.0, 1.0, 1.0]
    assert [negation.label(t) for t in texts] == [None, "spam", "spam", "ham", "ham"]


def test_from_import_finds_a_module_in_the_working_directory(tmp_path, monkeypatch):
    from ftbench.objectives.rewards import FromImport

    (tmp_path / "my_rewards_23.py").write_text("def length(prompts, completions, **kw):\n"
                                               "    return [float(len(c)) for c in completions]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    reward = FromImport("my_rewards_23.length")
    assert reward(prompts=["a", "b"], completions=["xyz", ""]) == [3.0, 0.0]
