"""Multi-task learning: a mixture of named task datasets, sampled by a chosen strategy.

Each task is any regime's data (``instruction`` rows or ``domain`` text) from any source, with a
name. Training draws each example's task from the mixture proportions and then the task's next
example from a seeded per-task permutation (every example is seen once before any is repeated), a
fresh draw each epoch (``set_epoch``, which Lightning calls). Proportions, from the task sizes
``n`` (capped at ``cap`` first, T5's examples-proportional mixing with limit K):

- ``proportional``: ``min(n, K)``
- ``temperature``: ``min(n, K) ** (1 / T)`` (T=1 is proportional, T -> inf uniform)
- ``uniform``: 1 each
- ``weights``: the given ``weights`` (one per task, >= 0)

Each task is split by the shared rule (rows with the same prompt share a split); a training example
whose prompt (a domain block: whose tokens) is held out in another task is left out too.
With ``prompt_batches`` (instruction tasks only) training batches are prompt-only batches drawn from
the same mixture.

Validation and test examples are tagged with their task, so the method logs ``val/<task>/loss``,
``val/<task>/accuracy`` (exact match) and the macro averages ``val/macro_loss`` and
``val/macro_accuracy``; each task can name its own answer metrics (``tasks[i].metrics``, default the
mixture's ``metrics``), logged as ``val/<task>/<metric>`` with a macro average over the tasks that have it. Evaluation batches interleave the tasks round-robin (one batch of
``eval_batch_size`` covers every task) and never mix examples with a reference answer with examples
without one, so exact match is computed for every instruction task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Optional, Sequence

import torch
from torch.utils.data import BatchSampler, DataLoader, Sampler

from ftbench.data.base import Example, PackedCollator, SplitDataModule, refuse_arguments
from ftbench.errors import ConfigError
from ftbench.evaluation.metrics import MetricConfig, build_metrics

Sampling = Literal["proportional", "temperature", "uniform", "weights"]


@dataclass
class TaskSpec:
    """One task of a mixture.

    Args:
        name: Task name, used in metric names (``val/<name>/accuracy``): unique, no ``/``.
        source: Its data, as the regime reads it (``builtin:arithmetic``, a file, ``hf:NAME``, ...).
        regime: ``instruction`` (prompt/response rows, exact match) or ``domain`` (raw text).
        val_source: Its validation data; when absent a share of ``source`` is held out.
        test_source: Its test data; when absent a share of ``source`` is held out.
        options: More init arguments of the regime's data module (e.g. ``builtin_size``, ``text_field``).
        metrics: This task's answer metrics (as ``data.metrics``); default: the mixture's ``metrics``.
    """

    name: str
    source: str
    regime: Literal["instruction", "domain"] = "instruction"
    val_source: Optional[str] = None
    test_source: Optional[str] = None
    options: dict[str, Any] = field(default_factory=dict)
    metrics: Optional[list[MetricConfig]] = None


def builtin_tasks() -> list[TaskSpec]:
    """The built-in mixture: three generated tasks of different sizes plus the instruction mixture."""
    return [
        TaskSpec("arithmetic", "builtin:arithmetic", options={"builtin_size": 2000}),
        TaskSpec("last_word", "builtin:last_word", options={"builtin_size": 1000}),
        TaskSpec("sort_numbers", "builtin:sort_numbers", options={"builtin_size": 500}),
        TaskSpec("instruction", "builtin:instruction", options={"builtin_size": 2000}),
    ]


def check_task_names(names: Sequence[str]) -> None:
    """Task names must be unique, non-empty and free of ``/`` (they become metric names)."""
    first: dict[str, int] = {}
    for i, name in enumerate(names):
        if not name or "/" in name or name != name.strip():
            raise ConfigError(f"data.tasks[{i}].name: {name!r} is not a task name (non-empty, no '/', no surrounding spaces)")
        if name in first:
            raise ConfigError(f"data.tasks[{i}].name: task name {name!r} is used twice (also data.tasks[{first[name]}])")
        first[name] = i


def mixture_proportions(
    sizes: dict[str, int],
    sampling: str = "proportional",
    temperature: float = 1.0,
    weights: Optional[dict[str, float]] = None,
    cap: Optional[int] = None,
) -> dict[str, float]:
    """Sampling probability of each task (summing to 1), in the order of ``sizes``."""
    names = list(sizes)
    if weights is not None and sampling != "weights":
        raise ConfigError(f"data.weights: given, but data.sampling is {sampling!r}; set sampling: weights")
    if sampling == "weights":
        if weights is None:
            raise ConfigError("data.weights: sampling 'weights' needs a weight for every task")
        missing = [n for n in names if n not in weights]
        unknown = [n for n in weights if n not in sizes]
        if missing or unknown:
            parts = []
            if missing:
                parts.append(f"no weight for {', '.join(map(repr, missing))}")
            if unknown:
                parts.append(f"{', '.join(map(repr, unknown))} {'is' if len(unknown) == 1 else 'are'} not a task")
            raise ConfigError(f"data.weights: {'; '.join(parts)} (tasks: {', '.join(names)})")
        for n in names:
            w = weights[n]
            if not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise ConfigError(f"data.weights: weight of {n!r} is {w!r}; weights must be finite and >= 0")
        raw = [float(weights[n]) for n in names]
    else:
        if cap is not None and cap < 1:
            raise ConfigError(f"data.cap: must be at least 1, got {cap}")
        capped = [min(sizes[n], cap) if cap is not None else sizes[n] for n in names]
        if sampling == "proportional":
            raw = [float(s) for s in capped]
        elif sampling == "temperature":
            if not temperature > 0:
                raise ConfigError(f"data.temperature: must be > 0, got {temperature}")
            raw = [s ** (1.0 / temperature) if s > 0 else 0.0 for s in capped]
        elif sampling == "uniform":
            raw = [1.0 if sizes[n] > 0 else 0.0 for n in names]
        else:
            raise ConfigError(f"data.sampling: {sampling!r} is not proportional, temperature, uniform or weights")
    for n, r in zip(names, raw):
        if r > 0 and sizes[n] == 0:
            raise ConfigError(f"data.tasks: task {n!r} has no training examples but a sampling weight of {r}")
    total = sum(raw)
    if total <= 0:
        raise ConfigError("data.weights: the weights add up to 0; give at least one task a positive weight")
    return {n: r / total for n, r in zip(names, raw)}


class MixtureSampler(Sampler[int]):
    """Indices into a concatenation of task datasets: each draw picks a task from ``probs``, then
    that task's next example in a seeded permutation (a new permutation when one is used up).
    ``set_epoch`` (called by Lightning) makes each epoch a different, reproducible draw."""

    def __init__(self, sizes: Sequence[int], probs: Sequence[float], num_samples: int, seed: int = 0):
        self.sizes, self.num_samples, self.seed = list(sizes), num_samples, seed
        self.probs = torch.tensor(list(probs), dtype=torch.double)
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)

    def __iter__(self) -> Iterator[int]:
        g = self._generator()
        tasks = torch.multinomial(self.probs, self.num_samples, replacement=True, generator=g).tolist()
        perms: list[list[int]] = [[] for _ in self.sizes]
        for t in tasks:
            if not perms[t]:
                perms[t] = torch.randperm(self.sizes[t], generator=g).tolist()[::-1]
            yield self.offsets[t] + perms[t].pop()


class FixedBatches(torch.utils.data.Dataset):
    """Evaluation batches as dataset items: item ``i`` is the list of examples of batch ``i``."""

    def __init__(self, examples: Sequence[Example], batches: list[list[int]]):
        self.examples, self.batches = examples, batches

    def __getitem__(self, i: int) -> list[Example]:
        return [self.examples[j] for j in self.batches[i]]

    def __len__(self) -> int:
        return len(self.batches)


def eval_batches(examples: Sequence[Example], batch_size: int) -> list[list[int]]:
    """Evaluation batches: tasks interleaved round-robin, examples with a reference answer never in a
    batch with examples without one (generation needs every row of a batch to have a prompt)."""
    batches: list[list[int]] = []
    for answerable in (True, False):
        by_task: dict[Optional[str], list[int]] = {}
        for i, e in enumerate(examples):
            if (e.prompt_ids is not None and e.answer is not None) == answerable:
                by_task.setdefault(e.task, []).append(i)
        queues = list(by_task.values())
        order = [q[k] for k in range(max((len(q) for q in queues), default=0)) for q in queues if k < len(q)]
        batches += [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return batches


class MultiTaskData(SplitDataModule):
    """Several named tasks mixed for training, validated and tested per task."""

    regime = "multitask"

    def __init__(
        self,
        *,
        tasks: Optional[list[TaskSpec]] = None,
        sampling: Sampling = "proportional",
        temperature: float = 2.0,
        weights: Optional[dict[str, float]] = None,
        cap: Optional[int] = None,
        examples_per_epoch: Optional[int] = None,
        prompt_template: str = "auto",
        max_length: int = 256,
        packing: bool = False,
        **kwargs: Any,
    ):
        """
        Args:
            tasks: The tasks, each a name, a source and a regime (default: the built-in mixture of
                ``arithmetic``, ``last_word``, ``sort_numbers`` and ``instruction``).
            sampling: How tasks are mixed: ``proportional`` to their (capped) sizes,
                ``temperature``-scaled (size ** (1/T)), ``uniform``, or explicit ``weights``.
            temperature: T of ``temperature`` sampling.
            weights: Task name -> weight (>= 0, normalised) for ``sampling: weights``.
            cap: Examples-proportional cap K: a task counts as at most K examples (T5).
            examples_per_epoch: Training draws per epoch (default: the sum of the capped sizes).
            prompt_template: Prompt format of instruction tasks (see ``InstructionData``).
            max_length: Longest instruction example; block size of domain tasks.
            packing: Pack each training batch's rows into ``max_length`` blocks, positions restarting
                at each row (a domain block keeps its own restarts) and no attention across rows
                (``ftbench.data.packing``): the same rows and loss, less padding. Validation and test
                batches are not packed.
            **kwargs: The arguments every regime shares (:class:`~ftbench.data.base.SplitDataModule`),
                applied to each task: the fractions, ``builtin_size`` (a task's ``options`` override
                it), ``truncation``, and ``max_train_rows``/``max_eval_rows`` per task; ``order_seed``
                seeds the mixture draws.
        """
        refuse_arguments(kwargs, **dict.fromkeys(("source", "val_source", "test_source"), "each task has its own (data.tasks[i].source, ...)"))
        super().__init__(source=None, val_source=None, test_source=None, max_length=max_length, **kwargs)
        self.tasks = list(tasks) if tasks is not None else builtin_tasks()
        if not self.tasks:
            raise ConfigError("data.tasks: give at least one task")
        check_task_names([t.name for t in self.tasks])
        for i, t in enumerate(self.tasks):
            if t.metrics is not None:
                build_metrics(t.metrics, f"data.tasks[{i}].metrics")
        if self.prompt_batches:
            for i, t in enumerate(self.tasks):
                if t.regime == "domain":
                    raise ConfigError(f"data.prompt_batches: task {t.name!r} (data.tasks[{i}]) is domain text, which has no prompts")
        self.set_row_packing(packing)
        self.sampling, self.temperature, self.weights, self.cap = sampling, temperature, weights, cap
        self.examples_per_epoch = examples_per_epoch
        self.prompt_template = prompt_template
        # check the weights against the task names now, before any data is read
        if weights is not None or sampling == "weights":
            mixture_proportions({t.name: 1 for t in self.tasks}, sampling, temperature, weights, cap)
        self.task_splits: dict[str, dict[str, list[Example]]] = {}
        self.modules: dict[str, SplitDataModule] = {}
        self.proportions: dict[str, float] = {}
        self.leaked: dict[str, int] = {}

    def source_name(self) -> str:
        return ", ".join(t.source for t in self.tasks)

    def metric_config(self, task: Optional[str]) -> Optional[list]:
        """A task's own ``metrics``, else the mixture's."""
        spec = next((t for t in self.tasks if t.name == task), None)
        return spec.metrics if spec is not None and spec.metrics is not None else self.metrics

    def _metrics_where(self, task: Optional[str]) -> str:
        i = next((i for i, t in enumerate(self.tasks) if t.name == task), None)
        return f"data.tasks[{i}].metrics" if i is not None and self.tasks[i].metrics is not None else "data.metrics"

    # ------------------------------------------------------------------ tasks
    def task_module(self, spec: TaskSpec) -> SplitDataModule:
        """The regime's data module that reads one task, with the mixture's shared arguments."""
        kwargs: dict[str, Any] = dict(
            backbone=self.backbone, source=spec.source, val_source=spec.val_source, test_source=spec.test_source,
            max_length=self.max_length, val_fraction=self.val_fraction, test_fraction=self.test_fraction,
            max_train_rows=self.max_train_rows, max_eval_rows=self.max_eval_rows, seed=self.seed,
        )
        if spec.regime == "instruction":
            from ftbench.data.instruction import InstructionData

            kwargs.update(prompt_template=self.prompt_template, truncation=self.truncation, builtin_size=self.builtin_size)
            return InstructionData(**{**kwargs, **spec.options})
        if spec.regime == "domain":
            from ftbench.data.domain import DomainData

            return DomainData(**{**kwargs, **spec.options})
        raise ConfigError(f"data.tasks: task {spec.name!r} has regime {spec.regime!r}; use instruction or domain")

    def setup(self, stage: Optional[str] = None) -> None:
        if self.splits:
            return
        for spec in self.tasks:
            module = self.task_module(spec)
            module.setup(stage)
            self.modules[spec.name] = module
            splits = {k: module.splits.get(k, []) for k in ("train", "val", "test")}
            for examples in splits.values():
                for e in examples:
                    e.task = spec.name
            self.task_splits[spec.name] = splits
        # no prompt held out in one task may be trained in another (a domain block: its tokens)
        held_out = {_key(e) for s in self.task_splits.values() for k in ("val", "test") for e in s[k]}
        for name, s in self.task_splits.items():
            before = len(s["train"])
            s["train"] = [e for e in s["train"] if _key(e) not in held_out]
            self.leaked[name] = before - len(s["train"])
        sizes = {name: len(s["train"]) for name, s in self.task_splits.items()}
        self.proportions = mixture_proportions(sizes, self.sampling, self.temperature, self.weights, self.cap)
        self.splits = {k: [e for s in self.task_splits.values() for e in s[k]] for k in ("train", "val", "test")}
        self.finish_setup(stage)

    def train_sizes(self) -> dict[str, int]:
        return {name: len(s["train"]) for name, s in self.task_splits.items()}

    def sampler(self) -> MixtureSampler:
        sizes = self.train_sizes()
        n = self.examples_per_epoch
        if n is None:
            n = sum(min(s, self.cap) if self.cap is not None else s for s in sizes.values())
        return MixtureSampler(list(sizes.values()), [self.proportions[k] for k in sizes], n, self.order_seed)

    # ------------------------------------------------------------------ loaders
    def collator(self, generation: bool = True) -> PackedCollator:
        return PackedCollator(self.backbone.tokenizer.pad_token_id, self.pad_to_multiple_of, generation)

    def train_dataloader(self) -> DataLoader:
        if self.train_batch_repeats > 1:  # online RL reusing a rollout: each batch several steps in a row
            return DataLoader(self.splits["train"], batch_sampler=self.repeated(self.sampler()),
                              collate_fn=self.train_collator(), num_workers=self.num_workers)
        return DataLoader(self.splits["train"], batch_size=self.batch_size, sampler=self.sampler(),
                          collate_fn=self.train_collator(), num_workers=self.num_workers)

    def training_batches(self) -> list[list[int]]:
        """The first epoch's training batches (indices): the mixture's draws in ``batch_size`` batches."""
        return list(BatchSampler(self.sampler(), self.batch_size, drop_last=False))

    def _eval_loader(self, split: str) -> DataLoader:
        # the batches are the dataset's items (batch_size=None: no automatic batching), so under DDP
        # Lightning's DistributedSampler gives each rank its own batches, as it shards any other loader
        batches = FixedBatches(self.splits[split], eval_batches(self.splits[split], self.eval_batch_size))
        return DataLoader(batches, batch_size=None, collate_fn=self.collator(), num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def describe(self) -> dict[str, Any]:
        """What the record says about the data: the mixture and each task's sizes."""
        return {
            "regime": self.regime,
            "sampling": self.sampling,
            "temperature": self.temperature if self.sampling == "temperature" else None,
            "weights": self.weights,
            "cap": self.cap,
            "examples_per_epoch": len(self.sampler()) if self.splits else self.examples_per_epoch,
            "tasks": {
                spec.name: {
                    "source": spec.source,
                    "regime": spec.regime,
                    "rows": {k: len(v) for k, v in self.task_splits.get(spec.name, {}).items()},
                    "proportion": self.proportions.get(spec.name),
                    "removed_as_held_out_elsewhere": self.leaked.get(spec.name, 0),
                }
                for spec in self.tasks
            },
            "rows": {k: len(v) for k, v in self.splits.items()},
            "max_length": self.max_length,
            "metrics": self.metric_names(),
            "packing": self.packing_record(),
        }


def _key(e: Example) -> tuple[int, ...]:
    """What must not be both trained and held out across tasks: the prompt's tokens (a domain
    block, which has no prompt: its tokens)."""
    return tuple(e.prompt_ids if e.prompt_ids is not None else e.input_ids)
