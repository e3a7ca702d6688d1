"""Multi-task data: mixture proportions and draws per strategy, seeded order, per-task validation
metrics through a Lightning Trainer, bad mixtures, the shipped YAML and a short real fit."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from ftbench.data.base import Collator, Example
from ftbench.data.multitask import (
    MixtureSampler,
    MultiTaskData,
    TaskSpec,
    eval_batches,
    mixture_proportions,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SIZES = {"a": 900, "b": 300, "c": 100}
STRATEGIES = {
    # name: (mixture_proportions kwargs, target proportions worked out by hand)
    "proportional": ({"sampling": "proportional"}, [900 / 1300, 300 / 1300, 100 / 1300]),
    "temperature": ({"sampling": "temperature", "temperature": 2.0},
                    [30 / (30 + math.sqrt(300) + 10), math.sqrt(300) / (30 + math.sqrt(300) + 10), 10 / (30 + math.sqrt(300) + 10)]),
    "uniform": ({"sampling": "uniform"}, [1 / 3, 1 / 3, 1 / 3]),
    "weights": ({"sampling": "weights", "weights": {"a": 1.0, "b": 2.0, "c": 7.0}}, [0.1, 0.2, 0.7]),
    "capped": ({"sampling": "proportional", "cap": 200}, [0.4, 0.4, 0.2]),  # T5: min(n, K) with K = 200
    "capped_temperature": ({"sampling": "temperature", "temperature": 2.0, "cap": 400},
                           [20 / (20 + math.sqrt(300) + 10), math.sqrt(300) / (20 + math.sqrt(300) + 10), 10 / (20 + math.sqrt(300) + 10)]),
}


def _task_of(index: int) -> int:
    return 0 if index < 900 else 1 if index < 1200 else 2


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_sampled_task_counts_match_the_target(strategy):
    kwargs, target = STRATEGIES[strategy]
    probs = mixture_proportions(SIZES, **kwargs)
    assert list(probs.values()) == pytest.approx(target, abs=1e-12)
    sampler = MixtureSampler(list(SIZES.values()), list(probs.values()), num_samples=10_000, seed=7)
    counts = [0, 0, 0]
    for i in sampler:
        counts[_task_of(i)] += 1
    assert sum(counts) == 10_000
    for c, p in zip(counts, target):
        assert abs(c / 10_000 - p) <= 0.02, (strategy, counts, target)


def test_same_seed_same_order_and_a_new_draw_each_epoch():
    def draw(seed, epoch=0):
        s = MixtureSampler([900, 300, 100], [0.5, 0.3, 0.2], num_samples=500, seed=seed)
        s.set_epoch(epoch)
        return list(s)

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)
    assert draw(1, epoch=1) == draw(1, epoch=1) != draw(1, epoch=0)


def test_each_example_seen_once_before_any_repeats():
    s = MixtureSampler([900, 300, 100], [0.1, 0.1, 0.8], num_samples=1000, seed=0)
    small = [i - 1200 for i in s if i >= 1200]
    assert len(small) > 200
    assert sorted(small[:100]) == list(range(100)) and sorted(small[100:200]) == list(range(100))


def test_lightning_sets_the_epoch_of_the_mixture_sampler(backbone):
    from lightning.fabric.utilities.data import _set_sampler_epoch  # what the fit loop calls each epoch

    dm = MultiTaskData(backbone=backbone, tasks=[TaskSpec("a", "builtin:arithmetic", options={"builtin_size": 40}),
                                        TaskSpec("b", "builtin:uppercase", options={"builtin_size": 20})],
                       val_fraction=0.1, test_fraction=0.1)
    dm.setup("fit")
    loader = dm.train_dataloader()
    first = list(loader.sampler)
    _set_sampler_epoch(loader, 3)
    assert loader.sampler.epoch == 3 and list(loader.sampler) != first
    # 40 - 4 - 4 arithmetic and 20 - 2 - 2 uppercase rows, less those whose prompt is held out
    # (uppercase has only 60 words, so 5 of its training rows repeat a held-out prompt)
    assert dm.train_sizes() == {"a": 32, "b": 15}
    assert len(first) == dm.describe()["examples_per_epoch"] == 47


def test_eval_batches_interleave_tasks_and_never_mix_answers():
    def ex(task, answer):
        return Example([1, 2], [1, 2], prompt_ids=[1] if answer else None, answer="x" if answer else None, task=task)

    examples = [ex("a", True), ex("a", True), ex("a", True), ex("b", True), ex("d", False), ex("d", False)]
    assert eval_batches(examples, 2) == [[0, 3], [1, 2], [4, 5]]


# ---------------------------------------------------------------------------- per-task validation
def _rows(path: Path, rows: list[tuple[str, str]]) -> str:
    path.write_text("".join(json.dumps({"instruction": q, "input": "", "output": a}) + "\n" for q, a in rows))
    return str(path)


def test_per_task_validation_metrics_through_a_trainer(backbone, tmp_path):
    import lightning as L

    from ftbench.objectives import SFT
    from ftbench.objectives.sft import sequence_losses
    from ftbench.tuners import NoTuning

    alpha_val = _rows(tmp_path / "alpha_val.jsonl", [("What is 12 + 5?", "17"), ("What is 40 - 8?", "32")])
    beta_val = _rows(tmp_path / "beta_val.jsonl", [("Write apple in capital letters.", "APPLE"),
                                                    ("Write river in capital letters.", "RIVER"),
                                                    ("Write stone in capital letters.", "STONE")])
    tasks = [TaskSpec("alpha", "builtin:arithmetic", val_source=alpha_val, test_source=alpha_val, options={"builtin_size": 10}),
             TaskSpec("beta", "builtin:uppercase", val_source=beta_val, test_source=beta_val, options={"builtin_size": 10})]
    dm = MultiTaskData(backbone=backbone, tasks=tasks, prompt_template="short", eval_batch_size=3)
    dm.setup("fit")
    assert [e.task for e in dm.splits["val"]] == ["alpha", "alpha", "beta", "beta", "beta"]
    assert eval_batches(dm.splits["val"], 3) == [[0, 2, 1], [3, 4]]  # both batches mix the tasks

    method = SFT(backbone=backbone, tuner=NoTuning())
    # exact match with a fixed "model": right on alpha, wrong on beta
    method.evaluator.predict_answers = lambda batch, prompt_cache=None: [
        a if t == "alpha" else "wrong" for a, t in zip(batch["answers"], batch["tasks"])]
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = trainer.validate(method, datamodule=dm, verbose=False)[0]

    # the same losses computed by hand, one task at a time
    collate = Collator(backbone.tokenizer.pad_token_id)
    sums = {}
    with torch.no_grad():
        for task in ("alpha", "beta"):
            batch = collate([e for e in dm.splits["val"] if e.task == task])
            logits = method.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss_sum, n_tok = sequence_losses(logits, batch["labels"])
            sums[task] = (float(loss_sum.sum()), int(n_tok.sum()))
    alpha, beta = (sums[t][0] / sums[t][1] for t in ("alpha", "beta"))
    overall = (sums["alpha"][0] + sums["beta"][0]) / (sums["alpha"][1] + sums["beta"][1])
    expected = {
        "val/loss": overall, "val/perplexity": math.exp(overall), "val/accuracy": 2 / 5,
        "val/alpha/loss": alpha, "val/alpha/perplexity": math.exp(alpha), "val/alpha/accuracy": 1.0,
        "val/beta/loss": beta, "val/beta/perplexity": math.exp(beta), "val/beta/accuracy": 0.0,
        "val/macro_loss": (alpha + beta) / 2, "val/macro_accuracy": 0.5,
    }
    assert sorted(metrics) == sorted(expected)
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, rel=1e-5), name


# ---------------------------------------------------------------------------- bad mixtures
def _specs(*names):
    return [TaskSpec(n, "builtin:arithmetic") for n in names]


def test_task_name_used_twice(backbone):
    with pytest.raises(ValueError) as err:
        MultiTaskData(backbone=backbone, tasks=_specs("a", "b", "a"))
    assert str(err.value) == "data.tasks[2].name: task name 'a' is used twice (also data.tasks[0])"


def test_task_name_with_a_slash(backbone):
    with pytest.raises(ValueError) as err:
        MultiTaskData(backbone=backbone, tasks=_specs("a/b"))
    assert str(err.value) == "data.tasks[0].name: 'a/b' is not a task name (non-empty, no '/', no surrounding spaces)"


def test_weights_that_miss_a_task(backbone):
    with pytest.raises(ValueError) as err:
        MultiTaskData(backbone=backbone, tasks=_specs("a", "b"), sampling="weights", weights={"a": 1.0})
    assert str(err.value) == "data.weights: no weight for 'b' (tasks: a, b)"


def test_weights_that_name_an_unknown_task(backbone):
    with pytest.raises(ValueError) as err:
        MultiTaskData(backbone=backbone, tasks=_specs("a", "b"), sampling="weights", weights={"a": 1.0, "b": 1.0, "c": 2.0})
    assert str(err.value) == "data.weights: 'c' is not a task (tasks: a, b)"


def test_negative_weight(backbone):
    with pytest.raises(ValueError) as err:
        MultiTaskData(backbone=backbone, tasks=_specs("a", "b"), sampling="weights", weights={"a": 1.0, "b": -0.5})
    assert str(err.value) == "data.weights: weight of 'b' is -0.5; weights must be finite and >= 0"


def test_weights_without_weights_sampling(backbone):
    with pytest.raises(ValueError) as err:
        MultiTaskData(backbone=backbone, tasks=_specs("a", "b"), weights={"a": 1.0, "b": 1.0})
    assert str(err.value) == "data.weights: given, but data.sampling is 'proportional'; set sampling: weights"


def test_all_zero_weights(backbone):
    with pytest.raises(ValueError) as err:
        MultiTaskData(backbone=backbone, tasks=_specs("a", "b"), sampling="weights", weights={"a": 0, "b": 0.0})
    assert str(err.value) == "data.weights: the weights add up to 0; give at least one task a positive weight"


# ---------------------------------------------------------------------------- prompt batches (online RL)
def test_prompt_batches_from_the_mixture(backbone):
    tasks = [TaskSpec("a", "builtin:arithmetic", options={"builtin_size": 40}),
             TaskSpec("b", "builtin:uppercase", options={"builtin_size": 20})]
    dm = MultiTaskData(backbone=backbone, tasks=tasks, prompt_template="short", val_fraction=0.1, test_fraction=0.1,
                       prompt_batches=True, batch_size=47)
    dm.setup("fit")
    loader = dm.train_dataloader()
    [batch] = list(loader)  # one epoch: 47 draws from the mixture
    assert set(batch) == {"prompt_input_ids", "prompt_attention_mask", "prompts", "answers", "tasks"}
    draws = list(loader.sampler)
    assert batch["tasks"] == [dm.splits["train"][i].task for i in draws]
    assert batch["answers"] == [dm.splits["train"][i].answer for i in draws]
    assert batch["prompts"][0].startswith("### Instruction:\n") and batch["prompts"][0].endswith("### Response:\n")
    for row, mask, i in zip(batch["prompt_input_ids"], batch["prompt_attention_mask"], draws):
        assert row[mask == 1].tolist() == dm.splits["train"][i].prompt_ids and mask[-1] == 1  # left-padded
    assert "gen_input_ids" in next(iter(dm.val_dataloader()))  # evaluation unchanged


def test_prompt_batches_refuse_a_domain_task(backbone):
    tasks = [TaskSpec("a", "builtin:arithmetic"), TaskSpec("code", "builtin:humaneval", regime="domain")]
    with pytest.raises(ValueError) as err:
        MultiTaskData(backbone=backbone, tasks=tasks, prompt_batches=True)
    assert str(err.value) == "data.prompt_batches: task 'code' (data.tasks[1]) is domain text, which has no prompts"


def test_a_mixture_has_no_source_of_its_own(backbone):
    with pytest.raises(ValueError) as err:
        MultiTaskData(backbone=backbone, source="builtin:arithmetic")
    assert str(err.value) == "data.source: each task has its own (data.tasks[i].source, ...)"


def test_shared_arguments_reach_every_task(backbone):
    dm = MultiTaskData(backbone=backbone, tasks=[TaskSpec("a", "builtin:arithmetic"), TaskSpec("b", "builtin:uppercase", options={"builtin_size": 30})],
                       builtin_size=50, truncation="drop", max_length=64, seed=3, val_fraction=0.1, test_fraction=0.0)
    a, b = dm.task_module(dm.tasks[0]), dm.task_module(dm.tasks[1])
    assert (a.builtin_size, b.builtin_size) == (50, 30)  # a task's options override
    assert {(m.truncation, m.max_length, m.seed, m.val_fraction, m.test_fraction) for m in (a, b)} == {("drop", 64, 3, 0.1, 0.0)}


# ---------------------------------------------------------------------------- shipped mixture and CLI
def test_builtin_mixture_from_the_yaml(backbone):
    args = yaml.safe_load((CONFIGS / "data" / "multitask.yaml").read_text())["init_args"]
    args["tasks"] = [TaskSpec(**t) for t in args["tasks"]]
    dm = MultiTaskData(backbone=backbone, **args)
    dm.setup("fit")
    info = dm.describe()["tasks"]
    assert list(info) == ["arithmetic", "last_word", "sort_numbers", "instruction"]
    assert {k: v["rows"]["val"] for k, v in info.items()} == dict.fromkeys(info, 10)
    # the YAML's comment
    assert {k: v["rows"]["train"] for k, v in info.items()} == {"arithmetic": 1859, "last_word": 930, "sort_numbers": 465, "instruction": 1860}
    assert {k: v["removed_as_held_out_elsewhere"] for k, v in info.items()} == {"arithmetic": 1, "last_word": 0, "sort_numbers": 0, "instruction": 0}
    assert [round(v["proportion"], 3) for v in info.values()] == [0.312, 0.22, 0.156, 0.312]
    sizes = [1859, 930, 465, 1860]
    assert [round(n / sum(sizes), 3) for n in sizes] == [0.364, 0.182, 0.091, 0.364]
    batch = next(iter(dm.val_dataloader()))
    assert batch["tasks"][:4] == list(info) and len(batch["answers"]) == 40


def test_multitask_yaml_parses():
    from ftbench.cli import cli_main

    with pytest.raises(SystemExit) as exit_:
        cli_main(["fit", "--data", str(CONFIGS / "data" / "multitask.yaml"), "--print_config"])
    assert exit_.value.code in (0, None)


def test_lora_fit_on_multitask_data_writes_per_task_results(tiny_model_dir, tmp_path):
    from ftbench.cli import cli_main

    out = tmp_path / "runs"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli_main([
            "fit", "--backbone.model", str(tiny_model_dir), "--tuner", str(CONFIGS / "tuner" / "lora.yaml"),
            "--model", str(CONFIGS / "objective" / "sft.yaml"), "--evaluate.max_new_tokens", "4",
            "--data", str(CONFIGS / "data" / "multitask.yaml"), "--data.max_train_rows", "20",
            "--data.max_eval_rows", "2", "--data.eval_batch_size", "8",
            "--trainer", str(CONFIGS / "trainer" / "cpu.yaml"), "--trainer.max_steps", "2",
            "--trainer.val_check_interval", "2", "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
            "--out", str(out), "--run_id", "multitask",
        ])
    info = json.loads((out / "multitask.json").read_text())["train_info"]
    assert info["status"] == "completed"
    assert info["data"]["regime"] == "multitask"
    assert list(info["data"]["tasks"]) == ["arithmetic", "last_word", "sort_numbers", "instruction"]
    final = info["final"]
    for stage in ("val", "test"):
        for task in info["data"]["tasks"]:
            for kind in ("loss", "accuracy", "perplexity"):
                assert f"{stage}/{task}/{kind}" in final, (stage, task, kind)
        assert f"{stage}/macro_accuracy" in final and f"{stage}/macro_loss" in final
    losses = [final[f"val/{t}/loss"] for t in info["data"]["tasks"]]
    assert final["val/macro_loss"] == pytest.approx(sum(losses) / 4, rel=1e-6)


def test_a_domain_task_in_the_mixture(backbone, tmp_path):
    text = tmp_path / "code.txt"
    text.write_text("\n\n".join(f"def f{i}(x):\n    return x + {i}" for i in range(12)) + "\n")
    tasks = [TaskSpec("arithmetic", "builtin:arithmetic", options={"builtin_size": 20}),
             TaskSpec("code", str(text), regime="domain", options={"max_length": 32})]
    dm = MultiTaskData(backbone=backbone, tasks=tasks, sampling="uniform", val_fraction=0.2, test_fraction=0.1, eval_batch_size=8)
    dm.setup("fit")
    assert {e.task for e in dm.splits["val"]} == {"arithmetic", "code"}
    code_train = dm.task_splits["code"]["train"]
    assert code_train and all(len(e.input_ids) <= 32 and e.labels == e.input_ids for e in code_train)
    # an evaluation batch holds either instruction rows (with answers) or domain blocks, never both
    for batch in dm.val_dataloader():
        assert set(batch["tasks"]) in ({"arithmetic"}, {"code"})
        assert ("answers" in batch) == (batch["tasks"][0] == "arithmetic")
    # training batches mix them; position ids only come with batches made only of packed blocks
    batch = dm.collator()([dm.task_splits["arithmetic"]["train"][0], code_train[0]])
    assert batch["tasks"] == ["arithmetic", "code"] and "position_ids" not in batch
    assert "position_ids" in dm.collator()(code_train[:2])
