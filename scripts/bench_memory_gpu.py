"""GPU memory of full fine-tuning, LoRA, QLoRA (nf4, int8) and bottleneck adapters, side by side.

    python scripts/bench_memory_gpu.py                 # SmolLM2-135M (embedded) and a random ~1.1B Llama
    python scripts/bench_memory_gpu.py --models 1b --steps 6 --out /tmp/gpu-mem
    python scripts/bench_memory_gpu.py --smoke         # plumbing check on CPU with the tiny test model

Each (model, method) pair is one ``ftbench fit`` in its own subprocess (so one run's allocator state
never leaks into the next), a few training steps on the built-in instruction task, and the numbers are
read from the run's record: ``train_info.memory`` holds ``torch.cuda``'s allocated and reserved peaks
since training started (PeakMemory resets them at fit start, after the weights are loaded, so the peak
includes the weights plus activations, gradients and optimizer states). The ~1.1B model is a random
Llama built from a config (TinyLlama's shape, SmolLM2's tokenizer) and saved once in bfloat16: nothing
is downloaded.

Settings: backbone dtype bfloat16 (4-bit compute in bfloat16), trainer precision 32-true (the adapters
stay float32, as peft makes them), batch 8, max_length 256. For QLoRA peft's k-bit preparation is off
(``prepare_kbit: false``): it would upcast the embeddings and head to float32, which on a 1B model with
a 49k vocabulary costs more than the 4-bit weights save. The target is QLoRA-nf4 / LoRA <= 0.45 in
allocated peak on the 1B model.

Predicted against measured (``--part predict``, on by default): for full, LoRA and QLoRA-nf4 on each
model, one subprocess first runs ``ftbench.estimate`` (the model's config on the meta device, no
weights) and then trains SFT for a few steps on full random batches (``--predict_batch`` rows x
``--predict_seq`` tokens, every token trained: the batch the estimate assumes) with
:class:`ftbench.bench.memory.MemoryBreakdown` and :class:`ftbench.bench.measure.PeakMemory`. It prints
the estimate's predicted peak, the breakdown's predicted peak (the same parts read from the run's
tensors) and ``torch.cuda.max_memory_allocated`` since training started, and their ratio per method;
the target is predicted / measured within 10%.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_RATIO = 0.45
PREDICT_TOLERANCE = 0.10  # predicted peak / torch.cuda allocated peak within 1 +- this
PREDICT_METHODS = ("full", "lora", "qlora_nf4")
# hidden 2048, 22 blocks, MLP 5632, 32 heads / 4 key-value heads (TinyLlama-1.1B's shape): with SmolLM2's
# 49,152-token vocabulary 22 x (2*2048*2048 + 2*2048*256 + 3*2048*5632) + 2 x 49152*2048 ≈ 1.17B parameters
ONE_B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)
GiB = 1024**3


def methods(smoke: bool) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (backbone args, tuner and objective args); the objective is SFT (configs/objective/sft.yaml)."""
    dt = "float32" if smoke else "bfloat16"
    plain = ["--backbone.dtype", dt]
    q = ["--backbone.dtype", dt, "--backbone.compute_dtype", dt, "--backbone.prepare_kbit", "false"]
    cfg = ROOT / "configs" / "tuner"

    def tuner(name: str) -> list[str]:
        return ["--tuner", str(cfg / f"{name}.yaml"), "--model", str(ROOT / "configs/objective/sft.yaml")]

    return {
        "full": (plain, tuner("full")),
        "lora": (plain, tuner("lora")),
        "qlora_nf4": (q + ["--backbone.quantization", "nf4", "--backbone.double_quant", "true"], tuner("lora")),
        "qlora_int8": (["--backbone.dtype", dt, "--backbone.prepare_kbit", "false", "--backbone.quantization", "int8"],
                       tuner("lora")),
        "adapters": (plain, tuner("adapter_houlsby")),
    }


def build_one_b(folder: Path) -> Path:
    """Save a random-init ~1.1B Llama (bfloat16) with the embedded SmolLM2 tokenizer, once."""
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ftbench.backbone import Backbone

    tok = Backbone(model="embedded").tokenizer
    config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, **ONE_B)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    print(f"built a random Llama with {n / 1e9:.2f}B parameters in {folder}", flush=True)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    return folder


def run_one(name: str, model: str, extra_backbone: list[str], extra_model: list[str], out: Path, steps: int,
            smoke: bool) -> dict:
    run_id = f"{Path(model).name if model != 'embedded' else 'smollm2'}-{name}"
    args = [sys.executable, "-m", "ftbench.cli", "fit", "--backbone.model", model, *extra_backbone, *extra_model,
            "--data", str(ROOT / "configs/data/instruction.yaml"),
            "--trainer.accelerator", "cpu" if smoke else "cuda", "--trainer.devices", "1",
            "--trainer.precision", "32-true", "--trainer.max_steps", str(steps),
            "--trainer.val_check_interval", str(steps), "--trainer.limit_val_batches", "1",
            "--trainer.num_sanity_val_steps", "0", "--trainer.enable_checkpointing", "false",
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--evaluate.generate_in_validation", "false",
            "--test_after_fit", "false", "--warmup_batches", "1", "--out", str(out), "--run_id", run_id]
    if smoke:
        args += ["--data.init_args.builtin_size", "80", "--data.init_args.max_length", "96",
                 "--data.init_args.batch_size", "4"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    record = out / f"{run_id}.json"
    if proc.returncode != 0 or not record.exists():
        tail = (proc.stdout + proc.stderr)[-3000:]
        return {"run_id": run_id, "status": f"exit {proc.returncode}", "error": tail}
    info = json.loads(record.read_text())["train_info"]
    mem = info.get("memory", {})
    return {
        "run_id": run_id, "status": info.get("status"),
        "trainable": info.get("params", {}).get("trainable"),
        "weight_bytes": info.get("backbone", {}).get("weight_bytes"),
        "storage": info.get("backbone", {}).get("storage_format"),
        "allocated_peak": mem.get("cuda_allocated_peak_bytes", mem.get("peak_bytes")),
        "reserved_peak": mem.get("cuda_reserved_peak_bytes"),
        "tokens_per_s": info.get("throughput", {}).get("trained_tokens_per_s"),
    }


def backbone_kwargs(cli: list[str]) -> dict:
    """``--backbone.dtype bfloat16 --backbone.prepare_kbit false`` -> ``{"dtype": "bfloat16", "prepare_kbit": False}``."""
    out = {}
    for key, value in zip(cli[::2], cli[1::2]):
        value = {"true": True, "false": False}.get(value, value)
        out[key.removeprefix("--backbone.")] = value
    return out


def predict_one(name: str, model: str, extra_backbone: list[str], tuner_yaml: str, batch: int, seq: int,
                steps: int, smoke: bool) -> dict:
    """The estimate and a measured run of the same configuration, in a fresh process."""
    spec = {"model": model, "backbone": backbone_kwargs(extra_backbone), "tuner": tuner_yaml, "batch": batch,
            "seq": seq, "steps": steps, "device": "cpu" if smoke else "cuda"}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)], cwd=ROOT,
                          env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"method": name, "status": f"exit {proc.returncode}", "error": (proc.stdout + proc.stderr)[-3000:]}
    return {"method": name, "status": "ok", **json.loads(lines[-1])}


def predict_worker(spec: dict) -> dict:
    """Runs in the subprocess: estimate on meta, then train and measure (see the module docstring)."""
    import functools

    import lightning as L
    import torch
    from transformers import AutoConfig

    from ftbench.backbone import Backbone
    from ftbench.bench.measure import PeakMemory
    from ftbench.bench.memory import MemoryBreakdown
    from ftbench.estimate import estimate, instantiate_config
    from ftbench.objectives import SFT
    from ftbench.tuners.base import Tuner

    bb_kwargs = {"model": spec["model"], **spec["backbone"]}
    batch, seq = spec["batch"], spec["seq"]
    est = estimate(Backbone(**bb_kwargs), instantiate_config("tuner", spec["tuner"], Tuner), batch_size=batch,
                   seq_len=seq, precision="32-true", optimizer="adamw")
    backbone = Backbone(**bb_kwargs)
    objective = SFT(backbone=backbone, tuner=instantiate_config("tuner", spec["tuner"], Tuner),
                    optimizer=functools.partial(torch.optim.AdamW, lr=1e-5, weight_decay=0.0))
    vocab = AutoConfig.from_pretrained(backbone.resolve()).vocab_size
    gen = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(spec["steps"]):
        ids = torch.randint(0, vocab, (batch, seq), generator=gen)
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    breakdown, peak = MemoryBreakdown(batch_index=1), PeakMemory()
    trainer = L.Trainer(accelerator=spec["device"], devices=1, precision="32-true", max_steps=spec["steps"],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        callbacks=[breakdown, peak])
    trainer.fit(objective, train_dataloaders=torch.utils.data.DataLoader(rows, batch_size=None))
    parts = ("weights", "gradients", "optimizer", "activations", "largest_transient")
    measured = breakdown.results
    return {
        "estimate": {k: est[k]["bytes"] for k in parts} | {"predicted_peak_bytes": est["predicted_peak_bytes"],
                                                         "seconds": est["seconds"]},
        "breakdown": {k: measured.get(k, {}).get("bytes") for k in parts}
        | {"predicted_peak_bytes": measured["predicted_peak_bytes"], "complete": measured["complete"]},
        "peak": peak.results.get("train", {}),
        "trainable": est["params"]["trainable"],
    }


def report_predictions(results: dict[str, dict[str, dict]], smoke: bool) -> int:
    """Print predicted vs measured per model and method; 1 if a ratio is outside the tolerance."""
    source = "host resident peak (--smoke: not comparable)" if smoke else "torch.cuda allocated peak"
    print(f"\npredicted peak vs measured ({source}); target predicted / measured within "
          f"{1 - PREDICT_TOLERANCE:.2f}..{1 + PREDICT_TOLERANCE:.2f}:")
    print(f"  {'model':8s} {'method':10s} {'estimate':>12s} {'breakdown':>12s} {'measured':>12s} "
          f"{'est/meas':>9s} {'est/breakdown':>13s}")
    verdict = 0
    for label, rs in results.items():
        for name, r in rs.items():
            if r.get("status") != "ok":
                print(f"  {label:8s} {name:10s} {r.get('status')}")
                print(r.get("error", ""), file=sys.stderr)
                verdict = 1
                continue
            est, brk = r["estimate"]["predicted_peak_bytes"], r["breakdown"]["predicted_peak_bytes"]
            meas = r["peak"].get("cuda_allocated_peak_bytes", r["peak"].get("peak_bytes"))
            ratio = est / meas if meas else float("nan")
            ok = abs(ratio - 1) <= PREDICT_TOLERANCE
            if not smoke and not ok:
                verdict = 1
            print(f"  {label:8s} {name:10s} {fmt_bytes(est)} {fmt_bytes(brk)} {fmt_bytes(meas)} {ratio:9.3f} "
                  f"{est / brk if brk else float('nan'):13.3f}{'' if ok or smoke else '  OUTSIDE TARGET'}")
            parts = "  ".join(f"{k} {r['estimate'][k] / max(1, r['breakdown'][k] or 1):.3f}"
                              for k in ("weights", "gradients", "optimizer", "activations", "largest_transient"))
            print(f"  {'':8s} {'':10s} estimate / breakdown by part: {parts}")
    return verdict


def fmt_bytes(n) -> str:
    return "-" if n is None else f"{n / GiB:7.3f} GiB"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["smollm2", "1b"], choices=["smollm2", "1b"])
    ap.add_argument("--methods", nargs="+", default=list(methods(False)))
    ap.add_argument("--steps", type=int, default=6, help="training steps a run (the first is left out of speed)")
    ap.add_argument("--out", type=Path, default=None, help="where the run records go (default: a temporary folder)")
    ap.add_argument("--smoke", action="store_true", help="check the plumbing on CPU with the tiny test model")
    ap.add_argument("--part", choices=["fit", "predict", "both"], default="both",
                    help="fit: ftbench fit runs on the instruction data; predict: predicted vs measured peak")
    ap.add_argument("--predict_batch", type=int, default=8, help="rows a batch in the predict part")
    ap.add_argument("--predict_seq", type=int, default=256, help="tokens a row in the predict part")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(predict_worker(json.loads(args.worker))), flush=True)
        return 0

    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("bench_memory_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False on this machine): "
              "it measures torch.cuda's allocated/reserved peaks, which read 0 on a CPU. "
              "Run it on a GPU machine, or pass --smoke to check the plumbing on CPU.", file=sys.stderr)
        return 2
    out = args.out or Path(tempfile.mkdtemp(prefix="ftbench-gpu-mem-"))
    out.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        from ftbench.testing import build_tiny_llama

        print("--smoke: 'allocated' below is the host's resident peak (no CUDA here), not a GPU figure", flush=True)
        models = {"tiny": str(build_tiny_llama(out / "tiny-llama"))}
    else:
        print(f"GPU: {torch.cuda.get_device_name(0)}", flush=True)
        models = {}
        for m in args.models:
            models[m] = "embedded" if m == "smollm2" else str(build_one_b(out / "random-llama-1b"))

    table = methods(args.smoke)
    results: dict[str, dict[str, dict]] = {}
    predictions: dict[str, dict[str, dict]] = {}
    if args.part in ("predict", "both"):
        batch, seq = (4, 64) if args.smoke else (args.predict_batch, args.predict_seq)
        for label, model in models.items():
            predictions[label] = {}
            for name in PREDICT_METHODS:
                bb, mm = table[name]
                tuner_yaml = mm[mm.index("--tuner") + 1]
                predictions[label][name] = predict_one(name, model, bb, tuner_yaml, batch, seq, 3, args.smoke)
        (out / "predicted.json").write_text(json.dumps(predictions, indent=2))
        predict_verdict = report_predictions(predictions, args.smoke)
        if args.part == "predict":
            print(f"\npredicted.json in {out}")
            return predict_verdict
    for label, model in models.items():
        results[label] = {}
        for name in args.methods:
            bb, mm = table[name]
            r = run_one(name, model, bb, mm, out, args.steps, args.smoke)
            results[label][name] = r
            print(f"{label:8s} {name:11s} {r['status']:10s} allocated {fmt_bytes(r.get('allocated_peak'))}  "
                  f"reserved {fmt_bytes(r.get('reserved_peak'))}  weights {fmt_bytes(r.get('weight_bytes'))} "
                  f"({r.get('storage')})  trainable {r.get('trainable')}", flush=True)
            if "error" in r:
                print(r["error"], file=sys.stderr)

    print("\nQLoRA-nf4 / LoRA (allocated peak; target <= %.2f):" % TARGET_RATIO)
    verdict = 0
    for label, rs in results.items():
        a, b = rs.get("qlora_nf4", {}).get("allocated_peak"), rs.get("lora", {}).get("allocated_peak")
        if a and b:
            ratio = a / b
            ok = ratio <= TARGET_RATIO
            wa, wb = rs["qlora_nf4"].get("weight_bytes"), rs["lora"].get("weight_bytes")
            weights = f" (weights alone {wa / wb:.3f})" if wa and wb else ""
            print(f"  {label:8s} {ratio:.3f} {'ok' if ok else 'ABOVE TARGET'}{weights}")
            if label == "1b" and not ok:
                verdict = 1
        else:
            print(f"  {label:8s} n/a (a run failed)")
    (out / "summary.json").write_text(json.dumps(results, indent=2))
    print(f"\nrecords and summary.json in {out}")
    return verdict


if __name__ == "__main__":
    sys.exit(main())
