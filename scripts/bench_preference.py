"""What do preference objectives cost, and what does DPO do on the built-in pairs? Measured on the embedded
SmolLM2-135M-Instruct (float32) on the built-in preference pairs (builtin:instruction, chat template).

    python scripts/bench_preference.py                        # all 14 configurations (the six reward/DPO ones: ~15 min on 2 idle CPU cores)
    python scripts/bench_preference.py --runs dpo+lora,kto+lora,cpo+lora,simpo+lora,orpo+lora --parts memory,time
    python scripts/bench_preference.py --rounds 5 --quality-steps 40 --out /tmp/bench

Every preference objective under LoRA (configs/tuner/lora.yaml) and full fine-tuning (configs/tuner/full.yaml):
the reward model, DPO with the reference on the fly (configs/objective/dpo.yaml) and precomputed
(dpo_precomputed.yaml), KTO (kto.yaml, on the same pairs unpaired: ``2 x --batch-size`` rows a step, the
same number of sequences), and the reference-free CPO (cpo.yaml), SimPO (simpo.yaml) and ORPO (orpo.yaml);
``--batch-size`` pairs a step. The ratios set the reference-free methods' memory and time against DPO's.

Part 1, memory: each configuration is a real ``ftbench fit`` of ``--steps`` steps in its own process (a
clean peak), read from its record: ``memory.peak_bytes`` (on CPU the process's resident high-water mark,
reset when training starts: it includes the Python process and the loaded weights) and
``memory_breakdown`` (weights, gradients, optimizer state, activations saved for backward, predicted
peak: counted from the tensors, so the machine's load does not move them). The precomputed runs write
their reference log-probs to a fresh cache folder under ``--out`` (part 2 reads them from there); the
time of that one pass (over every split of the ``--builtin-size`` pairs) is read back from the cache file.

Part 2, time per step: the configurations of a group (the LoRA ones; the full ones with dpo+lora) are
built side by side in one process and trained in rounds, one step each per round on the same batch, the
order rotated every round, so that a change in the machine's load (other processes on a shared machine)
falls on all of them alike; ``--rounds`` rounds after one warm-up round. A step is ``training_step`` + ``backward`` + AdamW step, as Lightning runs it
(``Throughput`` measures the same span in a record). Reported per configuration: the fastest and the
median step; the ratios are of the fastest steps (what a step costs when nothing else takes the cores:
other processes only ever add time), with the median over rounds of the within-round ratio beside them.
The records' own step times (part 1, runs one after another) are shown too; on a loaded machine they drift.

Part 3, quality: DPO (LoRA) for ``--quality-steps`` steps, validated before and after on ``--quality-val``
pairs: exact match of the greedy answer (``val/accuracy``) and ``val/rewards/accuracies``. Before
training the policy is the reference, so every implicit reward is 0 and ``rewards/accuracies`` is 0 by
construction (a tie is not a win).

Writes ``{out}/bench_preference.json`` (every number) after each run and round, and prints markdown
tables; an interrupted invocation goes on from that file when run again with the same ``--out``
(``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional

ROOT = Path(__file__).resolve().parent.parent
MB = 2**20

# name -> (objective config, tuner config, extra CLI arguments)
COST_RUNS = {
    "reward+lora": ("reward", "lora", []),
    "reward+full": ("reward", "full", []),
    "dpo+lora": ("dpo", "lora", []),
    "dpo+lora precomputed": ("dpo_precomputed", "lora", []),
    "dpo+full": ("dpo", "full", []),
    "dpo+full precomputed": ("dpo_precomputed", "full", []),
    "kto+lora": ("kto", "lora", []),
    "kto+full": ("kto", "full", []),
    "cpo+lora": ("cpo", "lora", []),
    "cpo+full": ("cpo", "full", []),
    "simpo+lora": ("simpo", "lora", []),
    "simpo+full": ("simpo", "full", []),
    "orpo+lora": ("orpo", "lora", []),
    "orpo+full": ("orpo", "full", []),
}
#: the data config of an objective (default: the pairs); KTO reads them unpaired, two rows a pair
DATA = {"kto": "unpaired"}
ROWS_PER_PAIR = {"kto": 2}
#: part 2 builds each group's configurations side by side (one process's memory holds a group, not all six);
#: ratios across groups compare fastest steps of different rounds
GROUPS = [("reward+lora", "dpo+lora", "dpo+lora precomputed"),
          ("reward+full", "dpo+full", "dpo+full precomputed", "dpo+lora"),
          ("dpo+lora", "kto+lora", "cpo+lora", "simpo+lora", "orpo+lora"),
          ("dpo+full", "cpo+full", "orpo+full", "dpo+lora"),
          ("dpo+full", "kto+full", "simpo+full", "dpo+lora")]
RATIOS = [  # (numerator, denominator, what it says)
    ("dpo+lora precomputed", "dpo+lora", "DPO LoRA: precomputed / on the fly"),
    ("dpo+full precomputed", "dpo+full", "DPO full: precomputed / on the fly (frozen copy)"),
    ("dpo+lora", "reward+lora", "LoRA: DPO / reward model"),
    ("dpo+full", "reward+full", "full: DPO / reward model"),
    ("dpo+full", "dpo+lora", "DPO: full / LoRA"),
    ("reward+full", "reward+lora", "reward model: full / LoRA"),
    ("kto+lora", "dpo+lora", "LoRA: KTO / DPO"),
    ("cpo+lora", "dpo+lora", "LoRA: CPO / DPO (no reference)"),
    ("simpo+lora", "dpo+lora", "LoRA: SimPO / DPO (no reference)"),
    ("orpo+lora", "dpo+lora", "LoRA: ORPO / DPO (no reference)"),
    ("kto+full", "dpo+full", "full: KTO / DPO"),
    ("cpo+full", "dpo+full", "full: CPO / DPO (no reference, no frozen copy)"),
    ("simpo+full", "dpo+full", "full: SimPO / DPO (no reference, no frozen copy)"),
    ("orpo+full", "dpo+full", "full: ORPO / DPO (no reference, no frozen copy)"),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="results/bench_preference", help="records, caches and the JSON summary")
    p.add_argument("--backbone", default="configs/backbone/embedded.yaml")
    p.add_argument("--steps", type=int, default=3, help="training steps of each memory run (the breakdown is "
                   "measured on the 2nd; the record's throughput leaves 2 out)")
    p.add_argument("--batch-size", type=int, default=4, help="pairs a step")
    p.add_argument("--builtin-size", type=int, default=60, help="built-in pairs of the memory and timing runs (the "
                   "precompute pass reads them all: train, val and test)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds of part 2 (after one warm-up round)")
    p.add_argument("--quality-steps", type=int, default=20)
    p.add_argument("--quality-val", type=int, default=40, help="validation pairs of the quality run")
    p.add_argument("--parts", default="memory,time,quality", help="comma-separated subset of memory,time,quality")
    p.add_argument("--runs", default=",".join(COST_RUNS), help="comma-separated configurations of parts 1 and 2")
    p.add_argument("--fresh", action="store_true", help="start over (default: go on from {out}/bench_preference.json)")
    return p.parse_args(argv)


def fit(args: argparse.Namespace, out: Path, objective: str, tuner: str, extra: list[str], log: Path) -> dict[str, Any]:
    """One ``ftbench fit`` in a fresh process; returns its record."""
    before = set(out.glob("*.json"))
    cmd = [sys.executable, "-m", "ftbench.cli", "fit", "--backbone", args.backbone,
           "--tuner", f"configs/tuner/{tuner}.yaml", "--model", f"configs/objective/{objective}.yaml",
           "--data", f"configs/data/{DATA.get(objective, 'preference')}.yaml", "--trainer", "configs/trainer/cpu.yaml",
           "--data.init_args.batch_size", str(args.batch_size * ROWS_PER_PAIR.get(objective, 1)),
           "--trainer.enable_progress_bar", "false",
           "--out", str(out), *extra]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    new = sorted(set(out.glob("*.json")) - before, key=lambda p: p.stat().st_mtime)
    if done.returncode != 0 or not new:
        raise SystemExit(f"run failed ({done.returncode}): {' '.join(cmd)}\n--- {log} ---\n{log.read_text()[-3000:]}")
    record = json.loads(new[-1].read_text())
    record["_wall_s"] = time.perf_counter() - t0
    return record


def cost_row(name: str, record: dict[str, Any], cache_dir: Optional[Path]) -> dict[str, Any]:
    info = record["train_info"]
    mb = info.get("memory_breakdown") or {}

    def part(key: str) -> Optional[int]:
        v = mb.get(key)
        return v.get("bytes") if isinstance(v, dict) else v

    row = {"run": name, "method": info["method"], "trainable": info["params"]["trainable"],
           "peak_bytes": info["memory"]["peak_bytes"], "peak_source": info["memory"]["source"],
           "step_s": info["throughput"]["step_time_mean_s"], "timed_steps": info["throughput"]["timed_batches"],
           "weights_bytes": part("weights"), "gradients_bytes": part("gradients"), "optimizer_bytes": part("optimizer"),
           "activations_bytes": part("activations"), "predicted_peak_bytes": mb.get("predicted_peak_bytes"),
           "fit_seconds": info["fit_seconds"], "wall_s": record["_wall_s"], "run_id": record["run_info"]["run_id"]}
    if cache_dir is not None:
        import torch

        files = sorted(cache_dir.glob("*.pt"), key=lambda p: p.stat().st_mtime)
        if files:
            data = torch.load(files[-1], map_location="cpu", weights_only=True)
            row["reference_pass_s"], row["reference_pairs"] = data.get("seconds"), len(data["keys"])
            row["reference_cache_bytes"] = files[-1].stat().st_size
    return row


def mb_(v: Optional[float]) -> str:
    return "—" if v is None else f"{v / MB:,.0f}"


def cache_dir(out: Path, name: str) -> Path:
    return out / "reference_cache" / name.replace(" ", "_").replace("+", "_")


def interleaved_step_times(args: argparse.Namespace, names: list[str], out: Path, rounds: int) -> Iterator[dict[str, float]]:
    """Part 2: the configurations side by side in this process, one step each per round on the same
    batch, the order rotated each round; yields each round's step times after a warm-up round."""
    import itertools
    import warnings

    import lightning as L
    import torch
    import yaml

    from ftbench.backbone import Backbone
    from ftbench.data.preference import PreferenceData
    from ftbench.data.unpaired import UnpairedData
    from ftbench.estimate import instantiate_config
    from ftbench.objectives import CPO, DPO, KTO, ORPO, Reward
    from ftbench.tuners.base import Tuner

    warnings.filterwarnings("ignore")  # self.log outside a trainer, peft's and transformers' notices
    spec = yaml.safe_load((ROOT / args.backbone).read_text())
    backbone = Backbone(**(spec.get("init_args", spec) or {}))
    batches = {}
    for kind, cls in (("preference", PreferenceData), ("unpaired", UnpairedData)):
        data = yaml.safe_load((ROOT / f"configs/data/{kind}.yaml").read_text())["init_args"]
        data.update(builtin_size=args.builtin_size, batch_size=args.batch_size * (2 if kind == "unpaired" else 1))
        dm = cls(backbone=backbone, **data)
        dm.setup("fit")
        batches[kind] = list(itertools.islice(itertools.cycle(dm.train_dataloader()), rounds + 1))
        if kind == "preference":
            pair_dm = dm
    classes = {"kto": KTO, "cpo": CPO, "simpo": CPO, "orpo": ORPO}
    sides = {}
    for name in names:
        objective, tuner_name, _ = COST_RUNS[name]
        tuner = instantiate_config("tuner", tuner_name, Tuner)
        if objective == "reward":
            obj = Reward(backbone=backbone, tuner=tuner)
        elif objective in classes:  # the shipped YAML's loss settings
            settings = yaml.safe_load((ROOT / f"configs/objective/{objective}.yaml").read_text())["init_args"]
            settings = {k: v for k, v in settings.items() if k not in ("optimizer", "lr_scheduler", "warmup_steps")}
            obj = classes[objective](backbone=backbone, tuner=tuner, **settings)
        else:  # the memory run's cache: the same backbone, data, precision and (seeded alike) initial weights
            obj = DPO(backbone=backbone, tuner=tuner, precompute_reference=objective == "dpo_precomputed",
                      reference_cache_dir=str(cache_dir(out, name)))
        L.seed_everything(42, verbose=False)  # as `ftbench fit` seeds before the model is built
        obj.configure_model()
        if objective == "dpo_precomputed":
            obj.ensure_reference_table(pair_dm)
        opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=tuner.lr, weight_decay=0.0)
        sides[name] = (obj, opt)
    for r in range(rounds + 1):
        k = r % len(names)
        took = {}
        for name in names[k:] + names[:k]:
            obj, opt = sides[name]
            batch = batches[DATA.get(COST_RUNS[name][0], "preference")][r]
            t0 = time.perf_counter()
            loss = obj.training_step(batch, r)["loss"]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            took[name] = time.perf_counter() - t0
        print(f"         round {r}{' (warm-up)' if r == 0 else ''}: " + ", ".join(f"{n} {took[n]:.1f} s" for n in names),
              flush=True)
        if r > 0:
            yield took
    del sides


def main(argv=None) -> int:
    args = parse_args(argv)
    out = (ROOT / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = set(args.parts.split(","))
    names = [n for n in COST_RUNS if n in args.runs.split(",")]
    path = out / "bench_preference.json"
    summary: dict[str, Any] = {"settings": vars(args), "cost": [], "time": None, "quality": None}
    if path.is_file() and not args.fresh:  # go on where an interrupted invocation stopped
        previous = json.loads(path.read_text())
        summary.update({k: v for k, v in previous.items() if k in ("cost", "time", "quality")})
        summary["total_seconds_before"] = previous.get("total_seconds", 0.0)
        print(f"resuming {path}: {len(summary['cost'])} memory runs, "
              f"{len((summary['time'] or {}).get('rounds', []))} timing rounds, quality {'done' if summary['quality'] else 'to do'}")
    t_all = time.perf_counter()

    def save() -> None:
        summary["total_seconds"] = summary.get("total_seconds_before", 0.0) + time.perf_counter() - t_all
        path.write_text(json.dumps(summary, indent=2) + "\n")

    # ---------------------------------------------------------------- part 1: memory (a process a run)
    done = {r["run"] for r in summary["cost"]}
    for name in names if "memory" in parts else []:
        if name in done:
            continue
        objective, tuner, extra = COST_RUNS[name]
        cache = cache_dir(out, name) if "precomputed" in name else None
        if cache is not None and cache.exists():
            for f in cache.glob("*.pt"):
                f.unlink()  # a fresh pass: its time is part of what is measured
        run_extra = ["--trainer.max_steps", str(args.steps), "--trainer.limit_val_batches", "0",
                     "--test_after_fit", "false", "--data.init_args.builtin_size", str(args.builtin_size), *extra]
        if cache is not None:
            run_extra += ["--model.init_args.reference_cache_dir", str(cache)]
        print(f"[{time.perf_counter() - t_all:6.0f} s] memory: {name} ...", flush=True)
        record = fit(args, out / "cost", objective, tuner, run_extra, out / f"{name.replace(' ', '_')}.log")
        row = cost_row(name, record, cache)
        summary["cost"].append(row)
        save()
        print(f"         peak {mb_(row['peak_bytes'])} MB, predicted {mb_(row['predicted_peak_bytes'])} MB", flush=True)

    # ---------------------------------------------------------------- part 2: time (interleaved, a process a group)
    if "time" in parts:
        timing = summary["time"] or {"rounds": []}
        summary["time"] = timing
        for group in GROUPS:
            members = [n for n in group if n in names]
            have = sum(1 for r in timing["rounds"] if set(r) == set(members))
            if len(members) < 2 or have >= args.rounds:
                continue
            print(f"[{time.perf_counter() - t_all:6.0f} s] time: {', '.join(members)}: {args.rounds - have} rounds ...",
                  flush=True)
            for took in interleaved_step_times(args, members, out, args.rounds - have):
                timing["rounds"].append(took)
                summarise_times(timing)
                save()

    # ---------------------------------------------------------------- part 3: quality
    if "quality" in parts and not summary["quality"]:
        print(f"[{time.perf_counter() - t_all:6.0f} s] quality: dpo+lora, {args.quality_steps} steps ...", flush=True)
        val_fraction = args.quality_val / 2000
        record = fit(args, out / "quality", "dpo", "lora",
                     ["--trainer.max_steps", str(args.quality_steps), "--trainer.val_check_interval",
                      str(args.quality_steps), "--validate_before_fit", "true", "--test_after_fit", "false",
                      "--data.init_args.val_fraction", str(val_fraction)],
                     out / "quality.log")
        info = record["train_info"]
        keys = ("val/accuracy", "val/rewards/accuracies", "val/rewards/margins", "val/loss", "val/logps/chosen",
                "val/logps/rejected")
        summary["quality"] = {"before": {k: info["initial"].get(k) for k in keys},
                              "after": {k: info["final"].get(k) for k in keys},
                              "val_pairs": info["data"]["rows"]["val"], "steps": info["global_steps"],
                              "step_s": info["throughput"]["step_time_mean_s"], "run_id": record["run_info"]["run_id"]}
        save()

    save()
    print(report(summary))
    return 0


def summarise_times(timing: dict[str, Any]) -> None:
    """Fastest and median step per configuration over the rounds; each ratio of the fastest steps, and
    the median of the within-round ratios where both ran in one round."""
    import statistics

    steps: dict[str, list[float]] = {}
    for r in timing["rounds"]:
        for n, t in r.items():
            steps.setdefault(n, []).append(t)
    timing["min_step_s"] = {n: min(t) for n, t in steps.items()}
    timing["median_step_s"] = {n: statistics.median(t) for n, t in steps.items()}
    timing["ratios"], timing["median_in_round_ratios"] = {}, {}
    for a, b, what in RATIOS:
        if a in steps and b in steps:
            timing["ratios"][what] = timing["min_step_s"][a] / timing["min_step_s"][b]
            pairs = [r[a] / r[b] for r in timing["rounds"] if a in r and b in r]
            if pairs:
                timing["median_in_round_ratios"][what] = statistics.median(pairs)


def report(summary: dict[str, Any]) -> str:
    settings = summary["settings"]
    lines = []
    rows = {r["run"]: r for r in summary["cost"]}
    timing = summary.get("time") or {}
    median = timing.get("median_step_s", {})
    fastest = timing.get("min_step_s", {})
    if rows or median:
        lines += [f"## Cost ({settings['backbone']}, {settings['batch_size']} pairs a step)", "",
                  "| run | trainable | peak MB | weights MB | grads MB | optim MB | activations MB | predicted MB | "
                  "s/step fastest | s/step median | s/step (record) | reference pass |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for name in COST_RUNS:
            if name not in rows and name not in median:
                continue
            r = rows.get(name, {})
            ref = (f"{r['reference_pass_s']:.1f} s, {r['reference_pairs']} pairs, {r['reference_cache_bytes'] / 1024:.0f} KB"
                   if r.get("reference_pass_s") is not None else "—")
            step = f"{fastest[name]:.2f} | {median[name]:.2f}" if name in median else "— | —"
            rec = f"{r['step_s']:.2f}" if r.get("step_s") is not None else "—"
            lines.append(f"| {name} | {r.get('trainable', 0):,} | {mb_(r.get('peak_bytes'))} | {mb_(r.get('weights_bytes'))} | "
                         f"{mb_(r.get('gradients_bytes'))} | {mb_(r.get('optimizer_bytes'))} | "
                         f"{mb_(r.get('activations_bytes'))} | {mb_(r.get('predicted_peak_bytes'))} | {step} | {rec} | {ref} |")
    ratio_lines = []
    for a, b, what in RATIOS:
        ra, rb = rows.get(a), rows.get(b)
        peak = f"{ra['peak_bytes'] / rb['peak_bytes']:.2f}" if ra and rb else "—"
        pred = (f"{ra['predicted_peak_bytes'] / rb['predicted_peak_bytes']:.2f}"
                if ra and rb and ra.get("predicted_peak_bytes") and rb.get("predicted_peak_bytes") else "—")
        step, in_round = timing.get("ratios", {}).get(what), timing.get("median_in_round_ratios", {}).get(what)
        if peak != "—" or step is not None:
            ratio_lines.append(f"| {what} | {peak} | {pred} | {'—' if step is None else f'{step:.2f}'} | "
                               f"{'—' if in_round is None else f'{in_round:.2f}'} |")
    if ratio_lines:
        lines += ["", "| ratio | peak memory | predicted peak | step time (fastest) | step time (median in-round) |",
                  "|---|---:|---:|---:|---:|", *ratio_lines]
    q = summary.get("quality")
    if q:
        lines += ["", f"## DPO (LoRA) on the built-in pairs: {q['steps']} steps, {q['val_pairs']} validation pairs", "",
                  "| | exact match | rewards/accuracies | rewards/margins | val loss | logps/chosen | logps/rejected |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for when in ("before", "after"):
            m = q[when]

            def f(k, fmt="{:.3f}"):
                return "—" if m.get(k) is None else fmt.format(m[k])

            lines.append(f"| {when} | {f('val/accuracy')} | {f('val/rewards/accuracies')} | {f('val/rewards/margins', '{:.4f}')} | "
                         f"{f('val/loss', '{:.4f}')} | {f('val/logps/chosen', '{:.2f}')} | {f('val/logps/rejected', '{:.2f}')} |")
    lines += ["", f"total {summary['total_seconds']:.0f} s"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
