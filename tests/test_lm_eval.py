"""lm-evaluation-harness in the same process (ftbench.evaluation.lm_eval), offline: a local task (a YAML
task over a JSONL file the test writes) runs on the tiny model after ``ftbench test`` and after ``ftbench
fit``, and its acc/acc_norm land in the record equal to the ones worked out from the model's own
log-probabilities; an unknown task or a missing data file is a one-line error before any training.
Skipped only where lm_eval is not importable (``pip install 'ftbench[eval]'``; the dev extra has it)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from ftbench.cli import cli_main, main  # noqa: E402
from ftbench.evaluation.lm_eval import metric_key  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOCS = [
    {"question": "What is 2 + 3?", "choices": ["5", "7", "nine"], "gold": 0},
    {"question": "Which is a fruit?", "choices": ["apple", "hammer"], "gold": 0},
    {"question": "What is 10 - 4?", "choices": ["3", "6"], "gold": 1},
    {"question": "Write this word in capital letters: tiger", "choices": ["TIGER", "tiger", "Tiger"], "gold": 0},
]
TASK = "ftbench_local_mc"


def write_task(folder: Path, data: str = "data.jsonl") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (folder / "task.yaml").write_text(f"""\
task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
  - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
""")
    return folder


@pytest.fixture(autouse=True)
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def args(tiny_model_dir, out, tasks_dir, sub="test", tuner="configs/tuner/none.yaml"):
    return [sub, "--backbone.model", str(tiny_model_dir), "--tuner", tuner, "--model", "configs/objective/sft.yaml",
            "--data", "configs/data/instruction.yaml", "--data.init_args.builtin_size", "40",
            "--data.init_args.eval_batch_size", "4", "--evaluate.max_new_tokens", "2",
            "--trainer", "configs/trainer/cpu.yaml", "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
            "--trainer.logger", "false", "--out", str(out),
            "--evaluate.lm_eval_tasks", f"[{TASK}]", "--evaluate.lm_eval_include_path", str(tasks_dir)]


def hand_scores(model, tok) -> tuple[float, float]:
    """acc and acc_norm as lm-eval defines them, from the model's log-probabilities: each choice is
    the continuation " " + choice after "Question: ...\\nAnswer:" (the context's tokens, then the rest of
    the whole string's tokens), the sum of its log-probs; acc_norm divides by len(choice)."""
    acc = norm = 0
    for d in DOCS:
        context = f"Question: {d['question']}\nAnswer:"
        ctx = tok(context, add_special_tokens=False)["input_ids"]
        lls = []
        for c in d["choices"]:
            whole = tok(context + " " + c, add_special_tokens=False)["input_ids"]
            cont = whole[len(ctx):]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].float(), -1)
            lls.append(sum(float(logp[len(ctx) - 1 + t, tid]) for t, tid in enumerate(cont)))
        acc += max(range(len(lls)), key=lambda i: lls[i]) == d["gold"]
        norm += max(range(len(lls)), key=lambda i: lls[i] / len(d["choices"][i])) == d["gold"]
    return acc / len(DOCS), norm / len(DOCS)


def test_a_local_task_lands_in_the_record(tiny_model_dir, tmp_path):
    tasks = write_task(tmp_path / "tasks")
    with contextlib.redirect_stdout(io.StringIO()):
        cli = cli_main(args(tiny_model_dir, tmp_path / "out", tasks))
    rec = json.loads((tmp_path / "out" / f"{cli.run_id}.json").read_text())
    info = rec["train_info"]
    assert info["status"] == "completed"
    acc, acc_norm = hand_scores(cli.model.model, cli.model.backbone.tokenizer)
    assert info["final"][f"lm_eval/{TASK}/acc"] == pytest.approx(acc)
    assert info["final"][f"lm_eval/{TASK}/acc_norm"] == pytest.approx(acc_norm)
    lm = info["lm_eval"]
    assert lm["tasks"] == [TASK] and lm["n_samples"][TASK] == {"original": 4, "effective": 4}
    assert lm["results"][TASK]["acc,none"] == pytest.approx(acc) and lm["seconds"] > 0
    assert "test/accuracy" in info["final"]  # the data set's own metrics as well


def test_after_fit_with_a_limit(tiny_model_dir, tmp_path):
    tasks = write_task(tmp_path / "tasks")
    argv = args(tiny_model_dir, tmp_path / "out", tasks, "fit", "configs/tuner/lora.yaml") + ["--evaluate.lm_eval_limit", "2"]
    with contextlib.redirect_stdout(io.StringIO()):
        cli = cli_main(argv)
    info = json.loads((tmp_path / "out" / f"{cli.run_id}.json").read_text())["train_info"]
    assert info["status"] == "completed" and info["global_steps"] == 1
    assert info["lm_eval"]["n_samples"][TASK] == {"original": 4, "effective": 2} and info["lm_eval"]["limit"] == 2
    assert 0.0 <= info["final"][f"lm_eval/{TASK}/acc"] <= 1.0


@pytest.mark.parametrize("case", ["unknown task", "missing data file"])
def test_a_task_that_cannot_run_is_an_error_before_training(tiny_model_dir, tmp_path, capsys, case):
    tasks = write_task(tmp_path / "tasks", data="data.jsonl" if case == "unknown task" else "nowhere.jsonl")
    argv = args(tiny_model_dir, tmp_path / "out", tasks, "fit", "configs/tuner/lora.yaml")
    if case == "unknown task":
        argv[argv.index(f"[{TASK}]")] = "[ftbench_local_mx]"
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    if case == "unknown task":
        assert "ftbench: error: --evaluate.lm_eval_tasks: unknown lm-eval task(s) 'ftbench_local_mx' (did you mean " \
               f"{TASK}" in err
    else:
        assert f"ftbench: error: --evaluate.lm_eval_tasks: task '{TASK}' cannot be loaded: " in err
    assert not list((tmp_path / "out").glob("*.json"))  # no run started: no record


def test_metric_keys():
    assert metric_key("acc,none") == "acc" and metric_key("acc_norm,none") == "acc_norm"
    assert metric_key("exact_match,strict-match") == "exact_match,strict-match"
    assert [metric_key(k) for k in ("acc_stderr,none", "alias", "sample_len")] == [None, None, None]
