"""How much does ftbench's training step cost over a bare PyTorch loop, and over ``transformers.Trainer``?
Prints each side's trained tokens/s as a ratio to the bare loop's, for the same model, method, batches and
optimizer, measured side by side in one process.

    python scripts/bench_step.py                                   # tiny random Llama (a minute)
    python scripts/bench_step.py --model embedded --method lora    # SmolLM2-135M (~1-3 s a step on 2 CPU cores)
    python scripts/bench_step.py --model embedded --device cuda --dtype bfloat16   # on a GPU
    python scripts/bench_step.py --objectives all --sides ftbench,bare,trl         # SFT, DPO, reward model, GRPO

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

**Other objectives** (``--objectives sft,dpo,reward,grpo`` or ``all``; default ``sft``): the same rounds for
DPO (sigmoid, beta 0.1, the reference = the adapter switched off), the reward model (Bradley-Terry on the score
head) and GRPO (G completions per prompt sampled, the exact-answer reward, group-centred advantages, beta 0), on
the built-in preference pairs (DPO, reward) and instruction prompts (GRPO):

* ftbench: ``Trainer.fit`` of :class:`~ftbench.objectives.DPO` / ``Reward`` / ``GRPO`` as above.
* bare: the same computation written out in plain PyTorch on the same collated batches: DPO's one forward of
  chosen and rejected concatenated, the reference's under ``disable_adapter()`` and ``no_grad``, summed
  completion log-probs, ``-logsigmoid(beta * (policy log-ratio - reference log-ratio))``; the reward model's
  scores (``model(...).logits`` of a LoRA'd sequence classifier) and ``-logsigmoid(r_chosen - r_rejected)``;
  GRPO's ``generate`` of G samples per prompt, the same reward function on the decoded completions, advantages
  ``(r - mean_group) / (std_group + 1e-4)`` and the policy-gradient loss over completion tokens.
* trl (when ``trl`` is installed: ``pip install ftbench[bench]``; TRL 1.16 adds no other torch):
  ``SFTTrainer``/``DPOTrainer``/``RewardTrainer`` given the same model copy and optimizer, on the same rows in
  the same order (conversational prompt/chosen/rejected, TRL tokenising them itself with the same chat
  template, sequential sampler), timed as the hf side. Its batches are TRL's own collation of those rows, so
  its ratio is of step times per step, not of tokens. GRPO has no TRL side here (GRPOTrainer's generation
  batch and reward plumbing differ too much to share batches: left for later).

For DPO, reward and GRPO the ratios are step times (bare time / side time): ftbench and bare train the same
batches, so they are also the tokens/s ratio; GRPO's sampled completions differ in length between sides, so
its ratio is of steps, each side also showing its mean completion tokens.

On CPU each step is timed with ``perf_counter``; on CUDA with events on the stream, read when the round ends
(no side pays for a sync the others do not). The ratios use trained tokens (labels != -100), identical on
every side, so each is bare time / side time; per round, then the median and range over rounds. A second
ratio, on whole-run wall time (``Trainer.fit`` / ``Trainer.train`` including set-up) against the bare loop's,
shows the per-run set-up cost, which a long run amortises.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SIDES = ("ftbench", "bare", "hf", "trl")
OBJECTIVES = ("sft", "dpo", "reward", "grpo")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help="'tiny' (built in-process), 'embedded', or a backbone.model value")
    p.add_argument("--method", default="lora", choices=["lora", "full"])
    p.add_argument("--steps", type=int, default=None, help="steps per round (default: 20 tiny, 4 otherwise)")
    p.add_argument("--warmup", type=int, default=None, help="steps of each round left out (default: 3 tiny, 1 otherwise)")
    p.add_argument("--rounds", type=int, default=10, help="rounds per side (default 10)")
    p.add_argument("--sides", default="ftbench,bare,hf", help=f"comma-separated subset of {','.join(SIDES)} (bare is "
                   "always run; hf: SFT only; trl: when trl is installed)")
    p.add_argument("--objectives", default="sft", help=f"comma-separated subset of {','.join(OBJECTIVES)}, or all")
    p.add_argument("--generations", type=int, default=4, help="GRPO: completions per prompt")
    p.add_argument("--max-completion-length", type=int, default=16, help="GRPO: most tokens a completion")
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
    args.objectives = OBJECTIVES if args.objectives == "all" else tuple(o for o in OBJECTIVES if o in args.objectives.split(","))
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

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "transformers", "trl"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    import torch

    from ftbench.backbone import Backbone

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if "trl" in args.sides and importlib.util.find_spec("trl") is None:
        print("trl is not installed (pip install 'ftbench[bench]'): no trl side", flush=True)
        args.sides = tuple(s for s in args.sides if s != "trl")
    tmp = tempfile.TemporaryDirectory(prefix="bench-step-")
    model_path = args.model
    if args.model == "tiny":
        from ftbench.testing import build_tiny_llama

        model_path = str(build_tiny_llama(Path(tmp.name) / "tiny"))
    bench = Bench(args, Backbone(model=model_path, dtype=args.dtype), tmp.name)
    for objective in args.objectives:
        sides = tuple(s for s in args.sides if s != "hf" or objective == "sft")
        if objective == "grpo":
            sides = tuple(s for s in sides if s != "trl")
        run, timed_tokens, counts = bench.sides(objective, sides)
        print(f"\n== {objective}: model={args.model} method={args.method} device={args.device} dtype={args.dtype} "
              f"trainable={counts['trainable']:,} total={counts['total']:,} threads={torch.get_num_threads()} "
              f"batch={args.batch_size} steps/round={args.steps} (warm-up {args.warmup}) rounds={args.rounds} "
              f"trained tokens/round={timed_tokens if timed_tokens else 'differs by side'} sides={','.join(sides)}",
              flush=True)
        compare(args, run, sides, timed_tokens)
        if args.profile and args.profile in run:
            profile(run[args.profile], args.profile, args.steps)
    tmp.cleanup()
    return 0


def compare(args, run: dict, sides: tuple[str, ...], timed_tokens: Optional[int]) -> None:
    """The rounds (every order of the sides in turn) and the ratios against the bare loop."""
    times: dict[str, list[float]] = {s: [] for s in sides}
    cpus: dict[str, list[float]] = {s: [] for s in sides}
    walls: dict[str, list[float]] = {s: [] for s in sides}
    orders = list(itertools.permutations(sides))
    for r in range(args.rounds):
        for side in orders[r % len(orders)]:
            step_time, cpu_time, wall = run[side]()
            times[side].append(step_time)
            cpus[side].append(cpu_time)
            walls[side].append(wall)
        steps = args.steps - args.warmup
        line = "   ".join(f"{s} {timed_tokens / times[s][-1]:8.1f} tok/s" if timed_tokens else
                           f"{s} {times[s][-1] / steps:7.3f} s/step" for s in sides)
        ratios = "  ".join(f"{s}/bare {times['bare'][-1] / times[s][-1]:.3f}" for s in sides if s != "bare")
        print(f"round {r + 1:2d}: {line}   {ratios}", flush=True)

    if timed_tokens:
        print("trained tokens/s over all rounds: " + "   ".join(
            f"{s} {timed_tokens * len(times[s]) / sum(times[s]):.1f}" for s in sides))
    else:
        print("seconds a step over all rounds: " + "   ".join(
            f"{s} {sum(times[s]) / (len(times[s]) * (args.steps - args.warmup)):.3f}" for s in sides))

    def ratios(figures: dict[str, list[float]], s: str) -> str:
        per_round = [b / t for b, t in zip(figures["bare"], figures[s])]
        return (f"median {statistics.median(per_round):.3f} over {len(per_round)} rounds (range "
                f"{min(per_round):.3f}-{max(per_round):.3f}; pooled {sum(figures['bare']) / sum(figures[s]):.3f})")

    what = "tokens/s" if timed_tokens else "step time (bare / side)"
    for s in sides:
        if s == "bare":
            continue
        own = " (TRL's own batches of the same rows: a ratio of step times)" if s == "trl" else ""
        print(f"{s} / bare {what}{own}: {ratios(times, s)}; whole-run wall ratio {sum(walls['bare']) / sum(walls[s]):.3f}")
        # the CPU time each step took (all threads), against the bare loop's: the work a side adds, which
        # waiting for a CPU on a busy machine hardly moves (on CUDA: the host's work, not the device's)
        print(f"{s} / bare by process CPU time per step: {ratios(cpus, s)}")


def profile(round_fn, side: str, steps: int) -> None:
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    round_fn()
    prof.disable()
    print(f"\ncProfile of one {side} round ({steps} steps), by own time:")
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    print("the trainer's own frames (lightning, ftbench, transformers' trainer, accelerate, trl), by cumulative time:")
    pstats.Stats(prof).sort_stats("cumulative").print_stats(r"lightning|ftbench|trainer|accelerate|trl", 40)


class Bench:
    """The sides of one objective: each a function that runs one round and returns (timed step seconds,
    process CPU seconds of those steps, whole-run wall seconds)."""

    def __init__(self, args, backbone, tmp: str):
        import torch

        self.args, self.backbone, self.tmp = args, backbone, tmp
        self.cuda = args.device == "cuda"
        self.device = torch.device("cuda", 0) if self.cuda else torch.device("cpu")

    # ------------------------------------------------------------------ shared pieces
    def new_tuner(self):
        from ftbench.tuners import Full, Peft

        if self.args.method == "full":
            return Full(lr=self.args.lr)
        from peft import LoraConfig  # configs/tuner/lora.yaml

        return Peft(peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"),
                    lr=self.args.lr)

    def new_optimizer(self, params, lr=None):
        """AdamW without weight decay (ftbench's objective hands the tuner's lr, the same ``--lr``)."""
        import torch

        return torch.optim.AdamW(params, lr=self.args.lr if lr is None else lr, weight_decay=0.0)

    def plain_model(self, head: str = "causal_lm"):
        """The tuner's prepare() on its own fresh copy of the weights, as ftbench's objective does."""
        import lightning as L

        from ftbench.backbone import train_score_head

        L.seed_everything(self.args.seed, verbose=False)
        model = self.new_tuner().prepare(self.backbone.load_model(head=head), self.backbone)
        if head == "score":
            train_score_head(model)  # a new head trains under every tuner (ftbench.objectives.Reward does the same)
        model.to(self.device).train()
        return model

    def objective(self, name: str):
        import lightning as L

        from ftbench.objectives import DPO, GRPO, SFT, Reward

        L.seed_everything(self.args.seed, verbose=False)
        kw = dict(backbone=self.backbone, tuner=self.new_tuner(), optimizer=self.new_optimizer, lr_scheduler="constant")
        if name == "grpo":
            obj = GRPO(num_generations=self.args.generations, max_completion_length=self.args.max_completion_length,
                       **kw)
        else:
            obj = {"sft": SFT, "dpo": DPO, "reward": Reward}[name](**kw)
        obj.configure_model()
        return obj

    def data(self, name: str):
        """The fixed batches of ``--steps`` steps (collated once) and the data module's training rows."""
        from ftbench.data.instruction import InstructionData
        from ftbench.data.preference import PreferenceData

        a = self.args
        size = max(400, 2 * a.steps * a.batch_size)
        if name in ("dpo", "reward"):
            dm = PreferenceData(backbone=self.backbone, source="builtin:instruction", builtin_size=size,
                                batch_size=a.batch_size, max_length=a.max_length, seed=a.seed)
        else:
            dm = InstructionData(backbone=self.backbone, source="builtin:instruction", builtin_size=size,
                                 batch_size=a.batch_size, max_length=a.max_length, seed=a.seed,
                                 prompt_batches=name == "grpo")
        dm.setup("fit")
        # the first rows in order (the TRL side reads the same rows as text, in this order)
        from torch.utils.data import DataLoader

        rows = dm.splits["train"][: a.steps * a.batch_size]
        loader = DataLoader(rows, batch_size=a.batch_size, shuffle=False, collate_fn=dm.train_collator())
        batches = [dict(b) for b in loader]
        assert len(batches) == a.steps, "not enough training rows for --steps"
        text_rows = [r.fields for r in dm.split_rows()["train"][: a.steps * a.batch_size]]
        return batches, text_rows

    def timed_lightning(self, module, batches, tokens: Optional[int]):
        import lightning as L
        from torch.utils.data import DataLoader

        from ftbench.bench.measure import PeakMemory, Throughput

        a = self.args

        def round_() -> tuple[float, float, float]:
            tp = Throughput(warmup_steps=a.warmup)
            trainer = L.Trainer(max_steps=a.steps, accelerator="gpu" if self.cuda else "cpu", devices=1,
                                precision="32-true", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                                callbacks=[PeakMemory(), tp])
            t0 = time.perf_counter()
            trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
            wall = time.perf_counter() - t0
            assert tp.timed_batches == a.steps - a.warmup
            assert tokens is None or tp.trained_tokens == tokens
            summary = tp.summary()
            if os.environ.get("BENCH_DEBUG"):
                print("  ftbench step times", [round(x, 4) for x in tp.step_times], summary["contended_reasons"])
            return tp.time, summary["cpu_seconds"], wall
        return round_

    def timed_loop(self, step, model, batches):
        """A bare loop: ``step(model, batch)`` returns the loss; backward, AdamW step, zero_grad."""
        a = self.args
        on_device = [{k: v.to(self.device) if hasattr(v, "to") else v for k, v in b.items()} for b in batches]

        def round_() -> tuple[float, float, float]:
            opt = self.new_optimizer([p for p in model.parameters() if p.requires_grad])
            timer = StepTimer(self.cuda)
            t0 = time.perf_counter()
            for b in on_device:
                timer.start()
                loss = step(model, b)
                loss.backward()
                opt.step()
                opt.zero_grad()
                timer.stop()
            times = timer.times()
            return sum(times[a.warmup:]), sum(timer.cpu[a.warmup:]), time.perf_counter() - t0
        return round_

    def timed_hf(self, make_trainer, model):
        """``transformers.Trainer`` (or a TRL trainer, a subclass) timed from ``on_step_begin`` to ``on_step_end``.
        ``model``: the model, or a function making a fresh one each round (TRL's DPOTrainer adds a ``ref``
        adapter, a copy of the initial one, to a peft model it is given: once per model)."""
        import torch
        from transformers import PrinterCallback, TrainerCallback

        a = self.args

        def round_() -> tuple[float, float, float]:
            timer = StepTimer(self.cuda)

            class Timed(TrainerCallback):
                def on_step_begin(self, *args, **kwargs):
                    timer.start()

                def on_step_end(self, *args, **kwargs):
                    timer.stop()

            this = model() if callable(model) and not isinstance(model, torch.nn.Module) else model
            opt = self.new_optimizer([p for p in this.parameters() if p.requires_grad])
            t0 = time.perf_counter()
            trainer = make_trainer(this, opt, [Timed()])
            trainer.remove_callback(PrinterCallback)  # it prints the end-of-training metrics
            trainer.train()
            wall = time.perf_counter() - t0
            times = timer.times()
            assert len(times) == a.steps, f"{type(trainer).__name__}: {len(times)} steps timed, expected {a.steps}"
            return sum(times[a.warmup:]), sum(timer.cpu[a.warmup:]), wall
        return round_

    def training_args(self, config_class=None, **extra):
        """The arguments every Trainer side shares: no clipping, constant lr, nothing but training."""
        from transformers import TrainingArguments

        a = self.args
        cls = config_class or TrainingArguments
        return cls(output_dir=os.path.join(self.tmp, "hf"), max_steps=a.steps, per_device_train_batch_size=a.batch_size
                   if config_class else 1, learning_rate=a.lr, weight_decay=0.0, lr_scheduler_type="constant",
                   warmup_steps=0, max_grad_norm=0.0, logging_strategy="no", save_strategy="no", eval_strategy="no",
                   report_to="none", disable_tqdm=True, use_cpu=not self.cuda, bf16=False, fp16=False,
                   dataloader_num_workers=0, dataloader_pin_memory=False, train_sampling_strategy="sequential",
                   seed=a.seed, **extra)

    # ------------------------------------------------------------------ the sides of each objective
    def sides(self, name: str, sides: tuple[str, ...]):
        """(side -> round function, trained tokens of the timed steps or None, the parameter counts)."""
        from ftbench.data.base import IGNORE_INDEX

        module = self.objective(name)
        batches, text_rows = self.data(name)
        a = self.args
        if name == "sft":
            keys = ("input_ids", "attention_mask", "labels")
            batches = [{k: b[k] for k in keys} for b in batches]
            trained = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches]
            tokens: Optional[int] = sum(trained[a.warmup:])
        else:
            tokens = None
        run = {"ftbench": self.timed_lightning(module, batches, tokens)}
        head = "score" if name == "reward" else "causal_lm"
        bare_model = self.plain_model(head)
        run["bare"] = self.timed_loop(BARE_STEPS[name](self, module), bare_model, batches)
        if "hf" in sides:
            from transformers import Trainer

            hf_model = self.plain_model()
            run["hf"] = self.timed_hf(lambda model, opt, cbs: Trainer(
                model=model, args=self.training_args(), train_dataset=batches, data_collator=lambda items: items[0],
                optimizers=(opt, None), callbacks=cbs), hf_model)
        if "trl" in sides:
            run["trl"] = self.timed_hf(self.trl_trainer(name, text_rows), lambda: self.plain_model(head))
        return run, tokens, module.parameter_counts()

    def trl_trainer(self, name: str, rows: list[dict]):
        """A TRL trainer of ``name`` on ``rows`` (conversational, in order) with the given optimizer."""
        import datasets
        import trl

        tok = self.backbone.tokenizer
        if name == "sft":
            data = [{"prompt": [{"role": "user", "content": f"{r['instruction']}\n{r.get('input', '')}".strip()}],
                     "completion": [{"role": "assistant", "content": r["output"]}]} for r in rows]
            config, trainer_class = trl.SFTConfig, trl.SFTTrainer
            extra = dict(max_length=self.args.max_length, completion_only_loss=True)
        else:
            data = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                     "chosen": [{"role": "assistant", "content": r["chosen"]}],
                     "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]
            config, trainer_class = ((trl.DPOConfig, trl.DPOTrainer) if name == "dpo"
                                     else (trl.RewardConfig, trl.RewardTrainer))
            extra = dict(max_length=self.args.max_length)
        dataset = datasets.Dataset.from_list(data)

        def make(model, opt, callbacks):
            return trainer_class(model=model, args=self.training_args(config, **extra), train_dataset=dataset,
                                 processing_class=tok, optimizers=(opt, None), callbacks=callbacks)
        return make


def _sequence_logps(model, cat):
    """Summed log-probs of the completion tokens (labels != -100) of each row, written out."""
    import torch

    logits = model(input_ids=cat["input_ids"], attention_mask=cat["attention_mask"], use_cache=False).logits[:, :-1]
    labels = cat["labels"][:, 1:]
    mask = labels != -100
    logps = torch.gather(logits.float().log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logps * mask).sum(-1)


def bare_sft(bench, module):
    return lambda model, b: model(**b, use_cache=False).loss


def bare_dpo(bench, module, beta: float = 0.1):
    import torch
    import torch.nn.functional as F

    from ftbench.data.pairs import concatenate_pairs

    def step(model, b):
        cat = concatenate_pairs(b, ("input_ids", "attention_mask", "labels"))
        n = b["chosen_input_ids"].shape[0]
        with torch.no_grad(), model.disable_adapter():
            ref = _sequence_logps(model, cat)
        pol = _sequence_logps(model, cat)
        return -F.logsigmoid(beta * ((pol[:n] - pol[n:]) - (ref[:n] - ref[n:]))).mean()
    return step


def bare_reward(bench, module):
    import torch.nn.functional as F

    from ftbench.data.pairs import concatenate_pairs

    def step(model, b):
        cat = concatenate_pairs(b, ("input_ids", "attention_mask"))
        n = b["chosen_input_ids"].shape[0]
        scores = model(input_ids=cat["input_ids"], attention_mask=cat["attention_mask"], use_cache=False).logits[:, 0]
        return -F.logsigmoid(scores[:n] - scores[n:]).mean()
    return step


def bare_grpo(bench, module):
    """Sample G completions a prompt, score them with the objective's reward functions, centre the rewards in
    each group and take the policy-gradient step (ratio 1 on a fresh rollout, beta 0)."""
    import torch

    args, tok = bench.args, bench.backbone.tokenizer
    G = args.generations

    def step(model, b):
        ids = b["prompt_input_ids"].repeat_interleave(G, 0)
        mask = b["prompt_attention_mask"].repeat_interleave(G, 0)
        model.eval()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                                 top_k=0, max_new_tokens=args.max_completion_length, pad_token_id=tok.pad_token_id)
        model.train()
        completion = out[:, ids.shape[1]:]
        # up to and including the first EOS
        is_eos = completion == tok.eos_token_id
        first = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(is_eos[:, 0], completion.shape[1],
                                                                                   dtype=torch.long))
        keep = torch.arange(completion.shape[1], device=completion.device)[None] <= first[:, None]
        texts = tok.batch_decode(completion.masked_fill(~keep, tok.pad_token_id), skip_special_tokens=True)
        prompts = tok.batch_decode(ids, skip_special_tokens=True)
        columns = {k: [v for v in b[k] for _ in range(G)] for k in ("answers", "tasks") if k in b}
        rewards = torch.zeros(len(texts))
        for fn, w in zip(module.reward_funcs, module.reward_weights):
            rewards += w * torch.tensor([0.0 if r is None else r for r in fn(prompts, texts, **columns)])
        grouped = rewards.view(-1, G)
        adv = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)
        full = torch.cat([ids, completion], 1)
        attn = torch.cat([mask, keep.long()], 1)
        logits = model(input_ids=full, attention_mask=attn, use_cache=False).logits[:, ids.shape[1] - 1:-1]
        logps = torch.gather(logits.float().log_softmax(-1), 2, completion.unsqueeze(-1)).squeeze(-1)
        per_token = -torch.exp(logps - logps.detach()) * adv.to(logps.device)[:, None]
        return ((per_token * keep).sum(1) / keep.sum(1).clamp(min=1)).mean()
    return step


BARE_STEPS = {"sft": bare_sft, "dpo": bare_dpo, "reward": bare_reward, "grpo": bare_grpo}


if __name__ == "__main__":
    sys.exit(main())
