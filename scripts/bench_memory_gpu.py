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
            "--model.init_args.generate_in_validation", "false",
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


def fmt_bytes(n) -> str:
    return "-" if n is None else f"{n / GiB:7.3f} GiB"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["smollm2", "1b"], choices=["smollm2", "1b"])
    ap.add_argument("--methods", nargs="+", default=list(methods(False)))
    ap.add_argument("--steps", type=int, default=6, help="training steps a run (the first is left out of speed)")
    ap.add_argument("--out", type=Path, default=None, help="where the run records go (default: a temporary folder)")
    ap.add_argument("--smoke", action="store_true", help="check the plumbing on CPU with the tiny test model")
    args = ap.parse_args(argv)

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
