"""The quickstart LoRA run against a bare script doing the same work, and what its test stage costs
against its generation (issue 22: "evaluation at the cost of its generation, and a lighter start").

    nice python scripts/bench_quickstart.py [--model embedded|tiny] [--rounds 2] [--before /path/to/old/checkout]
                                            [--parts stage,startup,runs]

Three parts, each measured side by side with the sides interleaved round by round (drift in a shared
machine's load falls on every side):

* ``stage`` (in this process): on the test rows of configs/data/instruction.yaml (100 rows, batches of
  50) with LoRA (configs/tuner/lora.yaml, its B matrices drawn so that the adapter changes the answers):
  ``generate`` alone (unmerged and merged), the test stage as it was (the full-logit loss forward, then
  ``generate`` encoding the prompts again) and as it is (:mod:`ftbench.evaluation.answer_forward`: one
  forward, the answer tokens' logits only, its cache continued by ``generate``), unmerged and merged.
  Prints each side's seconds and the ratios, and whether the answers of every side are the same.
* ``startup``: ``ftbench fit --help`` (this checkout, and ``--before``'s) against
  ``python -c "import torch, transformers, peft"`` (what the bare script imports), wall seconds.
* ``runs``: ``ftbench fit`` of the quickstart (LoRA, the shipped configs, logger off) against
  scripts/bare_quickstart.py on the same batches (this script collates them with ftbench's data module
  and writes them for it), wall seconds of the whole process; with ``--before``, ``ftbench fit`` of that
  checkout too (its record gives the exact match to compare).

``--model tiny`` runs everything on the tiny random Llama (seconds; for checking the script).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(ROOT))


def model_value(args, work: Path) -> str:
    if args.model != "tiny":
        return args.model
    from ftbench.testing import build_tiny_llama

    path = work / "tiny"
    if not path.exists():
        build_tiny_llama(path)
    return str(path)


def lora_config():
    import yaml
    from peft import LoraConfig

    spec = yaml.safe_load((ROOT / "configs/tuner/lora.yaml").read_text())["init_args"]
    return LoraConfig(**spec["peft_config"]["init_args"]), spec["lr"]


def data_module(backbone):
    import yaml

    from ftbench.data import InstructionData

    init = yaml.safe_load((ROOT / "configs/data/instruction.yaml").read_text())["init_args"]
    dm = InstructionData(backbone=backbone, **init)
    dm.setup("fit")
    dm.setup("test")
    return dm


# ---------------------------------------------------------------------------- the test stage
def stage(model: str, rounds: int, test_rows: int) -> dict:
    import torch

    from ftbench.backbone import Backbone
    from ftbench.evaluation.evaluator import Evaluator
    from ftbench.objectives import SFT
    from ftbench.objectives.sft import target_losses
    from ftbench.tuners import Peft

    config, lr = lora_config()
    backbone = Backbone(model=model)
    dm = data_module(backbone)
    method = SFT(backbone=backbone, tuner=Peft(peft_config=config, lr=lr), evaluator=Evaluator(data=dm))
    method.configure_model()
    method.model.eval()
    torch.manual_seed(0)
    for name, p in method.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01)  # a trained-looking adapter: it changes some answers
    batches = list(dm.test_dataloader())
    if test_rows < sum(len(b["answers"]) for b in batches):  # the first rows, in one batch
        dm.splits["test"] = dm.splits["test"][:test_rows]
        batches = list(dm.test_dataloader())
    ev = method.evaluator

    def generate():
        return [a for b in batches for a in ev.predict_answers(b)]

    def old_stage():
        out = []
        for b in batches:
            method.loss(b)
            out += ev.predict_answers(b)
        return out

    def new_stage():
        out = []
        for b in batches:
            fwd = ev.answer_forward(b, "test")
            target_losses(fwd.logits, fwd.targets)
            out += ev.predict_answers(b, fwd.prompt_cache)
        return out

    sides = {"generate": generate, "stage_before": old_stage, "stage_after": new_stage}
    times: dict[str, list[float]] = {}
    answers: dict[str, list[str]] = {}
    with torch.no_grad():
        ev.predict_answers(batches[0])  # warm-up (first-call allocations and kernel choices), not timed
        for _ in range(rounds):
            for merged in (False, True):
                if merged:
                    assert method.tuner.merge_for_evaluation(method.model, backbone)
                for name, fn in sides.items():
                    key = f"{name}{'_merged' if merged else ''}"
                    t0 = time.perf_counter()
                    answers[key] = fn()
                    times.setdefault(key, []).append(time.perf_counter() - t0)
                if merged:
                    method.tuner.unmerge_after_evaluation(method.model)
    med = {k: statistics.median(v) for k, v in times.items()}
    reference = answers["generate"]
    exact = {k: sum(ev.exact_match(None).row_values(a, [r for b in batches for r in b["answers"]])) for k, a in answers.items()}
    return {"rows": len(reference), "seconds": {k: [round(x, 2) for x in v] for k, v in times.items()},
            "ratios": {
                "before: test stage / its generate (unmerged)": med["stage_before"] / med["generate"],
                "after: test stage / its generate (merged)": med["stage_after_merged"] / med["generate_merged"],
                "after: test stage / its generate (unmerged)": med["stage_after"] / med["generate"],
                "generate unmerged / merged": med["generate"] / med["generate_merged"],
                "after / before test stage": med["stage_after_merged"] / med["stage_before"]},
            "same_answers_as_plain_generate": {k: a == reference for k, a in answers.items()},
            "exact_match_rows": exact}


# ---------------------------------------------------------------------------- start-up and whole runs
def timed(argv: list[str], cwd: Path, env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return wall, done.stdout


def env_for(checkout: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(checkout), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def startup(checkouts: dict[str, Path], rounds: int) -> dict:
    sides = {"bare imports": ([sys.executable, "-c", "import torch, transformers, peft"], ROOT)}
    for name, path in checkouts.items():
        sides[f"ftbench fit --help ({name})"] = ([sys.executable, "-m", "ftbench.cli", "fit", "--help"], path)
    times: dict[str, list[float]] = {}
    for _ in range(rounds):
        for name, (argv, cwd) in sides.items():
            times.setdefault(name, []).append(timed(argv, cwd, env_for(cwd if "ftbench" in name else ROOT))[0])
    return {k: [round(x, 2) for x in v] for k, v in times.items()}


def write_batches(model: str, work: Path) -> Path:
    """The batches of the quickstart run, collated by ftbench's data module, for the bare script."""
    import torch
    import yaml

    from ftbench.backbone import Backbone

    config, lr = lora_config()
    backbone = Backbone(model=model)
    dm = data_module(backbone)
    trainer = yaml.safe_load((ROOT / "configs/trainer/quickstart.yaml").read_text())
    objective = yaml.safe_load((ROOT / "configs/objective/sft.yaml").read_text())["init_args"]
    torch.manual_seed(42)
    train, loader = [], dm.train_dataloader()
    while len(train) < trainer["max_steps"]:
        for b in loader:
            train.append(b)
            if len(train) == trainer["max_steps"]:
                break
    keys = ("input_ids", "attention_mask", "labels", "gen_input_ids", "gen_attention_mask", "answers")
    val = [{k: b[k] for k in keys} for b in list(dm.val_dataloader())[: trainer["limit_val_batches"]]]
    test = [{k: b[k] for k in keys} for b in dm.test_dataloader()]
    spec = {"model": backbone.resolve(), "seed": 42, "lr": lr, "warmup_steps": objective["warmup_steps"],
            "val_every": trainer["val_check_interval"], "budget": int(dm.max_answer_tokens),
            "lora": {k: getattr(config, k) for k in ("r", "lora_alpha", "lora_dropout", "target_modules")},
            "train": [{k: b[k] for k in ("input_ids", "attention_mask", "labels")} for b in train], "val": val,
            "test": test}
    path = work / "batches.pt"
    torch.save(spec, path)
    return path


def runs(model: str, checkouts: dict[str, Path], rounds: int, work: Path) -> dict:
    batches = write_batches(model, work)
    sides = {"bare": ([sys.executable, str(ROOT / "scripts/bare_quickstart.py"), str(batches)], ROOT)}
    for name, path in checkouts.items():
        sides[f"ftbench ({name})"] = (
            [sys.executable, "-m", "ftbench.cli", "fit", "--backbone.model", model, "--tuner", "configs/tuner/lora.yaml",
             "--model", "configs/objective/sft.yaml", "--data", "configs/data/instruction.yaml",
             "--trainer", "configs/trainer/quickstart.yaml", "--trainer.logger", "false",
             "--out", str(work / name), "--overwrite", "true"], path)
    times: dict[str, list[float]] = {}
    details: dict[str, dict] = {}
    for _ in range(rounds):
        for name, (argv, cwd) in sides.items():
            wall, out = timed(argv, cwd, env_for(cwd))
            times.setdefault(name, []).append(wall)
            if name == "bare":
                details[name] = json.loads(next(x for x in out.splitlines() if x.startswith("bare: "))[6:])
            else:
                rid = next(x for x in out.splitlines() if x.startswith("[ftbench] ")).split()[1].rstrip(":")
                info = json.loads((work / name.split("(")[1].rstrip(")") / f"{rid}.json").read_text())["train_info"]
                details[name] = {"fit_seconds": info.get("fit_seconds"), "test_seconds": info.get("test_seconds"),
                                 "test_accuracy": info["final"].get("test/accuracy"), "test_loss": info["final"].get("test/loss")}
    bare = statistics.median(times["bare"])
    return {"seconds": {k: [round(x, 1) for x in v] for k, v in times.items()},
            "ratio_to_bare": {k: statistics.median(v) / bare for k, v in times.items()}, "details": details}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="embedded", help="a backbone.model value, or 'tiny'")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--before", default=None, help="another checkout of ftbench (e.g. main) to run beside this one")
    ap.add_argument("--parts", default="stage,startup,runs")
    ap.add_argument("--test-rows", type=int, default=100, help="the stage part on the first N test rows (all: 100)")
    ap.add_argument("--out", default=None, help="write the summary JSON here")
    args = ap.parse_args(argv)
    checkouts = {"this": ROOT, **({"before": Path(args.before).resolve()} if args.before else {})}
    summary: dict = {"model": args.model, "rounds": args.rounds, "load_average": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = model_value(args, work)
        for part in args.parts.split(","):
            t0 = time.perf_counter()
            if part == "stage":
                summary[part] = stage(model, args.rounds, args.test_rows)
            elif part == "startup":
                summary[part] = startup(checkouts, args.rounds)
            elif part == "runs":
                summary[part] = runs(model, checkouts, args.rounds, work)
            print(f"{part} ({time.perf_counter() - t0:.0f} s): {json.dumps(summary[part], indent=1)}", flush=True)
    summary["load_average_end"] = os.getloadavg()
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
