"""How much does ftbench's training step cost over a bare PyTorch loop? Prints ftbench tokens/s ÷ bare
tokens/s for the same model, method, batches and optimizer, measured side by side in one process.

    python scripts/bench_step.py                                   # tiny random Llama (seconds)
    python scripts/bench_step.py --model embedded --method lora    # SmolLM2-135M (~1-3 s a step on 2 CPU cores)

Both sides train the same module (``FTMethod.prepare`` on a fresh copy of the backbone, so LoRA is the
same peft wrapping) on the same fixed batches with the same AdamW. They alternate over ``--rounds``
(ftbench, bare, bare, ftbench, ...) so that drift in the machine's load falls on both; each round is a
fresh optimizer for ``--steps`` steps of which the first ``--warmup`` are left out of the figures.

* ftbench: ``Trainer(max_steps=steps).fit(method)`` with the callbacks every ftbench run has
  (PeakMemory, Throughput); the step time is what ``Throughput`` measures (batch start to batch end:
  forward, loss, logging, backward, optimizer and scheduler step).
* bare: ``loss = model(**batch).loss; loss.backward(); opt.step(); opt.zero_grad()``, timed the same way.

The ratio uses trained tokens (labels != -100), identical on both sides, so it is bare time ÷ ftbench
time. A second ratio, on whole-``fit`` wall time against the bare loop's wall time for the same steps,
shows Lightning's per-``fit`` set-up cost, which a long run amortises.
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help="'tiny' (built in-process), 'embedded', or a backbone.model value")
    p.add_argument("--method", default="lora", choices=["lora", "full"])
    p.add_argument("--steps", type=int, default=None, help="steps per round (default: 20 tiny, 4 otherwise)")
    p.add_argument("--warmup", type=int, default=None, help="steps of each round left out (default: 3 tiny, 1 otherwise)")
    p.add_argument("--rounds", type=int, default=None, help="rounds per side (default: 6 tiny, 3 otherwise)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--lr", type=float, default=None, help="AdamW lr (default: the method's config, 1e-3 LoRA / 5e-5 full)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core machine, 2 OpenMP threads competing with other "
                        "processes make step times swing 10x and the ratio meaningless; 0 keeps torch's default)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    tiny = args.model == "tiny"
    args.steps = args.steps or (20 if tiny else 4)
    args.warmup = args.warmup if args.warmup is not None else (3 if tiny else 1)
    args.rounds = args.rounds or (6 if tiny else 3)
    args.lr = args.lr or (1e-3 if args.method == "lora" else 5e-5)
    if args.warmup >= args.steps:
        p.error("--warmup must be smaller than --steps")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import lightning as L
    import torch

    from ftbench.backbone import Backbone
    from ftbench.bench.measure import PeakMemory, Throughput
    from ftbench.data.base import IGNORE_INDEX
    from ftbench.data.instruction import InstructionData
    from ftbench.methods import FullFinetune, LoRA

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory(prefix="bench-step-")
    model_path = args.model
    if args.model == "tiny":
        from ftbench.testing import build_tiny_llama

        model_path = str(build_tiny_llama(Path(tmp.name) / "tiny"))
    backbone = Backbone(model=model_path)

    def new_method():
        optimizer = lambda params: torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)  # noqa: E731
        cls = LoRA if args.method == "lora" else FullFinetune
        kw = {"r": 16, "alpha": 32} if args.method == "lora" else {}
        return cls(backbone=backbone, optimizer=optimizer, lr_scheduler="constant", **kw)

    # the same module on both sides: ftbench's prepare() on its own fresh copy of the weights
    L.seed_everything(args.seed, verbose=False)
    ft = new_method()
    ft.configure_model()
    L.seed_everything(args.seed, verbose=False)
    bare_model = new_method().prepare(backbone.load_model())
    bare_model.train()

    dm = InstructionData(backbone=backbone, source="builtin:instruction", builtin_size=max(400, 2 * args.steps * args.batch_size),
                         batch_size=args.batch_size, max_length=args.max_length, seed=args.seed)
    dm.setup("fit")
    batches = [b for _, b in zip(range(args.steps), dm.train_dataloader())]
    assert len(batches) == args.steps, "not enough training rows for --steps"
    keys = ("input_ids", "attention_mask", "labels")
    trained = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches]
    timed_tokens = sum(trained[args.warmup:])

    def ftbench_round() -> tuple[float, float]:
        tp = Throughput(warmup_steps=args.warmup)
        trainer = L.Trainer(max_steps=args.steps, accelerator="cpu", devices=1, precision="32-true", logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0, limit_val_batches=0, callbacks=[PeakMemory(), tp])
        t0 = time.perf_counter()
        trainer.fit(ft, datamodule=dm)
        wall = time.perf_counter() - t0
        assert tp.timed_batches == args.steps - args.warmup and tp.trained_tokens == timed_tokens
        if os.environ.get("BENCH_DEBUG"):
            print("ftbench step times", [round(x, 4) for x in tp.step_times])
        return tp.time, wall

    def bare_round() -> tuple[float, float]:
        opt = torch.optim.AdamW([p for p in bare_model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
        timed = 0.0
        t0 = time.perf_counter()
        for i, batch in enumerate(batches):
            b = {k: batch[k] for k in keys}
            ts = time.perf_counter()
            loss = bare_model(**b, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            dt = time.perf_counter() - ts
            if i >= args.warmup:
                timed += dt
        return timed, time.perf_counter() - t0

    counts = ft.parameter_counts()
    print(f"model={args.model} method={args.method} trainable={counts['trainable']:,} total={counts['total']:,} "
          f"threads={torch.get_num_threads()} batch={args.batch_size} steps/round={args.steps} "
          f"(warm-up {args.warmup}) rounds={args.rounds} trained tokens/round={timed_tokens}")
    ft_times, bare_times, ft_walls, bare_walls = [], [], [], []
    for r in range(args.rounds):
        order = ("ftbench", "bare") if r % 2 == 0 else ("bare", "ftbench")
        for side in order:
            step_time, wall = ftbench_round() if side == "ftbench" else bare_round()
            (ft_times if side == "ftbench" else bare_times).append(step_time)
            (ft_walls if side == "ftbench" else bare_walls).append(wall)
        print(f"round {r + 1}: ftbench {timed_tokens / ft_times[-1]:8.1f} tok/s   bare {timed_tokens / bare_times[-1]:8.1f} tok/s"
              f"   ratio {bare_times[-1] / ft_times[-1]:.3f}", flush=True)

    ft_tps = timed_tokens * len(ft_times) / sum(ft_times)
    bare_tps = timed_tokens * len(bare_times) / sum(bare_times)
    per_round = [b / f for f, b in zip(ft_times, bare_times)]
    print(f"ftbench: {ft_tps:.1f} trained tokens/s   bare: {bare_tps:.1f} trained tokens/s")
    print(f"ratio (ftbench / bare tokens/s): {ft_tps / bare_tps:.3f}  "
          f"(median of rounds {statistics.median(per_round):.3f}, min {min(per_round):.3f}, max {max(per_round):.3f})")
    print(f"whole-fit wall ratio (bare loop wall / Trainer.fit wall, {args.steps} steps): "
          f"{sum(bare_walls) / sum(ft_walls):.3f}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
