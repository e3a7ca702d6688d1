"""Evaluation that fits the task (ftbench.evaluation): each answer metric on fixed strings against values
worked by hand or computed by torchmetrics directly; the label parser and the regex extractor on edge
cases; metric specs refused with reasons; per-task metric lists through the objective; multiple choice
by log-likelihood on the tiny model against a hand-computed sum of log-probs; the predictions file for
fit and test (one line per evaluated row, atomic: an interrupted write leaves the old file); the
report's ``--examples`` output pinned on fixed records."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch

from ftbench.evaluation.choices import pick_choice
from ftbench.evaluation.metrics import (MetricError, build_metric, build_metrics, extract, first_line, parse_label,
                                        remove_punctuation)
from ftbench.evaluation.predictions import predictions_path, read_predictions, write_predictions

ROOT = Path(__file__).resolve().parent.parent


def values(metric, preds, refs):
    return build_metric(metric).row_values(preds, refs)


# ---------------------------------------------------------------------------- exact match
def test_default_exact_match_is_todays_comparison():
    from ftbench.evaluation.metrics import fold_whitespace

    preds = ["42", " 42\n", "4 2", "Paris", "paris", "42.", ""]
    refs = ["42", "42", "4  2", "Paris", "Paris", "42", ""]
    assert values("exact_match", preds, refs) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    assert values("exact_match", preds, refs) == [float(fold_whitespace(p) == fold_whitespace(r)) for p, r in zip(preds, refs)]
    m = build_metrics(None)
    assert [(x.kind, x.name) for x in m] == [("exact_match", "accuracy")]


def test_exact_match_options():
    em = lambda **kw: build_metric({"metric": "exact_match", **kw})  # noqa: E731
    assert em(ignore_case=True).row_values(["PARIS", "Pâris"], ["paris", "pâris"]) == [1.0, 1.0]
    assert em(ignore_punctuation=True).row_values(["Paris.", "“Paris!”", "forty-two"], ["Paris", "Paris", "fortytwo"]) == [1.0, 1.0, 1.0]
    assert em(fold_whitespace=False).row_values(["42 ", "42"], ["42", "42"]) == [0.0, 1.0]
    assert em(first_line=True).row_values(["\n  42\nbecause 40 + 2", "no\n42"], ["42", "42"]) == [1.0, 0.0]
    num = em(regex=r"-?\d+(?:\.\d+)?")
    assert num.row_values(["The answer is 42.", "It is -3.5 degrees", "no number", "12 then 13"],
                          ["42", "-3.5", "7", "13"]) == [1.0, 1.0, 0.0, 0.0]
    assert em(regex=r"-?\d+", regex_match="last").row_values(["12 then 13"], ["13"]) == [1.0]
    # a group: group 1 is the answer; a reference without a match is kept whole
    assert em(regex=r"answer is (\w+)").row_values(["the answer is B, not C", "B"], ["B", "B"]) == [1.0, 0.0]
    # the options in order: first line, then regex, then case, then punctuation
    chain = em(first_line=True, regex=r"[A-Za-z]+!?", ignore_case=True, ignore_punctuation=True)
    assert chain.row_values(["Yes!\nNo", "No\nYes"], ["yes", "yes"]) == [1.0, 0.0]


def test_text_helpers_on_edge_cases():
    assert first_line("") == "" and first_line("\n \nab\ncd") == "ab" and first_line("   ") == ""
    assert remove_punctuation("a.b,c;d:e!f?g'h\"i-j(k)l[m]n…o") == "abcdefghijklmno"
    assert remove_punctuation("$5 + 3 = 8") == "$5 + 3 = 8"  # symbols are not punctuation
    assert extract("no digits", r"\d+") is None
    assert extract("a1b22c333", r"\d+") == "1" and extract("a1b22c333", r"\d+", "last") == "333"
    assert extract("x=3", r"(y)=(\d)|x=(\d)") == "3"  # the first group that took part
    assert extract("B", r"(\()?B") == "B"  # no group took part: the whole match
    assert extract("", r".*") == ""


def test_label_parser_edge_cases():
    labels = ["spam", "ham"]
    assert parse_label("This email is spam.", labels) == "spam"
    assert parse_label("HAM", labels) == "ham"  # case-insensitive by default; returned as written
    assert parse_label("HAM", labels, ignore_case=False) is None
    assert parse_label("spammy hamburger", labels) is None  # whole words only
    assert parse_label("", labels) is None
    assert parse_label("ham, not spam", labels) == "ham"  # the first one in the text
    assert parse_label("It is not spam", ["spam", "not spam"]) == "not spam"  # earliest position
    assert parse_label("not spam at all", ["not", "not spam"]) == "not spam"  # longest at the same position
    assert parse_label("C++ or C#?", ["C#", "C++"]) == "C++"  # regex characters are literal
    assert parse_label("(B) Paris", ["A", "B", "C"]) == "B"


def test_label_accuracy():
    m = build_metric({"metric": "label_accuracy", "labels": ["spam", "ham"]})
    assert m.name == "label_accuracy"
    preds = ["This email is not a spam.", "Ham", "spam", "I cannot tell", "ham"]
    refs = ["ham", "ham", "Spam", "spam", "spam"]
    # "not a spam" parses as spam (the label set has no "not spam"): wrong; no label: wrong
    assert m.row_values(preds, refs) == [0.0, 1.0, 1.0, 0.0, 0.0]
    first = build_metric({"metric": "label_accuracy", "labels": ["yes", "no"], "first_line": True})
    assert first.row_values(["no\nyes yes", "Yes, no"], ["no", "yes"]) == [1.0, 1.0]


# ---------------------------------------------------------------------------- text metrics
def test_rouge_l_by_hand_and_as_torchmetrics():
    from torchmetrics.text import ROUGEScore

    preds = ["the cat sat on the mat", "hello world", "a body of water", "an animal", ""]
    refs = ["the cat is on the mat", "hello there world", "a large body of water", "a small animal", "x"]
    # LCS/len: 5/6 and 5/6 -> F 5/6; 2/2, 2/3 -> F 0.8; 4/4, 4/5 -> 8/9; 1/2, 1/3 -> 0.4; nothing -> 0
    got = values("rouge_l", preds, refs)
    assert got == pytest.approx([5 / 6, 0.8, 8 / 9, 0.4, 0.0], abs=1e-6)
    lib = ROUGEScore(rouge_keys="rougeL")
    lib.update(preds, refs)
    assert sum(got) / len(got) == pytest.approx(float(lib.compute()["rougeL_fmeasure"]), abs=1e-6)


def test_bleu_by_hand_and_corpus_as_torchmetrics():
    from torchmetrics.text import BLEUScore

    m = build_metric({"metric": "bleu", "n_gram": 2})
    # one sentence: unigrams 5/6 (the x2, cat, on, mat), bigrams 3/5 (the cat, on the, the mat), BP 1
    assert m.row_values(["the cat sat on the mat"], ["the cat is on the mat"]) == pytest.approx([math.sqrt(5 / 6 * 3 / 5)])
    # corpus: unigrams (4 + 1)/6, bigrams (2 + 0)/4, c = 6 < r = 8: BP exp(1 - 8/6)
    preds, refs = ["a body of water", "an animal"], ["a large body of water", "a small animal"]
    corpus = m.corpus_metric()
    corpus.update(*m.corpus_inputs(preds, refs))
    assert float(corpus.compute()) == pytest.approx(math.exp(-1 / 3) * math.sqrt(5 / 6 * 2 / 4), abs=1e-6)
    lib = BLEUScore(n_gram=2)
    lib.update(preds, [[r] for r in refs])
    assert float(corpus.compute()) == pytest.approx(float(lib.compute()), abs=1e-7)
    assert values("bleu", ["a b c d e"], ["a b c d e"]) == [1.0]


def test_chrf_as_torchmetrics():
    from torchmetrics.functional.text import chrf_score
    from torchmetrics.text import CHRFScore

    preds, refs = ["the cat sat on the mat", "hello world"], ["the cat is on the mat", "hello there world"]
    m = build_metric("chrf")
    assert m.row_values(["same text", "xyz"], ["same text", "abc"]) == [1.0, 0.0]
    # torchmetrics counts the character 6-gram order of a 5-character word as 0 matches: 5/6
    assert m.row_values(["hello"], ["hello"]) == pytest.approx([5 / 6])
    assert m.row_values(preds, refs) == pytest.approx([float(chrf_score([p], [[r]], n_word_order=0)) for p, r in zip(preds, refs)])
    assert m.row_values(preds[:1], refs[:1]) == pytest.approx([0.6458], abs=1e-4)  # sacrebleu's chrF2 = 64.58
    plus = build_metric({"metric": "chrf", "n_word_order": 2})
    assert plus.row_values(preds, refs) == pytest.approx([float(chrf_score([p], [[r]])) for p, r in zip(preds, refs)])
    corpus, lib = m.corpus_metric(), CHRFScore(n_word_order=0)
    corpus.update(*m.corpus_inputs(preds, refs))
    lib.update(preds, [[r] for r in refs])
    assert float(corpus.compute()) == pytest.approx(float(lib.compute()), abs=1e-7)


def test_text_metrics_read_the_preparation_options():
    m = build_metric({"metric": "rouge_l", "first_line": True})
    assert m.row_values(["a small animal\nand more words here"], ["a small animal"]) == [1.0]
    assert build_metric({"metric": "chrf", "ignore_case": True}).row_values(["HELLO WORLD"], ["hello world"]) == [1.0]


# ---------------------------------------------------------------------------- specs
@pytest.mark.parametrize("spec, message", [
    ("f1", "data.metrics: unknown metric 'f1'"),
    ({"metric": "rouge_l", "labels": ["a", "b"]}, "data.metrics: rouge_l does not read labels"),
    ({"metric": "mc_accuracy", "ignore_case": True}, "mc_accuracy does not read ignore_case (it has no options)"),
    ({"metric": "label_accuracy"}, "label_accuracy needs labels: a list of at least two non-empty strings, got None"),
    ({"metric": "label_accuracy", "labels": ["a", ""]}, "label_accuracy needs labels"),
    ({"metric": "exact_match", "regex": "("}, "regex '(' does not compile"),
    ({"metric": "exact_match", "name": "a/b"}, "name 'a/b' is not a metric name"),
    ({"metric": "bleu", "n_gram": 0}, "bleu n_gram must be at least 1"),
    ({"metric": "exact_match", "colour": 1}, "unknown option(s) colour"),
    ({"ignore_case": True}, "'metric' is missing"),
])
def test_bad_metric_specs_are_refused(spec, message):
    with pytest.raises(MetricError) as e:
        build_metric(spec)
    assert message in str(e.value)


def test_record_names_are_unique():
    with pytest.raises(MetricError, match=r"data.metrics\[1\]: exact_match records as 'accuracy', as data.metrics\[0\] "
                                          "does; give one of them another 'name'"):
        build_metrics(["exact_match", {"metric": "exact_match", "ignore_case": True}])
    names = [m.name for m in build_metrics(["exact_match", {"metric": "exact_match", "ignore_case": True, "name": "em_ci"},
                                            "rouge_l", "chrf", "bleu", "mc_accuracy", "mc_accuracy_norm"])]
    assert names == ["accuracy", "em_ci", "rouge_l", "chrf", "bleu", "mc_accuracy", "mc_accuracy_norm"]
    with pytest.raises(MetricError, match="the name 'loss' is the objective's own"):
        build_metrics([{"metric": "rouge_l", "name": "loss"}])


def test_pick_choice_plain_and_per_character():
    lls = [-6.0, -8.0, -3.0]
    choices = ["aaa", "bbbbbbbbbb", "c"]
    assert pick_choice(lls, choices) == 2
    # per character: -2.0, -0.8, -3.0 -> the long option
    assert pick_choice(lls, choices, normalised=True) == 1
    assert pick_choice([-1.0, -1.0], ["x", "y"]) == 0  # a tie goes to the first


# ---------------------------------------------------------------------------- through the objective
@pytest.fixture
def method(tiny_model_dir):
    from ftbench.backbone import Backbone
    from ftbench.objectives import SFT
    from ftbench.tuners import NoTuning

    m = SFT(backbone=Backbone(model=str(tiny_model_dir)), tuner=NoTuning())
    m.configure_model()
    return m


def gen_batch(tok, prompts, answers, tasks=None):
    from ftbench.data.base import left_padded

    ids, mask = left_padded([tok(p, add_special_tokens=False)["input_ids"] for p in prompts], tok.pad_token_id)
    batch = {"gen_input_ids": ids, "gen_attention_mask": mask, "answers": answers}
    if tasks:
        batch["tasks"] = tasks
    return batch


def test_each_task_gets_its_own_metrics(method, monkeypatch):
    tok = method.backbone.tokenizer
    suites = {"add": build_metrics(["exact_match", {"metric": "exact_match", "name": "em_num", "regex": r"-?\d+"}]),
              "define": build_metrics(["rouge_l", {"metric": "bleu", "n_gram": 2}])}
    monkeypatch.setattr(method.evaluator, "metrics_for", lambda task: suites[task])
    answers = ["42", "7", "a large body of water", "a small animal"]
    preds = ["The answer is 42.", "7", "a body of water", "an animal"]
    monkeypatch.setattr(method.evaluator, "generate", lambda ids, mask, max_new_tokens=None, **kw: preds[: len(ids)])
    batch = gen_batch(tok, ["What is 40 + 2?", "What is 3 + 4?", "Define sea.", "Define mouse."], answers,
                      ["add", "add", "define", "define"])
    method.evaluator.start("test")
    vals = method.evaluator.answer_metrics(batch, "test")
    assert set(vals) == {"accuracy", "em_num", "rouge_l"}  # bleu is corpus-level: not a per-row mean
    assert vals["accuracy"].tolist()[:2] == [0.0, 1.0] and all(math.isnan(v) for v in vals["accuracy"].tolist()[2:])
    method.evaluator.metrics.update("test", batch["tasks"], vals)
    got = {k: float(v.compute()) for k, v in method.evaluator.metrics.states.items()}
    assert got == pytest.approx({
        "test/accuracy": 0.5, "test/add/accuracy": 0.5, "test/em_num": 1.0, "test/add/em_num": 1.0,
        "test/rouge_l": (8 / 9 + 0.4) / 2, "test/define/rouge_l": (8 / 9 + 0.4) / 2,
        "test/bleu": math.exp(-1 / 3) * math.sqrt(5 / 12), "test/define/bleu": math.exp(-1 / 3) * math.sqrt(5 / 12)})
    rows = method.evaluator.prediction_rows("test")
    assert [r["prediction"] for r in rows] == preds and [r["reference"] for r in rows] == answers
    assert rows[0]["metrics"] == {"accuracy": 0.0, "em_num": 1.0} and rows[0]["task"] == "add"
    assert rows[0]["prompt"] == "What is 40 + 2?" and rows[0]["stage"] == "test"
    # sentence BLEU-2 of row 2: unigrams 4/4, bigrams 2/3 (body of, of water), BP exp(1 - 5/4)
    assert rows[2]["metrics"]["rouge_l"] == pytest.approx(8 / 9, abs=1e-6)
    assert rows[2]["metrics"]["bleu"] == pytest.approx(math.exp(-0.25) * math.sqrt(2 / 3), abs=1e-6)


def test_default_metrics_equal_exact_match(method, monkeypatch):
    tok = method.backbone.tokenizer
    monkeypatch.setattr(method.evaluator, "generate", lambda ids, mask, max_new_tokens=None, **kw: ["42 ", "6"][: len(ids)])
    batch = gen_batch(tok, ["What is 40 + 2?", "What is 3 + 4?"], ["42", "7"])
    method.evaluator.start("val")
    exact = method.evaluator.exact_match(None).row_values(method.evaluator.predict_answers(batch), batch["answers"])
    assert method.evaluator.answer_metrics(batch, "val")["accuracy"].tolist() == exact == [1.0, 0.0]


# ---------------------------------------------------------------------------- multiple choice
MC_ROWS = [
    {"instruction": "Which is a fruit?", "choices": ["apple", "hammer", "river"], "gold": 0, "task": "mc"},
    {"instruction": "What is 2 + 3?", "choices": ["5", "7"], "gold": 0, "task": "mc"},
    {"instruction": "Pick the colour.", "choices": ["table", "yellow", "summer", "ocean"], "gold": 1, "task": "mc"},
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def mc_data(backbone, tmp_path, **kw):
    from ftbench.data.instruction import InstructionData

    src = write_jsonl(tmp_path / "mc.jsonl", MC_ROWS)
    return InstructionData(backbone=backbone, source="builtin:instruction", builtin_size=20, test_source=str(src),
                           val_fraction=0.1, batch_size=4, eval_batch_size=3, **kw)


def test_multiple_choice_picks_the_hand_computed_best_option(method, tmp_path, monkeypatch):
    dm = mc_data(method.backbone, tmp_path)
    dm.setup("test")
    assert [m.name for m in dm.metrics_for("mc")] == ["accuracy", "mc_accuracy", "mc_accuracy_norm"]
    batch = next(iter(dm.test_dataloader()))
    assert batch["choices"] == [r["choices"] for r in MC_ROWS] and batch["gold"] == [0, 0, 1]
    assert batch["answers"] == ["apple", "5", "yellow"]  # no output: the gold option is the answer
    scores = method.evaluator.choice_scores(batch)
    tok, model = method.backbone.tokenizer, method.model
    for ex, row_scores in zip(dm.splits["test"], scores):
        hand = []
        for choice in ex.choices:
            cont = tok(choice, add_special_tokens=False)["input_ids"]
            ids = ex.prompt_ids + cont
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
            n = len(ex.prompt_ids)
            hand.append(sum(float(logp[n - 1 + t, tok_id]) for t, tok_id in enumerate(cont)))
        assert row_scores == pytest.approx(hand, abs=1e-4)
        best = max(range(len(hand)), key=lambda i: hand[i])
        best_norm = max(range(len(hand)), key=lambda i: hand[i] / len(ex.choices[i]))
        assert pick_choice(row_scores, ex.choices) == best
        assert pick_choice(row_scores, ex.choices, normalised=True) == best_norm
    monkeypatch.setattr(method.evaluator, "generate", lambda ids, mask, max_new_tokens=None, **kw: ["apple", "five", "blue"][: len(ids)])
    monkeypatch.setattr(method.evaluator, "metrics_for", dm.metrics_for)  # what a trainer's datamodule gives
    method.evaluator.start("test")
    vals = method.evaluator.answer_metrics(batch, "test")
    picks = [pick_choice(s, c) for s, c in zip(scores, batch["choices"])]
    assert vals["mc_accuracy"].tolist() == [float(p == g) for p, g in zip(picks, batch["gold"])]
    assert vals["accuracy"].tolist() == [1.0, 0.0, 0.0]
    rows = method.evaluator.prediction_rows("test")
    assert rows[0]["choices"] == MC_ROWS[0]["choices"] and rows[0]["picked"]["mc_accuracy"] == picks[0]


def test_multiple_choice_rows_are_checked(backbone, tmp_path):
    from ftbench.data.base import DataFormatError
    from ftbench.data.instruction import InstructionData

    for row, message in [
        ({"instruction": "q", "choices": ["a", "b"], "gold": 2}, "field 'gold': must be the index of the right choice, 0 to 1; got 2"),
        ({"instruction": "q", "choices": ["a"], "gold": 0}, "field 'choices': must be a list of at least two non-empty strings"),
        ({"instruction": "q", "choices": ["a", "a"], "gold": 0}, "field 'choices': has the same option twice"),
        ({"instruction": "q", "choices": ["a", "b"]}, "field 'gold': missing (a multiple-choice row has both 'choices' and 'gold')"),
        ({"instruction": "q", "gold": 1, "output": "x"}, "field 'choices': missing (a multiple-choice row has both 'choices' and 'gold')"),
    ]:
        src = write_jsonl(tmp_path / "bad.jsonl", [row])
        dm = InstructionData(backbone=backbone, source="builtin:instruction", builtin_size=10, test_source=str(src))
        with pytest.raises(DataFormatError) as e:
            dm.setup("test")
        assert str(e.value) == f"{src}:1: {message}"


def test_metrics_are_checked_against_the_held_out_rows(backbone, tmp_path):
    from ftbench.data.instruction import InstructionData

    src = write_jsonl(tmp_path / "labels.jsonl", [{"instruction": "Spam? cheap pills", "output": "spam"},
                                                  {"instruction": "Spam? lunch at 1", "output": "maybe"}])
    dm = InstructionData(backbone=backbone, source="builtin:instruction", builtin_size=10, test_source=str(src),
                         val_fraction=0.0, metrics=[{"metric": "label_accuracy", "labels": ["spam", "ham"]}])
    with pytest.raises(ValueError, match=r"data.metrics: label_accuracy: the reference answer 'maybe' of a test row is "
                                         r"none of the labels spam, ham"):
        dm.setup("test")
    dm = InstructionData(backbone=backbone, source="builtin:instruction", builtin_size=10, test_source=str(src),
                         val_fraction=0.0, metrics=["exact_match", "mc_accuracy"])
    with pytest.raises(ValueError, match="data.metrics: mc_accuracy scores options, but no held-out row has 'choices'"):
        dm.setup("test")
    with pytest.raises(ValueError, match="data.metrics\\[0\\]: unknown metric 'blue'"):
        InstructionData(backbone=backbone, metrics=["blue"])


def test_mixture_tasks_have_their_own_metric_lists(backbone):
    from ftbench.data.multitask import MultiTaskData, TaskSpec

    dm = MultiTaskData(backbone=backbone, tasks=[
        TaskSpec("arithmetic", "builtin:arithmetic", options={"builtin_size": 40},
                 metrics=[{"metric": "exact_match", "regex": r"-?\d+"}]),
        TaskSpec("sort_numbers", "builtin:sort_numbers", options={"builtin_size": 40}, metrics=["exact_match", "rouge_l"]),
        TaskSpec("last_word", "builtin:last_word", options={"builtin_size": 40}),
    ], metrics=["exact_match", "chrf"], val_fraction=0.1, test_fraction=0.1)
    dm.setup("fit")
    assert dm.metric_names() == {"arithmetic": ["accuracy"], "last_word": ["accuracy", "chrf"],
                                 "sort_numbers": ["accuracy", "rouge_l"]}
    assert dm.describe()["metrics"] == dm.metric_names()
    with pytest.raises(ValueError, match=r"data.tasks\[1\].metrics\[0\]: unknown metric 'rogue'"):
        MultiTaskData(backbone=backbone, tasks=[TaskSpec("a", "builtin:arithmetic"), TaskSpec("b", "builtin:last_word",
                                                                                                metrics=["rogue"])])


# ---------------------------------------------------------------------------- the predictions file
def test_predictions_path_and_round_trip(tmp_path):
    assert predictions_path(tmp_path / "sft+lora-0123456789.json") == tmp_path / "sft+lora-0123456789.predictions.jsonl"
    rows = {"test": [{"stage": "test", "prediction": "été", "metrics": {"accuracy": float("nan")}}],
            "val": [{"stage": "val", "prediction": "a\nb", "metrics": {"accuracy": 1.0}}]}
    path = tmp_path / "r.predictions.jsonl"
    assert write_predictions(path, rows) == {"val": 1, "test": 1}
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines == ['{"stage": "val", "prediction": "a\\nb", "metrics": {"accuracy": 1.0}}',
                     '{"stage": "test", "prediction": "été", "metrics": {"accuracy": null}}']
    assert read_predictions(path, "test") == [{"stage": "test", "prediction": "été", "metrics": {"accuracy": None}}]


def test_an_interrupted_write_leaves_the_old_file(tmp_path, monkeypatch):
    import ftbench.fileio

    path = tmp_path / "run.predictions.jsonl"
    write_predictions(path, {"val": [{"stage": "val", "n": 1}]})
    before = path.read_bytes()

    def crash(fd):
        raise KeyboardInterrupt  # killed between writing the temporary file and renaming it

    monkeypatch.setattr(ftbench.fileio.os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        write_predictions(path, {"val": [{"stage": "val", "n": 2}] * 1000, "test": [{"stage": "test"}]})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.predictions.jsonl"]  # no temporary file left
    with pytest.raises(KeyboardInterrupt):
        write_predictions(tmp_path / "new.predictions.jsonl", {"val": [{"stage": "val"}]})
    assert not (tmp_path / "new.predictions.jsonl").exists()  # none, never half


def run_cli(argv):
    from ftbench.cli import cli_main

    with contextlib.redirect_stdout(io.StringIO()):
        return cli_main(argv)


@pytest.fixture
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def cli_args(tiny_model_dir, out, sub="fit", tuner="configs/tuner/lora.yaml", extra=()):
    return [sub, "--backbone.model", str(tiny_model_dir), "--tuner", tuner, "--model", "configs/objective/sft.yaml",
            "--data", "configs/data/instruction.yaml", "--data.init_args.builtin_size", "60",
            "--data.init_args.val_fraction", "0.1", "--data.init_args.test_fraction", "0.1",
            "--data.init_args.eval_batch_size", "4", "--evaluate.max_new_tokens", "3",
            "--trainer", "configs/trainer/cpu.yaml", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
            "--trainer.logger", "false", "--out", str(out), *extra]


def test_predictions_file_of_fit_and_test(tiny_model_dir, tmp_path, at_root):
    cli = run_cli(cli_args(tiny_model_dir, tmp_path / "fit", extra=["--data.init_args.metrics", "[exact_match, rouge_l]"]))
    rec = json.loads((tmp_path / "fit" / f"{cli.run_id}.json").read_text())
    info = rec["train_info"]
    assert info["status"] == "completed" and info["data"]["rows"]["val"] == 6 and info["data"]["rows"]["test"] == 6
    assert info["predictions"] == {"path": f"{cli.run_id}.predictions.jsonl", "rows": {"val": 6, "test": 6}}
    rows = read_predictions(tmp_path / "fit" / info["predictions"]["path"])
    assert [r["stage"] for r in rows] == ["val"] * 6 + ["test"] * 6  # one line per evaluated row
    assert all(set(r) == {"stage", "step", "task", "prompt", "reference", "prediction", "metrics"} for r in rows)
    assert all(set(r["metrics"]) == {"accuracy", "rouge_l"} and r["step"] == 2 for r in rows)
    test_rows = [r for r in rows if r["stage"] == "test"]
    assert sum(r["metrics"]["accuracy"] for r in test_rows) / 6 == pytest.approx(info["final"]["test/accuracy"])
    assert sum(r["metrics"]["rouge_l"] for r in test_rows) / 6 == pytest.approx(info["final"]["test/rouge_l"], abs=1e-6)
    # the baseline (ftbench test, tuner none) writes its own, with the same metrics
    cli = run_cli(cli_args(tiny_model_dir, tmp_path / "test", "test", "configs/tuner/none.yaml",
                           ["--data.init_args.metrics", "[exact_match, rouge_l]"]))
    rec = json.loads((tmp_path / "test" / f"{cli.run_id}.json").read_text())
    assert rec["train_info"]["predictions"]["rows"] == {"test": 6}
    assert {"test/accuracy", "test/rouge_l", "test/macro_rouge_l"} <= set(rec["train_info"]["final"])
    assert len(read_predictions(tmp_path / "test" / rec["train_info"]["predictions"]["path"])) == 6
    cli = run_cli(cli_args(tiny_model_dir, tmp_path / "off", "test", "configs/tuner/none.yaml",
                           ["--evaluate.predictions", "false"]))
    assert "predictions" not in json.loads((tmp_path / "off" / f"{cli.run_id}.json").read_text())["train_info"]
    assert not list((tmp_path / "off").glob("*.jsonl"))


def test_a_run_that_crashes_in_test_keeps_the_validation_predictions(tiny_model_dir, tmp_path, at_root, monkeypatch):
    from ftbench.evaluation.evaluator import Evaluator

    real = Evaluator.answer_metrics

    def crash_in_test(self, batch, stage, predictions=None, prompt_cache=None):
        if stage == "test":
            raise RuntimeError("boom")
        return real(self, batch, stage, predictions, prompt_cache)

    monkeypatch.setattr(Evaluator, "answer_metrics", crash_in_test)
    with pytest.raises(RuntimeError, match="boom"):
        run_cli(cli_args(tiny_model_dir, tmp_path))
    (record,) = tmp_path.glob("*.json")
    info = json.loads(record.read_text())["train_info"]
    assert info["status"] == "failed" and info["predictions"]["rows"] == {"val": 6}
    assert [r["stage"] for r in read_predictions(tmp_path / info["predictions"]["path"])] == ["val"] * 6


def test_metrics_in_a_data_config_parse_through_the_cli(tmp_path, at_root):
    from ftbench.cli import cli_main

    cfg = tmp_path / "data.yaml"
    cfg.write_text("class_path: ftbench.data.InstructionData\ninit_args:\n  metrics:\n    - exact_match\n"
                   "    - {metric: label_accuracy, labels: [spam, ham], first_line: true}\n")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        cli_main(["fit", "--tuner", "configs/tuner/lora.yaml", "--model", "configs/objective/sft.yaml",
                  "--data", str(cfg), "--print_config"])
    import yaml

    printed = yaml.safe_load(out.getvalue())
    metrics = printed["data"]["init_args"]["metrics"]
    assert metrics[0] == "exact_match" and metrics[1]["metric"] == "label_accuracy"
    assert metrics[1]["labels"] == ["spam", "ham"] and metrics[1]["first_line"] is True
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        cli_main(["fit", "--tuner", "configs/tuner/lora.yaml", "--model", "configs/objective/sft.yaml",
                  "--data", "configs/data/instruction.yaml", "--data.init_args.metrics", "[exact_matsh]"])
    assert e.value.code == 2 and "exact_matsh" in err.getvalue()


# ---------------------------------------------------------------------------- report --examples
def _rec(run_id, method, seed, sub="fit", acc=0.5, predictions=True):
    info = {"status": "completed", "method": method, "final": {"test/accuracy": acc},
            "params": {"trainable": 10, "total": 100, "trainable_pct": 10.0}}
    if predictions:
        info["predictions"] = {"path": f"{run_id}.predictions.jsonl", "rows": {"test": 3}}
    return {"run_info": {"run_id": run_id, "subcommand": sub, "seed": seed, "created": f"2026-01-01T00:00:0{seed}",
                         "config": {"seed_everything": seed, "model": {"class_path": "ftbench.objectives.SFT"},
                                    "tuner": {"class_path": method}}},
            "train_info": info}


def _row(task, prompt, ref, pred, acc, stage="test", **more):
    return {"stage": stage, "step": 40, "task": task, "prompt": prompt, "reference": ref, "prediction": pred,
            "metrics": {"accuracy": acc, **more}}


PROMPT = "<|im_start|>user\nWhat is {q}?<|im_end|>\n<|im_start|>assistant\n"

EXAMPLES = """\
## Examples: up to 2 wrong answers per method

### sft+lora: 2 of 3 test rows wrong (accuracy)

| task | prompt | reference | sft+lora | sft+none (test) |
|---|---|---|---|---|
| arithmetic | user ↵ What is 40 + 2? ↵ assistant | 42 | 41 ✗ | The answer is 42. ✗ |
| define | …at goes on and on about the sea and the ocean and rivers? ↵ assistant | a body of water \\| sea | a sea ✗ | (empty) ✗ |

### sft+none (test): 3 of 3 test rows wrong (accuracy)

| task | prompt | reference | sft+lora | sft+none (test) |
|---|---|---|---|---|
| arithmetic | user ↵ What is 40 + 2? ↵ assistant | 42 | 41 ✗ | The answer is 42. ✗ |
| arithmetic | user ↵ What is 3 + 4? ↵ assistant | 7 | 7 ✓ | 7 ↵ because 3 + 4 = 7 ✗ |

### sft+full: no predictions file
"""


def test_report_examples_are_pinned(tmp_path, capsys):
    from ftbench.sweep.report import report
    from ftbench.sweep.report.cli import main as report_main

    long_q = "a very long question that goes on and on about the sea and the ocean and rivers"
    lora = [_row("arithmetic", PROMPT.format(q="40 + 2"), "42", "41", 0.0),
            _row("arithmetic", PROMPT.format(q="3 + 4"), "7", "7", 1.0),
            _row("define", PROMPT.format(q=long_q), "a body of water | sea", "a sea", 0.0, rouge_l=0.4)]
    base = [_row("arithmetic", PROMPT.format(q="40 + 2"), "42", "The answer is 42.", 0.0),
            _row("arithmetic", PROMPT.format(q="3 + 4"), "7", "7\nbecause 3 + 4 = 7", 0.0),
            _row("define", PROMPT.format(q=long_q), "a body of water | sea", "", 0.0)]
    for rec, rows in ((_rec("lora-1", "sft+lora", 1), lora), (_rec("base-1", "sft+none", 2, sub="test"), base),
                      (_rec("full-1", "sft+full", 2, predictions=False), None)):
        (tmp_path / f"{rec['run_info']['run_id']}.json").write_text(json.dumps(rec))
        if rows:
            write_predictions(tmp_path / f"{rec['run_info']['run_id']}.predictions.jsonl", {"test": rows})
    text = report(tmp_path, plots=False, examples=2)
    assert text.endswith("\n\n" + EXAMPLES.rstrip())
    assert (tmp_path / "report.md").read_text().endswith(EXAMPLES.rstrip() + "\n")
    assert report(tmp_path, plots=False).count("## Examples") == 0
    assert report_main([str(tmp_path), "--no-plots", "--examples", "2"]) == 0
    assert capsys.readouterr().out.rstrip().endswith(EXAMPLES.rstrip())


def test_the_default_table_shows_the_new_metrics(tmp_path):
    from ftbench.sweep.report import report

    rec = _rec("lora-1", "sft+lora", 1, acc=0.25, predictions=False)
    rec["train_info"]["final"].update({"test/rouge_l": 0.6125, "test/chrf": 0.5, "test/arithmetic/rouge_l": 0.7,
                                       "lm_eval/arc_easy/acc": 0.3333, "lm_eval/arc_easy/acc_norm": 0.4})
    (tmp_path / "lora-1.json").write_text(json.dumps(rec))
    table = report(tmp_path, plots=False).splitlines()
    assert table[0].endswith("| exact match | test/rouge_l | test/chrf | lm_eval/arc_easy/acc | lm_eval/arc_easy/acc_norm |")
    assert table[2].endswith("| 25.0% | 61.3% | 50.0% | 33.3% | 40.0% |")
