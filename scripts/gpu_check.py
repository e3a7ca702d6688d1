"""A GPU check that needs no hub: memory against the estimate, speed and host syncs of full / LoRA /
QLoRA-nf4 / GaLore on random-initialised 0.5B-1.5B models, and the quickstart LoRA run's exact match.

    scripts/gpu_check.sh OUT_DIR                  # one large GPU, <= 8 minutes (the default plan below)
    python scripts/gpu_check.py OUT_DIR --models qwen2-0.5b --methods lora,qlora_nf4 --batch-sizes 4
    python scripts/gpu_check.py OUT_DIR --tiny    # the same path on a CPU with a tiny model (tests/test_gpu_check.py)

What it runs (records under OUT_DIR/records/, the quickstart's under OUT_DIR/quickstart/):

* **Random-initialised models** from the shipped configs (``configs/models/``: Qwen2-0.5B's,
  Llama-3.2-1B's and Qwen2-1.5B's shapes and vocabularies, ``backbone.random_init: true``; no weights
  are read or downloaded: ftbench draws them once into its cache, ~1-3 GB each) with the embedded
  SmolLM2 tokenizer, each ``ftbench fit`` in its own process (so that one run's allocator state never
  leaks into the next): SFT on the built-in code corpus packed into full blocks of ``--seq-len``
  tokens (``configs/data/domain.yaml``: every token real and trained, the batch the estimate assumes),
  weights in bfloat16 and trainer precision ``bf16-true``; ``--steps`` steps of which the first 3 are
  warm-up (batch 1 counts host syncs, batch 2 measures the memory breakdown; neither is timed).
  Methods: ``full`` (AdamW), ``lora`` (configs/tuner/lora.yaml), ``qlora_nf4`` (the same LoRA on a
  4-bit NF4 backbone, double quantization, bfloat16 compute, no k-bit upcast) and ``galore`` (full
  with configs/optim/galore.yaml; at each model's first batch size only: its projection SVDs at the
  first step cost more than the other runs' whole time).
* **The estimate** of each point (:class:`ftbench.estimate.run.MetaRun`, what ``ftbench estimate``
  runs: the model on the meta device, one step of a full batch), with the same settings.
* **The quickstart LoRA run** (``configs/sweeps/quickstart.yaml``'s LoRA point: the embedded
  SmolLM2-135M, 40 steps, exact match on 100 held-out rows), whose exact match is compared with the
  committed CPU record of that sweep point (``experiments/quickstart/results/``, 45 of 100: the pin; the
  summary names the record and says when today's settings give the point another run id). Another
  device sums in another order, so 40 training steps end a little apart and a few greedy answers may
  differ: within 5 points of the pin reads ``ok``; a broken GPU path (masking, padding, dtypes) shows
  as far below.

What it prints and writes (OUT_DIR/summary.md, .csv, .json; the records are read with the report's
own reader, :func:`ftbench.sweep.report.runs_frame`): per point the CUDA allocated and reserved peaks
since training started (weights included), the estimate's predicted peak and the ratios
estimate / allocated and estimate / reserved (the allocator's slack and fragmentation are in
reserved, not in the estimate), the run's own measured breakdown, trained tokens/s, and the host
syncs of one step (:mod:`ftbench.bench.syncs`: ``cuda_syncs`` from ``torch.cuda.set_sync_debug_mode``,
zero expected; ``device reads`` the value reads of GPU tensors). A rerun into the same folder reuses
the completed records. Exit status 1 when a run failed, 2 without a GPU (and no ``--tiny``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MiB = 2**20
#: the shipped configs and their batch sizes (x --seq-len tokens): 24 fits in all with GaLore at one size
MODELS = {"qwen2-0.5b": (1, 4, 16), "llama-3.2-1b": (2, 8), "qwen2-1.5b": (2, 8)}
METHODS = ("full", "lora", "qlora_nf4", "galore")
#: methods run at each model's first batch size only
FIRST_BATCH_ONLY = ("galore",)
WARMUP = 3  # batch 0 lazy initialisation, batch 1 host syncs (HostSyncs), batch 2 breakdown (MemoryBreakdown)
PIN_TOLERANCE = 0.05  # exact match within 5 points (5 of the 100 test rows) of the committed CPU record
QUICKSTART = ["--backbone", "configs/backbone/embedded.yaml", "--tuner", "configs/tuner/lora.yaml",
              "--model", "configs/objective/sft.yaml", "--data", "configs/data/instruction.yaml",
              "--trainer", "configs/trainer/quickstart.yaml", "--evaluate.generate_in_validation", "false"]
QUICKSTART_RECORDS = ROOT / "experiments" / "quickstart" / "results"


@dataclass(frozen=True)
class Point:
    model: str  # a name (configs/models/<name>)
    folder: str  # the config folder
    method: str
    batch: int

    @property
    def run_id(self) -> str:
        return f"{self.model}-{self.method}-b{self.batch}"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path, help="folder for the records and the summary")
    ap.add_argument("--tiny", action="store_true",
                    help="the same path on a CPU: a tiny random Llama (config and tokenizer, no weights) instead "
                         "of configs/models/, and a tiny quickstart run with its own pin")
    ap.add_argument("--models", default=None, help=f"comma-separated names in configs/models/ (default: {','.join(MODELS)})")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    ap.add_argument("--batch-sizes", default=None, help="comma-separated, for every model (default: each model's own)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens a row (default 512; --tiny 32)")
    ap.add_argument("--steps", type=int, default=None, help=f"training steps a run (default 8; --tiny 5; > {WARMUP})")
    ap.add_argument("--budget-minutes", type=float, default=7.0,
                    help="start no new fit after this long (the rest are reported as skipped)")
    ap.add_argument("--no-quickstart", action="store_true", help="leave out the quickstart LoRA run")
    ap.add_argument("--in-process", action="store_true",
                    help="run each fit in this process (the test's way: seconds, not a process start each)")
    args = ap.parse_args(argv)
    args.seq_len = args.seq_len or (32 if args.tiny else 512)
    args.steps = args.steps or (WARMUP + 2 if args.tiny else 8)
    if args.steps <= WARMUP:
        ap.error(f"--steps must be > {WARMUP} (the warm-up batches)")
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        ap.error(f"--methods: unknown {', '.join(unknown)} (choose from {', '.join(METHODS)})")
    return args


# ---------------------------------------------------------------------------------- the points
def tiny_models(out: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """A config-only tiny Llama (the folder's own tokenizer, no weights) for random_init, and the tiny
    model with weights for the quickstart run."""
    from ftbench.testing import build_tiny_llama

    weights = out / "models" / "tiny-weights"
    if not (weights / "config.json").is_file():
        build_tiny_llama(weights)
    config_only = out / "models" / "tiny"
    if not (config_only / "config.json").is_file():
        config_only.mkdir(parents=True, exist_ok=True)
        for f in weights.iterdir():
            if f.suffix != ".safetensors":
                shutil.copy(f, config_only / f.name)
    return {"tiny": (str(config_only), (1, 2)), "tiny-weights": (str(weights), ())}


def plan(args, models: dict[str, tuple[str, tuple[int, ...]]]) -> list[Point]:
    sizes = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else None
    points = []
    for name, (folder, batches) in models.items():
        batches = tuple(sizes or batches)
        for method in args.methods:
            for batch in batches[:1] if method in FIRST_BATCH_ONLY else batches:
                points.append(Point(name, folder, method, batch))
    return points


def backbone_settings(point: Point, tiny: bool, cache: Optional[Path]) -> dict[str, Any]:
    """The backbone's settings for the point (the fit's ``--backbone.*`` and the estimate's Backbone)."""
    settings: dict[str, Any] = {"model": point.folder, "random_init": True, "dtype": "bfloat16"}
    if point.method == "qlora_nf4":
        # no k-bit upcast: it would make the 151,936 x 896 embeddings float32, more than the 4-bit weights save
        settings.update(quantization="nf4", double_quant=True, compute_dtype="bfloat16", prepare_kbit=False)
    if cache is not None:
        settings["cache_dir"] = str(cache)
    return settings


def tuner_file(method: str) -> str:
    return "configs/tuner/lora.yaml" if method in ("lora", "qlora_nf4") else "configs/tuner/full.yaml"


def optimizer_file(method: str) -> Optional[str]:
    return "configs/optim/galore.yaml" if method == "galore" else None


def fit_argv(point: Point, args, records: Path, cache: Optional[Path]) -> list[str]:
    argv = ["fit"]
    for key, value in backbone_settings(point, args.tiny, cache).items():
        argv += [f"--backbone.{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    argv += ["--tuner", tuner_file(point.method), "--model", "configs/objective/sft.yaml"]
    if optimizer_file(point.method):
        argv += ["--model.init_args.optimizer", optimizer_file(point.method)]
    argv += ["--data", "configs/data/domain.yaml", "--data.init_args.max_length", str(args.seq_len),
             "--data.init_args.batch_size", str(point.batch),
             "--trainer.accelerator", "cpu" if args.tiny else "gpu", "--trainer.devices", "1",
             "--trainer.precision", "bf16-true", "--trainer.max_steps", str(args.steps),
             "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
             "--trainer.enable_checkpointing", "false", "--trainer.logger", "false",
             "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
             "--trainer.callbacks+=ftbench.bench.syncs.HostSyncs",
             "--test_after_fit", "false", "--evaluate.generate_in_validation", "false",
             "--warmup_batches", str(WARMUP), "--out", str(records), "--run_id", point.run_id]
    return argv


def quickstart_argv(args, models, out: Path) -> list[str]:
    argv = ["fit", *QUICKSTART, "--out", str(out)]
    if args.tiny:  # the tiny model with weights, a few steps on a few rows: its own pinned figure (the test's)
        argv += ["--backbone.model", models["tiny-weights"][0], "--data.init_args.builtin_size", "60",
                 "--data.init_args.batch_size", "4", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
                 "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]
    else:
        argv += ["--trainer.enable_progress_bar", "false"]
    return argv


# ---------------------------------------------------------------------------------- running
def completed(record: Path) -> bool:
    try:
        return json.loads(record.read_text())["train_info"]["status"] == "completed"
    except (OSError, ValueError, KeyError, TypeError):
        return False


def run_ftbench(argv: list[str], in_process: bool, log: Path) -> int:
    """``ftbench ARGV`` in a fresh process (or this one), its output in ``log``; the exit status."""
    log.parent.mkdir(parents=True, exist_ok=True)
    if in_process:
        import contextlib

        from ftbench.cli import main

        with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            try:
                main(list(argv))
            except SystemExit as exit_:
                return int(exit_.code or 0)
            except Exception as err:  # noqa: BLE001 - a failed run is a row of the summary, not the end of the check
                print(f"{type(err).__name__}: {err}", file=f)
                return 1
        return 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    with open(log, "w") as f:
        return subprocess.run([sys.executable, "-m", "ftbench.cli", *argv], cwd=ROOT, env=env, stdout=f,
                              stderr=subprocess.STDOUT).returncode


def tail(log: Path, lines: int = 3) -> str:
    try:
        text = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(text[-lines:])[-600:]


def estimates(points: list[Point], args, cache: Optional[Path]) -> dict[str, dict[str, Any]]:
    """run id -> the estimate's breakdown (bytes) for the point's settings, one meta model per model and
    method, stepped at each batch size (what ``ftbench estimate --precision bf16-true`` computes)."""
    from ftbench.backbone import Backbone
    from ftbench.estimate.options import instantiate_config
    from ftbench.estimate.run import MetaRun
    from ftbench.tuners.base import Tuner

    out: dict[str, dict[str, Any]] = {}
    groups: dict[tuple[str, str], list[Point]] = {}
    for p in points:
        groups.setdefault((p.model, p.method), []).append(p)
    for (_, method), group in groups.items():
        try:
            run = MetaRun(Backbone(**backbone_settings(group[0], args.tiny, cache)),
                          instantiate_config("tuner", str(ROOT / tuner_file(method)), Tuner),
                          optimizer=str(ROOT / optimizer_file(method)) if optimizer_file(method) else "adamw",
                          precision="bf16-true")
            for p in group:
                parts = run.breakdown(p.batch, args.seq_len)
                out[p.run_id] = {"predicted_peak_bytes": parts["predicted_peak_bytes"],
                                 **{k: parts[k]["bytes"] for k in ("weights", "gradients", "optimizer", "activations",
                                                                   "largest_transient")}}
        except Exception as err:  # noqa: BLE001 - a point without an estimate still has its measurements
            for p in group:
                out[p.run_id] = {"error": f"{type(err).__name__}: {err}"[:300]}
    return out


def estimates_apart(points: list[Point], args, cache: Optional[Path], out: Path) -> dict[str, dict[str, Any]]:
    """:func:`estimates` in a child process with CUDA hidden: the estimate needs no GPU, and this process
    then never holds a CUDA context while the fits run (Throughput counts another process on the GPU as
    contention)."""
    request = out / "estimates-request.json"
    request.write_text(json.dumps({"argv": args.argv, "points": [vars(p) for p in points],
                                   "cache": str(cache) if cache else None}))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--estimates", str(request)], cwd=ROOT,
                          env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        error = f"estimate process exit {proc.returncode}: {(proc.stdout + proc.stderr)[-300:]}"
        return {p.run_id: {"error": error} for p in points}
    return json.loads(lines[-1])


def estimates_child(request: Path) -> int:
    spec = json.loads(request.read_text())
    args = parse_args(spec["argv"])
    points = [Point(**p) for p in spec["points"]]
    print(json.dumps(estimates(points, args, Path(spec["cache"]) if spec["cache"] else None)), flush=True)
    return 0


def gpu_name() -> str:
    """The GPU's name from nvidia-smi (torch.cuda.get_device_name would make a CUDA context in this process)."""
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=30).stdout.split("\n")
        return names[0].strip() or "a CUDA GPU"
    except (OSError, subprocess.SubprocessError):
        return "a CUDA GPU"


# ---------------------------------------------------------------------------------- the summary
def _num(row, key: str) -> float:
    value = row.get(key) if hasattr(row, "get") else None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.nan
    return value


def summary_rows(points: list[Point], records: Path, est: dict[str, dict[str, Any]],
                 statuses: dict[str, str]) -> list[dict[str, Any]]:
    """One row per point: the records read with the report's reader, the estimate beside them."""
    from ftbench.sweep.report import load_records, runs_frame

    recs = load_records(records) if records.is_dir() else []
    frame = runs_frame(recs) if recs else None
    by_id = {row["run_id"]: row for _, row in frame.iterrows()} if frame is not None else {}
    rows = []
    for p in points:
        r = by_id.get(p.run_id, {})
        e = est.get(p.run_id, {})
        alloc, reserved = _num(r, "memory.cuda_allocated_peak_bytes"), _num(r, "memory.cuda_reserved_peak_bytes")
        predicted = e.get("predicted_peak_bytes", math.nan)
        measured_breakdown = _num(r, "memory_breakdown.predicted_peak_bytes")
        rows.append({
            "model": p.model, "method": p.method, "batch": p.batch, "status": statuses.get(p.run_id, "?"),
            "estimate_mib": predicted / MiB, "allocated_mib": alloc / MiB, "reserved_mib": reserved / MiB,
            "estimate_over_allocated": predicted / alloc if alloc > 0 else math.nan,
            "estimate_over_reserved": predicted / reserved if reserved > 0 else math.nan,
            "run_breakdown_mib": measured_breakdown / MiB,
            "estimate_over_run_breakdown": predicted / measured_breakdown if measured_breakdown > 0 else math.nan,
            "tokens_per_s": _num(r, "tokens_per_s"), "contended": bool(_num(r, "throughput.contended") == 1.0),
            "cuda_syncs_per_step": _num(r, "host_syncs.cuda_syncs"),
            "device_reads_per_step": _num(r, "host_syncs.device_reads"),
            "host_reads_per_step": _num(r, "host_syncs.host_reads"),
            "estimate_error": e.get("error"), "run_id": p.run_id,
        })
    return rows


COLUMNS = (("model", "model", "s"), ("method", "method", "s"), ("batch", "batch", "d"), ("status", "status", "s"),
           ("estimate_mib", "estimate MiB", ",.1f"), ("allocated_mib", "allocated MiB", ",.1f"),
           ("reserved_mib", "reserved MiB", ",.1f"), ("estimate_over_allocated", "est/alloc", ".3f"),
           ("estimate_over_reserved", "est/reserved", ".3f"), ("run_breakdown_mib", "run breakdown MiB", ",.1f"),
           ("estimate_over_run_breakdown", "est/run", ".3f"), ("tokens_per_s", "tok/s", ",.0f"),
           ("cuda_syncs_per_step", "CUDA syncs/step", ".0f"), ("device_reads_per_step", "device reads/step", ".0f"),
           ("host_reads_per_step", "host reads/step", ".0f"))


def _cell(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec) if spec != "s" else str(value)


def markdown(rows: list[dict[str, Any]]) -> str:
    head = "| " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    sep = "|" + "|".join("---" if spec == "s" else "---:" for _, _, spec in COLUMNS) + "|"
    body = ["| " + " | ".join(_cell(row[key], spec) + ("†" if key == "tokens_per_s" and row["contended"] else "")
                              for key, _, spec in COLUMNS) + " |" for row in rows]
    return "\n".join([head, sep, *body])


def quickstart_pin(argv: list[str], tiny: bool) -> tuple[Optional[str], Optional[float], str]:
    """(the run id of the quickstart argv, the committed record's exact match, where the pin came from).
    The committed record of the same run id if there is one, else the one ``sft+lora`` record of the
    quickstart sweep (the same sweep point, recorded by an earlier ftbench whose settings gave another id)."""
    from ftbench.runcli import read_run

    at = argv.index("--out")
    run_id = read_run(argv[:at] + argv[at + 2:]).run_id  # where the record goes is no part of a run's id
    if tiny:
        return run_id, None, "none (--tiny)"
    candidates = [QUICKSTART_RECORDS / f"{run_id}.json"] + sorted(QUICKSTART_RECORDS.glob("sft+lora-*.json"))
    for record in candidates:
        try:
            rec = json.loads(record.read_text())
            if rec["train_info"].get("method") != "sft+lora":
                continue
            pin = float(rec["train_info"]["final"]["test/accuracy"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        commit = ((rec.get("meta_info") or {}).get("git") or {}).get("commit") or "?"
        return run_id, pin, (f"{record.relative_to(ROOT)} ({rec['train_info'].get('device')}, ftbench {commit[:10]}"
                             + (")" if record.stem == run_id else f"; today's settings give run id {run_id})"))
    return run_id, None, "no committed record"


def quickstart_result(folder: Path, run_id: Optional[str], pin: Optional[float], status: str) -> dict[str, Any]:
    result: dict[str, Any] = {"run_id": run_id, "status": status, "pin": pin, "exact_match": None, "test_loss": None,
                              "verdict": None}
    record = folder / f"{run_id}.json"
    if record.is_file():
        info = json.loads(record.read_text())["train_info"]
        result["exact_match"] = info.get("final", {}).get("test/accuracy")
        result["test_loss"] = info.get("final", {}).get("test/loss")
        result["device"] = info.get("device")
        result["tokens_per_s"] = (info.get("throughput") or {}).get("trained_tokens_per_s")
    if result["exact_match"] is not None and pin is not None:
        diff = result["exact_match"] - pin
        result["verdict"] = "ok" if abs(diff) <= PIN_TOLERANCE + 1e-9 else f"differs by {diff:+.2f}"
    return result


# ---------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--estimates"]:
        return estimates_child(Path(argv[1]))
    args = parse_args(argv)
    args.argv = argv
    import torch

    if not args.tiny and not torch.cuda.is_available():
        print("gpu_check: needs a CUDA GPU (torch.cuda.is_available() is False here); --tiny runs the same path "
              "on a CPU with a tiny model", file=sys.stderr)
        return 2
    os.chdir(ROOT)  # the configs are named from the repository root, as in the README
    out = args.out.resolve()
    records = out / "records"
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "cache" if args.tiny else None  # on a GPU: ftbench's cache ($FTBENCH_CACHE), reused by reruns
    device = "cpu (--tiny)" if args.tiny else gpu_name()
    if args.tiny:
        models = tiny_models(out)
    else:
        names = args.models.split(",") if args.models else list(MODELS)
        models = {n: (str(ROOT / "configs" / "models" / n), MODELS.get(n, (2, 8))) for n in names}
        missing = [n for n, (folder, _) in models.items() if not (Path(folder) / "config.json").is_file()]
        if missing:
            print(f"gpu_check: no configs/models/{missing[0]}/config.json", file=sys.stderr)
            return 2
    points = plan(args, {k: v for k, v in models.items() if v[1]})
    print(f"gpu_check on {device}: {len(points)} fits ({', '.join(args.methods)}; seq {args.seq_len}, {args.steps} steps, "
          f"bf16) + the quickstart LoRA run; records in {out}", flush=True)
    t0 = time.perf_counter()

    quick: dict[str, Any] = {}
    if not args.no_quickstart:
        qargv = quickstart_argv(args, models, out / "quickstart")
        run_id, pin, pin_source = quickstart_pin(qargv, args.tiny)
        if completed(out / "quickstart" / f"{run_id}.json"):
            status = "completed (reused)"
        else:
            rc = run_ftbench(qargv, args.in_process, out / "logs" / "quickstart.log")
            status = "completed" if rc == 0 else f"exit {rc}: {tail(out / 'logs' / 'quickstart.log')}"
        quick = quickstart_result(out / "quickstart", run_id, pin, status)
        quick["pin_source"] = pin_source
        print(f"quickstart LoRA: exact match {quick['exact_match']} (pin {pin}: {quick['verdict']}) [{status}] "
              f"{time.perf_counter() - t0:.0f} s", flush=True)

    statuses: dict[str, str] = {}
    for p in points:
        record = records / f"{p.run_id}.json"
        if completed(record):
            statuses[p.run_id] = "reused"
            continue
        if time.perf_counter() - t0 > args.budget_minutes * 60:
            statuses[p.run_id] = "skipped (budget)"
            continue
        t = time.perf_counter()
        rc = run_ftbench(fit_argv(p, args, records, cache), args.in_process, out / "logs" / f"{p.run_id}.log")
        statuses[p.run_id] = "ok" if rc == 0 and completed(record) else f"exit {rc}"
        print(f"  {p.run_id:28s} {statuses[p.run_id]:8s} {time.perf_counter() - t:5.1f} s"
              + ("" if rc == 0 else f"  {tail(out / 'logs' / f'{p.run_id}.log')}"), flush=True)

    est = estimates(points, args, cache) if args.in_process else estimates_apart(points, args, cache, out)
    rows = summary_rows(points, records, est, statuses)
    table = markdown(rows)
    seconds = time.perf_counter() - t0
    lines = [f"# GPU check: {device}", "",
             f"{len(points)} fits, SFT on packed code blocks of {args.seq_len} tokens, bfloat16 weights, precision "
             f"bf16-true, {args.steps} steps ({WARMUP} warm-up); {seconds:.0f} s in all. Peaks since training started "
             "(weights included); estimate = `ftbench estimate`'s predicted peak for the same settings; run breakdown "
             "= the run's own tensors measured; syncs and reads: one step (ftbench/bench/syncs.py); † contended.", "",
             table, ""]
    if quick:
        lines += [f"Quickstart LoRA run ({quick['run_id']}): exact match {quick['exact_match']}, test loss "
                  f"{quick['test_loss']}, against the pinned exact match {quick['pin']} of {quick['pin_source']}: "
                  f"{quick['verdict'] or 'no pin'} (within {PIN_TOLERANCE:.2f} is ok) [{quick['status']}]", ""]
    text = "\n".join(lines)
    (out / "summary.md").write_text(text)
    plain = [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()} for row in rows]
    (out / "summary.json").write_text(json.dumps({"device": device, "seconds": seconds, "rows": plain,
                                                  "quickstart": quick, "estimates": est}, indent=1, default=str))
    import pandas as pd

    pd.DataFrame(rows).to_csv(out / "summary.csv", index=False)
    print("\n" + text + f"\nsummary.md, summary.csv, summary.json in {out}")
    failed = [r for r in rows if r["status"] not in ("ok", "reused", "skipped (budget)")]
    return 1 if failed or (quick and not quick["status"].startswith("completed")) else 0


if __name__ == "__main__":
    sys.exit(main())
