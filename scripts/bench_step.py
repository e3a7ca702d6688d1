"""How much does ftbench's training step cost over a bare PyTorch loop, and over ``transformers.Trainer``?
Prints each side's trained tokens/s as a ratio to the bare loop's, for the same model, method, batches and
optimizer, measured side by side in one process.

    python scripts/bench_step.py                                   # tiny random Llama (a minute)
    python scripts/bench_step.py --model embedded --method lora    # SmolLM2-135M (~1-3 s a step on 2 CPU cores)
    python scripts/bench_step.py --model embedded --device cuda --dtype bfloat16   # on a GPU

Every side trains its own copy of the same module (the tuner's ``prepare`` on a fresh copy of the backbone, so
LoRA is the same peft wrapping) on the same fixed batches (collated once, fed in the same order) with the
same AdamW (weight decay 0, constant lr, no gradient clipping). The sides alternate over ``--rounds``, going
through every order of the three in turn, so that drift in the machine's load falls on all of them; each round
is a fresh optimizer for ``--steps`` steps of which the first ``--warmup`` are left out of the figures.

* ftbench: ``Trainer(max_steps=steps).fit(SFT(tuner=...))`` with the callbacks every ftbench run has
  (PeakMemory, Throughput); the step time is what ``Throughput`` measures (batch start to batch end: forward,
  loss, logging, backward, optimizer and scheduler step).
* bare: ``loss = model(**batch).loss; loss.backward(); opt.step(); opt.zero_grad()``, timed the same way.
* hf: ``transformers.Trainer(model, args, train_dataset=batches, optimizers=(AdamW, None))`` with
  ``lr_scheduler_type="constant"``, ``max_grad_norm=0`` (no clipping, as the other sides), logging, saving and
  evaluation off, sequential order; timed from ``on_step_begin`` to ``on_step_end`` (forward, backward,
  optimizer and scheduler step, ``zero_grad``). Everything else is the Trainer's default, as a user runs it.

On CPU each step is timed with ``perf_counter``; on CUDA with events on the stream, read when the round ends
(no side pays for a sync the others do not). The ratios use trained tokens (labels != -100), identical on
every side, so each is bare time / side time; per round, then the median and range over rounds. A second
ratio, on whole-run wall time (``Trainer.fit`` / ``Trainer.train`` including set-up) against the bare loop's,
shows the per-run set-up cost, which a long run amortises.
"""

from __future__ import annotations

import argparse
import itertools
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

SIDES = ("ftbench", "bare", "hf")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help="'tiny' (built in-process), 'embedded', or a backbone.model value")
    p.add_argument("--method", default="lora", choices=["lora", "full"])
    p.add_argument("--steps", type=int, default=None, help="steps per round (default: 20 tiny, 4 otherwise)")
    p.add_argument("--warmup", type=int, default=None, help="steps of each round left out (default: 3 tiny, 1 otherwise)")
    p.add_argument("--rounds", type=int, default=10, help="rounds per side (default 10)")
    p.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated subset of {','.join(SIDES)} (bare is always run)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--lr", type=float, default=None, help="AdamW lr (default: the tuner's config, 1e-3 LoRA / 5e-5 full)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights' dtype")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core machine, 2 OpenMP threads competing with other "
                        "processes make step times swing 10x and the ratio meaningless; 0 keeps torch's default)")
    p.add_argument("--profile", default=None, choices=["ftbench", "bare", "hf"],
                   help="after the rounds, profile one more round of this side (cProfile, top functions by own time)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    tiny = args.model == "tiny"
    args.steps = args.steps or (20 if tiny else 4)
    args.warmup = args.warmup if args.warmup is not None else (3 if tiny else 1)
    args.lr = args.lr or (1e-3 if args.method == "lora" else 5e-5)
    args.sides = tuple(s for s in SIDES if s in args.sides.split(",") or s == "bare")
    if args.warmup >= args.steps:
        p.error("--warmup must be smaller than --steps")
    return args


class StepTimer:
    """Per-step times: ``perf_counter`` on CPU, CUDA events read when asked (one sync per round); and the
    process CPU time of each step."""

    def __init__(self, cuda: bool):
        import torch

        self.cuda, self.torch = cuda, torch
        self.pending: list = []
        self.host: list[float] = []
        self.cpu: list[float] = []
        self._start = None
        self._cpu0 = 0.0

    def start(self):
        self._cpu0 = time.process_time()
        if self.cuda:
            self._start = self.torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def stop(self):
        if self.cuda:
            end = self.torch.cuda.Event(enable_timing=True)
            end.record()
            self.pending.append((self._start, end))
        else:
            self.host.append(time.perf_counter() - self._start)
        self.cpu.append(time.process_time() - self._cpu0)

    def times(self) -> list[float]:
        if self.cuda:
            if self.pending:
                self.pending[-1][1].synchronize()
            return [s.elapsed_time(e) / 1000.0 for s, e in self.pending]
        return list(self.host)


def main(argv=None) -> int:
    args = parse_args(argv)
    import logging
    import warnings

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from ftbench.backbone import Backbone
    from ftbench.bench.measure import PeakMemory, Throughput
    from ftbench.data.base import IGNORE_INDEX
    from ftbench.data.instruction import InstructionData
    from ftbench.objectives import SFT
    from ftbench.tuners import Full, Peft

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    tmp = tempfile.TemporaryDirectory(prefix="bench-step-")
    model_path = args.model
    if args.model == "tiny":
        from ftbench.testing import build_tiny_llama

        model_path = str(build_tiny_llama(Path(tmp.name) / "tiny"))
    backbone = Backbone(model=model_path, dtype=args.dtype)

    def new_tuner():
        if args.method == "full":
            return Full(lr=args.lr)
        from peft import LoraConfig  # configs/tuner/lora.yaml

        return Peft(peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"),
                    lr=args.lr)

    def new_optimizer(params):
        return torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)

    def plain_model():
        """The tuner's prepare() on its own fresh copy of the weights, as ftbench's objective does."""
        L.seed_everything(args.seed, verbose=False)
        model = new_tuner().prepare(backbone.load_model(), backbone).to(device)
        model.train()
        return model

    L.seed_everything(args.seed, verbose=False)
    ft = SFT(backbone=backbone, tuner=new_tuner(), optimizer=new_optimizer, lr_scheduler="constant")
    ft.configure_model()
    bare_model = plain_model()
    hf_model = plain_model() if "hf" in args.sides else None

    dm = InstructionData(backbone=backbone, source="builtin:instruction", builtin_size=max(400, 2 * args.steps * args.batch_size),
                         batch_size=args.batch_size, max_length=args.max_length, seed=args.seed)
    dm.setup("fit")
    keys = ("input_ids", "attention_mask", "labels")
    batches = [{k: b[k] for k in keys} for _, b in zip(range(args.steps), dm.train_dataloader())]
    assert len(batches) == args.steps, "not enough training rows for --steps"
    trained = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches]
    timed_tokens = sum(trained[args.warmup:])
    on_device = [{k: v.to(device) for k, v in b.items()} for b in batches]

    def ftbench_round() -> tuple[float, float, float]:
        tp = Throughput(warmup_steps=args.warmup)
        trainer = L.Trainer(max_steps=args.steps, accelerator="gpu" if cuda else "cpu", devices=1, precision="32-true",
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                            callbacks=[PeakMemory(), tp])
        t0 = time.perf_counter()
        trainer.fit(ft, train_dataloaders=DataLoader(batches, batch_size=None))
        wall = time.perf_counter() - t0
        assert tp.timed_batches == args.steps - args.warmup and tp.trained_tokens == timed_tokens
        summary = tp.summary()
        if os.environ.get("BENCH_DEBUG"):
            print("  ftbench step times", [round(x, 4) for x in tp.step_times], summary["contended_reasons"])
        return tp.time, summary["cpu_seconds"], wall

    def bare_round() -> tuple[float, float, float]:
        opt = new_optimizer([p for p in bare_model.parameters() if p.requires_grad])
        timer = StepTimer(cuda)
        t0 = time.perf_counter()
        for b in on_device:
            timer.start()
            loss = bare_model(**b, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            timer.stop()
        times = timer.times()
        return sum(times[args.warmup:]), sum(timer.cpu[args.warmup:]), time.perf_counter() - t0

    def hf_round() -> tuple[float, float, float]:
        from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

        timer = StepTimer(cuda)

        class Timed(TrainerCallback):
            def on_step_begin(self, *a, **k):
                timer.start()

            def on_step_end(self, *a, **k):
                timer.stop()

        targs = TrainingArguments(
            output_dir=os.path.join(tmp.name, "hf"), max_steps=args.steps, per_device_train_batch_size=1,
            learning_rate=args.lr, weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0,
            logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
            use_cpu=not cuda, dataloader_num_workers=0, dataloader_pin_memory=False,
            train_sampling_strategy="sequential", seed=args.seed)
        opt = new_optimizer([p for p in hf_model.parameters() if p.requires_grad])
        t0 = time.perf_counter()
        trainer = Trainer(model=hf_model, args=targs, train_dataset=batches, data_collator=lambda items: items[0],
                          optimizers=(opt, None), callbacks=[Timed()])
        trainer.remove_callback(PrinterCallback)  # it prints the end-of-training metrics
        trainer.train()
        wall = time.perf_counter() - t0
        times = timer.times()
        assert len(times) == args.steps, f"hf: {len(times)} steps timed, expected {args.steps}"
        return sum(times[args.warmup:]), sum(timer.cpu[args.warmup:]), wall

    run = {"ftbench": ftbench_round, "bare": bare_round, "hf": hf_round}
    counts = ft.parameter_counts()
    print(f"model={args.model} method={args.method} device={args.device} dtype={args.dtype} "
          f"trainable={counts['trainable']:,} total={counts['total']:,} threads={torch.get_num_threads()} "
          f"batch={args.batch_size} steps/round={args.steps} (warm-up {args.warmup}) rounds={args.rounds} "
          f"trained tokens/round={timed_tokens} sides={','.join(args.sides)}", flush=True)
    times: dict[str, list[float]] = {s: [] for s in args.sides}
    cpus: dict[str, list[float]] = {s: [] for s in args.sides}
    walls: dict[str, list[float]] = {s: [] for s in args.sides}
    orders = list(itertools.permutations(args.sides))
    for r in range(args.rounds):
        for side in orders[r % len(orders)]:
            step_time, cpu_time, wall = run[side]()
            times[side].append(step_time)
            cpus[side].append(cpu_time)
            walls[side].append(wall)
        line = "   ".join(f"{s} {timed_tokens / times[s][-1]:8.1f} tok/s" for s in args.sides)
        ratios = "  ".join(f"{s}/bare {times['bare'][-1] / times[s][-1]:.3f}" for s in args.sides if s != "bare")
        print(f"round {r + 1:2d}: {line}   {ratios}", flush=True)

    print("\ntrained tokens/s over all rounds: " + "   ".join(
        f"{s} {timed_tokens * len(times[s]) / sum(times[s]):.1f}" for s in args.sides))
    def ratios(figures: dict[str, list[float]], s: str) -> str:
        per_round = [b / t for b, t in zip(figures["bare"], figures[s])]
        return (f"median {statistics.median(per_round):.3f} over {len(per_round)} rounds (range "
                f"{min(per_round):.3f}-{max(per_round):.3f}; pooled {sum(figures['bare']) / sum(figures[s]):.3f})")

    for s in args.sides:
        if s == "bare":
            continue
        print(f"{s} / bare tokens/s: {ratios(times, s)}; whole-run wall ratio {sum(walls['bare']) / sum(walls[s]):.3f}")
        # the CPU time each step took (all threads), against the bare loop's: the work a side adds, which
        # waiting for a CPU on a busy machine hardly moves (on CUDA: the host's work, not the device's)
        print(f"{s} / bare by process CPU time per step: {ratios(cpus, s)}")

    if args.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        run[args.profile]()
        prof.disable()
        print(f"\ncProfile of one {args.profile} round ({args.steps} steps), by own time:")
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        print("the trainer's own frames (lightning, ftbench, transformers' trainer, accelerate), by cumulative time:")
        pstats.Stats(prof).sort_stats("cumulative").print_stats(r"lightning|ftbench|trainer|accelerate", 40)
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
