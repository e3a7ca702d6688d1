"""Where a GRPO step's time goes: generation (sampling G completions per prompt, decoding, rewards,
advantages) against optimisation (the policy forward, backward and optimizer step), at several G.

    python scripts/bench_grpo.py                          # SmolLM2-135M (embedded), LoRA, G = 4 and 8, CPU
    python scripts/bench_grpo.py --model tiny --steps 6   # the tiny random Llama (seconds)
    python scripts/bench_grpo.py --device cuda --dtype bfloat16 --groups 4,8,16
    python scripts/bench_grpo.py --variants all --steps 8 --warmup 4   # GRPO's variants side by side, G = 4

Each G is one ``Trainer.fit`` of ``--steps`` steps of :class:`ftbench.objectives.GRPO` (LoRA r=16 on every
linear layer, the exact-answer reward, beta 0) on the built-in instruction prompts, the same prompts in the
same order for every G (seeded). The split is the objective's own (``GRPO.phase_seconds``: perf_counter, with
a CUDA sync at the phase boundaries); the first ``--warmup`` steps are left out and the table shows the
median over the remaining steps. The sampled lengths differ between runs (a completion ends at its EOS), so
the table also shows the mean completion length and the share that ran to ``--max-completion-length``.

``--variants`` runs GRPO's variants (:data:`VARIANTS`, the shipped configs' settings) at the first G instead,
each in the same process on the same prompts, and prints per update (a reused rollout's updates do not
generate) the mean step time, the share of it spent generating, and the predicted peak of the optimisation
phase (``ftbench.estimate`` of one update's forward and backward: the update's completions x (longest prompt +
max completion length) tokens through the same tuner on the meta device; the reference of beta > 0 adds no
weights with LoRA), each also as a ratio to GRPO's. Give ``--steps`` a multiple of 4 and ``--warmup`` one too, so
that every variant's kept updates cover whole rollouts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


# GRPO's variants as configs/objective/*.yaml set them (the objective's settings; everything else shared)
VARIANTS = {
    "grpo": {},
    "dapo": dict(loss_type="dapo", epsilon_high=0.28, mask_truncated_completions=True),
    "gspo": dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4,
                 steps_per_generation=4),
    "cispo": dict(loss_type="cispo", epsilon_high=5.0, num_iterations=2),
    "grpo_mu2": dict(num_iterations=2),
    "rloo": dict(advantage="rloo"),
    "grpo_beta": dict(beta=0.04),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="embedded", help="'embedded' (SmolLM2-135M), 'tiny', or a backbone.model value")
    p.add_argument("--groups", default="4,8", help="comma-separated num_generations values (default 4,8)")
    p.add_argument("--steps", type=int, default=4, help="steps per G (default 4)")
    p.add_argument("--warmup", type=int, default=1, help="steps of each run left out (default 1)")
    p.add_argument("--batch-size", type=int, default=4, help="prompts per step (default 4)")
    p.add_argument("--max-completion-length", type=int, default=16)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core machine two OpenMP threads competing with other "
                        "processes made a tiny model's forward swing from 0.05 s to 3.8 s; 0 keeps torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default="", help=f"comma-separated GRPO variants, or 'all' ({', '.join(VARIANTS)})")
    args = p.parse_args(argv)
    args.variants = list(VARIANTS) if args.variants == "all" else [v for v in args.variants.split(",") if v]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant {unknown[0]!r}; expected {', '.join(VARIANTS)}")
    args.groups = [int(g) for g in args.groups.split(",")]
    if args.warmup >= args.steps:
        p.error("--warmup must be smaller than --steps")
    return args


def run(args, backbone, G: int, variant: str = "grpo") -> dict:
    import lightning as L
    from peft import LoraConfig

    from ftbench.data.instruction import InstructionData
    from ftbench.objectives import GRPO
    from ftbench.tuners import Peft

    class Lengths(L.Callback):
        def __init__(self):
            self.mean, self.clipped = [], []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            m = trainer.callback_metrics
            self.mean.append(float(m["train/completions/mean_length"]))
            self.clipped.append(float(m["train/completions/clipped_ratio"]))

    dm = InstructionData(backbone=backbone, source="builtin:instruction", builtin_size=400, val_fraction=0.02,
                         test_fraction=0.05, system_prompt="", max_length=256, prompt_batches=True,
                         batch_size=args.batch_size, seed=args.seed)
    tuner = Peft(peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"), lr=1e-4)
    m = GRPO(backbone=backbone, tuner=tuner, num_generations=G, max_completion_length=args.max_completion_length,
             lr_scheduler="constant", **VARIANTS[variant])
    dm.train_batch_repeats = m.train_batch_repeats  # as the CLI does: each prompt batch at each update of its rollout
    lengths = Lengths()
    L.seed_everything(args.seed, verbose=False)
    precision = "32-true" if args.dtype == "float32" else ("bf16-true" if args.dtype == "bfloat16" else "16-true")
    trainer = L.Trainer(max_steps=args.steps, accelerator=args.device, devices=1, precision=precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[lengths])
    t0 = time.perf_counter()
    trainer.fit(m, datamodule=dm)
    wall = time.perf_counter() - t0
    k = args.warmup
    gen, opt = (m.phase_seconds[p][k:] for p in ("generation", "optimisation"))
    rew = m.phase_seconds["reward"][-max(1, len(gen) // m.train_batch_repeats):]  # one per generation
    med_gen, med_opt = statistics.median(gen), statistics.median(opt)
    rows_per_update = args.batch_size * G // m.steps_per_generation
    prompt_len = max(int(b["prompt_attention_mask"].shape[1]) for b in [next(iter(dm.train_dataloader()))])
    return {"variant": variant, "step_s": (sum(gen) + sum(opt)) / len(gen), "gen_share": sum(gen) / (sum(gen) + sum(opt)),
            "peak": predicted_peak(backbone, tuner, rows_per_update, prompt_len + args.max_completion_length),
            "updates_per_generation": m.train_batch_repeats, "G": G, "completions": args.batch_size * G, "mean_length": statistics.mean(lengths.mean[k:]),
            "clipped": statistics.mean(lengths.clipped[k:]), "generation_s": med_gen, "optimisation_s": med_opt,
            "reward_s": statistics.median(rew), "share": med_gen / (med_gen + med_opt), "wall_s": wall,
            "steps": len(gen)}


def predicted_peak(backbone, tuner, rows: int, seq_len: int) -> int:
    """``ftbench.estimate``'s predicted peak of one update's forward and backward (``rows`` x ``seq_len``)."""
    import copy

    from ftbench.estimate import estimate

    return estimate(backbone, copy.deepcopy(tuner), batch_size=rows, seq_len=seq_len, precision="32-true"
                    if backbone.dtype == "float32" else "bf16-true")["predicted_peak_bytes"]


def variants_table(args, backbone) -> None:
    G = args.groups[0]
    rows = [run(args, backbone, G, v) for v in args.variants]
    base = next((r for r in rows if r["variant"] == "grpo"), rows[0])
    header = ("variant", "updates/generation", "step s", "× " + base["variant"], "generation share",
              "predicted peak MiB", "× " + base["variant"] + " ")
    print("| " + " | ".join(header) + " |")
    print("|---|" + "|".join("---:" for _ in header[1:]) + "|")
    for r in rows:
        print(f"| {r['variant']} | {r['updates_per_generation']} | {r['step_s']:.2f} | {r['step_s'] / base['step_s']:.2f} | "
              f"{r['gen_share']:.0%} | {r['peak'] / 2**20:.1f} | {r['peak'] / base['peak']:.2f} |")


def main(argv=None) -> int:
    args = parse_args(argv)
    import logging
    import warnings

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    import torch

    from ftbench.backbone import Backbone

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    model = args.model
    if model == "tiny":
        from ftbench.testing import build_tiny_llama

        model = str(build_tiny_llama(tempfile.mkdtemp(prefix="bench-grpo-")))
    backbone = Backbone(model=model, dtype=args.dtype)
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} torch threads"
    print(f"GRPO step time, {args.model} + LoRA r=16, {args.batch_size} prompts/step, max_completion_length "
          f"{args.max_completion_length}, {args.dtype}, {device}; median of steps {args.warmup + 1}..{args.steps}")
    if args.variants:
        print(f"G = {args.groups[0]}; per update: mean step time (generation + optimisation) over updates "
              f"{args.warmup + 1}..{args.steps}, generation's share of it, predicted peak of the optimisation phase")
        variants_table(args, backbone)
        return 0
    rows = [run(args, backbone, G) for G in args.groups]
    header = ("G", "completions/step", "mean length", "clipped", "generation s", "optimisation s", "reward s",
              "generation share", "run wall s")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---:" for _ in header) + "|")
    for r in rows:
        print(f"| {r['G']} | {r['completions']} | {r['mean_length']:.1f} | {r['clipped']:.2f} | {r['generation_s']:.2f} | "
              f"{r['optimisation_s']:.2f} | {r['reward_s']:.3f} | {r['share']:.0%} | {r['wall_s']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
