"""Before/after with the new answer metrics, and what each metric costs in evaluation time.

    python scripts/bench_evaluation.py [--out results/bench_evaluation] [--steps 40] [--skip-runs]

On the embedded model (SmolLM2-135M-Instruct) and two data sets:

* ``instruction``: the built-in instruction task (configs/data/instruction_metrics.yaml) scored by exact
  match, a loose exact match (first line, case and punctuation ignored), ROUGE-L, chrF and BLEU;
* ``mixture``: two tasks this script writes, each with its own metrics (data.tasks[i].metrics):
  ``number_words`` (open answer: "Write the number 347 in words." -> "three hundred forty-seven"; exact
  match, ROUGE-L, chrF, BLEU, and multiple choice among the right words and three near misses) and
  ``fruit_or_animal`` (a label task: exact match, label_accuracy over {fruit, animal}, multiple choice).

For each: the baseline (``ftbench test``, tuner none) and LoRA (``ftbench fit``, configs/tuner/lora.yaml,
``--steps`` steps of 8 rows), each in its own process; the numbers come from the records. Then, in this
process on the untuned model, the evaluation time of each part on the same test rows: the loss forward,
greedy generation (shared by every generation metric), each metric on the generated answers (its row
values and, for chrF/BLEU, the corpus value), and the log-likelihood scoring of the options (shared by
mc_accuracy and mc_accuracy_norm). Prints markdown tables and writes ``summary.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen").split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
FRUITS = ("apple orange lemon banana cherry grape mango peach pear plum kiwi melon apricot fig lime papaya "
          "coconut strawberry raspberry blueberry pineapple watermelon nectarine guava").split()
ANIMALS = ("tiger rabbit zebra kitten parrot falcon horse donkey giraffe elephant monkey wolf fox bear otter "
           "beaver eagle dolphin whale camel lion leopard squirrel badger").split()
INSTRUCTION_METRICS = ["exact_match", {"metric": "exact_match", "name": "exact_match_loose", "first_line": True,
                                       "ignore_case": True, "ignore_punctuation": True}, "rouge_l", "chrf", "bleu"]
NUMBER_METRICS = ["exact_match", "rouge_l", "chrf", "bleu", "mc_accuracy", "mc_accuracy_norm"]
LABEL_METRICS = ["exact_match", {"metric": "label_accuracy", "labels": ["fruit", "animal"]}, "mc_accuracy",
                 "mc_accuracy_norm"]


def words(n: int) -> str:
    """0 <= n < 1000 in English words: 347 -> three hundred forty-seven."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + (f"-{ONES[n % 10]}" if n % 10 else "")
    return f"{ONES[n // 100]} hundred" + (f" {words(n % 100)}" if n % 100 else "")


def number_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for k in rng.sample(range(1, 1000), n):
        near = {words(k + 1 if k < 999 else k - 1), words(k + 10 if k < 990 else k - 10),
                words(k + 100 if k < 900 else k - 100)} - {words(k)}
        choices = [words(k), *sorted(near)]
        rng.shuffle(choices)
        out.append({"instruction": f"Write the number {k} in words.", "choices": choices,
                    "gold": choices.index(words(k)), "task": "number_words"})
    return out


def label_rows() -> list[dict]:
    templates = ("Is a {w} a fruit or an animal?", "{w}: fruit or animal?",
                 "Tell me whether a {w} is a fruit or an animal.")
    out = []
    for w in FRUITS + ANIMALS:
        for t in templates:
            label = "fruit" if w in FRUITS else "animal"
            out.append({"instruction": t.format(w=w), "output": label, "choices": ["fruit", "animal"],
                        "gold": 0 if label == "fruit" else 1, "task": "fruit_or_animal"})
    return out


def write_data(folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rows in (("number_words", number_rows(400)), ("fruit_or_animal", label_rows())):
        p = folder / f"{name}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(p)
    return paths[0], paths[1]


def mixture_config(folder: Path, numbers: Path, labels: Path) -> Path:
    cfg = {"class_path": "ftbench.data.MultiTaskData", "init_args": {
        "tasks": [{"name": "number_words", "source": str(numbers), "metrics": NUMBER_METRICS},
                  {"name": "fruit_or_animal", "source": str(labels), "metrics": LABEL_METRICS}],
        "sampling": "uniform", "max_length": 256, "val_fraction": 0.1, "test_fraction": 0.2,
        "max_eval_rows": 20, "batch_size": 8, "eval_batch_size": 40, "prompt_template": "auto"}}
    path = folder / "mixture.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def instruction_config(folder: Path) -> Path:
    import yaml

    cfg = yaml.safe_load((ROOT / "configs/data/instruction_metrics.yaml").read_text())
    cfg["init_args"]["metrics"] = INSTRUCTION_METRICS
    path = folder / "instruction.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run(sub: str, tuner: str, data: Path, out: Path, steps: int) -> dict:
    argv = [sys.executable, "-m", "ftbench.cli", sub, "--backbone", "configs/backbone/embedded.yaml",
            "--tuner", tuner, "--model", "configs/objective/sft.yaml", "--evaluate.generate_in_validation",
            "false", "--data", str(data), "--trainer", "configs/trainer/quickstart.yaml", "--trainer.max_steps",
            str(steps), "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--out", str(out),
            "--overwrite", "true"]
    t0 = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    line = next(x for x in done.stdout.splitlines() if x.startswith("[ftbench] "))
    rid = line.split()[1].rstrip(":")
    rec = json.loads((out / f"{rid}.json").read_text())
    rec["_wall"] = time.perf_counter() - t0
    return rec


def reusable(out: Path, sub: str, tuner: str, wait_s: float = 3600) -> dict | None:
    """A record of this data set's run already in ``out`` (``--reuse``); one still running is waited for."""
    label = "sft+" + Path(tuner).stem
    deadline = time.time() + wait_s
    while True:
        found = None
        for f in sorted(out.glob("*.json")):
            rec = json.loads(f.read_text())
            if rec["run_info"].get("subcommand") == sub and rec["train_info"].get("method") == label:
                found = rec
        if found is None or found["train_info"]["status"] != "running" or time.time() > deadline:
            return found if found is not None and found["train_info"]["status"] == "completed" else None
        time.sleep(20)


def timings(data: Path, repeats: int = 3, max_rows: int = 40) -> dict:
    """Evaluation time of each part on the untuned model over the first ``max_rows`` test rows (seconds)."""
    import importlib

    import torch
    import yaml

    from ftbench.backbone import Backbone
    from ftbench.evaluation.evaluator import Evaluator
    from ftbench.objectives import SFT
    from ftbench.tuners import NoTuning

    backbone = Backbone()
    cfg = yaml.safe_load(data.read_text())
    module, _, cls = cfg["class_path"].rpartition(".")

    init = dict(cfg["init_args"])
    if "tasks" in init:
        from ftbench.data.multitask import TaskSpec

        init["tasks"] = [TaskSpec(**t) for t in init["tasks"]]
    dm = getattr(importlib.import_module(module), cls)(backbone=backbone, **init)
    dm.setup("test")
    method = SFT(backbone=backbone, tuner=NoTuning(), evaluator=Evaluator(data=dm))
    method.configure_model()
    method.model.eval()
    batches, rows = [], 0
    for b in dm.test_dataloader():
        if rows >= max_rows:
            break
        batches.append(b)
        rows += len(b["answers"])
    out: dict = {"rows": rows}
    with torch.no_grad():
        t0 = time.perf_counter()
        for b in batches:
            method.loss(b)
        out["loss forward"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        preds = [method.evaluator.predict_answers(b) for b in batches]
        out["generation"] = time.perf_counter() - t0
        if any(b.get("choice_ids") is not None for b in batches):
            t0 = time.perf_counter()
            for b in batches:
                if b.get("choice_ids") is not None:
                    method.evaluator.choice_scores(b)
            out["choice scoring (mc_*)"] = time.perf_counter() - t0
    per_metric: dict = {}
    for b, p in zip(batches, preds):
        tasks = b.get("tasks") or [None] * len(p)
        for t in sorted(set(tasks), key=str):
            idx = [i for i, x in enumerate(tasks) if x == t]
            for m in dm.metrics_for(t):
                if m.needs_choices:
                    continue
                pp, rr = [p[i] for i in idx], [b["answers"][i] for i in idx]
                best = float("inf")
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    m.row_values(pp, rr)
                    if m.corpus:
                        c = m.corpus_metric()
                        c.update(*m.corpus_inputs(pp, rr))
                        c.compute()
                    best = min(best, time.perf_counter() - t0)
                per_metric[m.name] = per_metric.get(m.name, 0.0) + best
    out["metrics"] = per_metric
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/bench_evaluation")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--skip-runs", action="store_true", help="only the timings")
    ap.add_argument("--reuse", action="store_true", help="take a completed record of a run from --out instead of "
                    "running it again (one still running is waited for)")
    ap.add_argument("--timing-rows", type=int, default=40, help="test rows the timings are taken on")
    args = ap.parse_args(argv)
    out = (ROOT / args.out).resolve()
    numbers, labels = write_data(out / "data")
    configs = {"instruction": instruction_config(out / "data"), "mixture": mixture_config(out / "data", numbers, labels)}
    summary: dict = {"steps": args.steps, "runs": {}, "timings": {}}
    if not args.skip_runs:
        for name, data in sorted(configs.items(), reverse=args.reuse):
            for label, sub, tuner in (("baseline", "test", "configs/tuner/none.yaml"),
                                      ("lora", "fit", "configs/tuner/lora.yaml")):
                rec = reusable(out / name, sub, tuner) if args.reuse else None
                if rec is None:
                    rec = run(sub, tuner, data, out / name, args.steps)
                else:
                    rec["_wall"] = None
                info = rec["train_info"]
                summary["runs"][f"{name}/{label}"] = {
                    "final": {k: v for k, v in info["final"].items() if k.startswith("test/") and not k.endswith(("loss", "perplexity"))},
                    "test_seconds": info.get("test_seconds"), "fit_seconds": info.get("fit_seconds"),
                    "wall_s": rec["_wall"], "predictions": info.get("predictions"), "run_id": rec["run_info"]["run_id"]}
                print(f"{name}/{label}: {rec['run_info']['run_id']} test {info.get('test_seconds', 0):.1f} s", flush=True)
    for name, data in configs.items():
        summary["timings"][name] = timings(data, max_rows=args.timing_rows)
        print(f"timings {name}: {json.dumps(summary['timings'][name])}", flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(tables(summary))
    return 0


def tables(summary: dict) -> str:
    lines = []
    runs = summary["runs"]
    for name in ("instruction", "mixture"):
        base, lora = runs.get(f"{name}/baseline"), runs.get(f"{name}/lora")
        if not base or not lora:
            continue
        keys = sorted(set(base["final"]) | set(lora["final"]))
        lines += [f"\n{name}: baseline (tuner none) vs LoRA ({summary['steps']} steps)", "",
                  "| metric | baseline | LoRA |", "|---|---:|---:|"]
        for k in keys:
            b, a = base["final"].get(k), lora["final"].get(k)
            lines.append(f"| {k} | {'–' if b is None else f'{100 * b:.1f}%'} | {'–' if a is None else f'{100 * a:.1f}%'} |")
    for name, t in summary["timings"].items():
        lines += [f"\n{name}: evaluation time on {t['rows']} test rows (untuned model, this machine)", "",
                  "| part | seconds |", "|---|---:|"]
        for k in ("loss forward", "generation", "choice scoring (mc_*)"):
            if k in t:
                lines.append(f"| {k} | {t[k]:.2f} |")
        for k, v in t["metrics"].items():
            lines.append(f"| metric {k} (on the answers) | {v:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
