"""Per-row evaluation values into the run's metrics: overall, per task, and macro averages over tasks.

A value logged as ``loss`` for a row of task ``arithmetic`` in validation feeds ``val/loss`` and
``val/arithmetic/loss``; at the end of the evaluation ``val/macro_loss`` is the unweighted mean of the
tasks' ``val/{task}/loss``. Means are torchmetrics' ``MeanMetric`` (summed across processes at
``compute``); a weighted value (a loss per token) is a weighted mean; a corpus metric (BLEU, chrF) is
torchmetrics' own corpus metric, fed the stage's texts.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Literal, Optional

import torch
from torchmetrics import MaxMetric, MeanMetric, MinMetric, Metric

Reduction = Literal["mean", "min", "max"]
_KINDS = {"mean": MeanMetric, "min": MinMetric, "max": MaxMetric}


class StageMetrics:
    """The metric states of each evaluation stage (``val``, ``test``) and the tasks seen in it."""

    def __init__(self):
        self.states: dict[str, Metric] = {}
        self.tasks: dict[str, set[str]] = defaultdict(set)  # stage -> tasks seen (for macro averages)
        self.device: torch.device | str = "cpu"

    def start(self, stage: str) -> None:
        """Fresh states for ``stage``, made in the grad mode of its loop (validate/test run under inference
        mode, validation inside fit under no_grad: a state made in one cannot be updated in the other)."""
        self.states = {k: v for k, v in self.states.items() if not k.startswith(stage + "/")}
        self.tasks[stage] = set()

    def state(self, name: str, reduction: Reduction = "mean") -> Metric:
        if name not in self.states:
            self.states[name] = _KINDS[reduction](sync_on_compute=True).to(self.device)
        return self.states[name]

    def update(self, stage: str, tasks: Optional[list], values: dict[str, torch.Tensor],
               weights: Optional[dict[str, torch.Tensor]] = None,
               reductions: Optional[dict[str, Reduction]] = None) -> None:
        """Per-row ``values`` into ``{stage}/{name}`` and, for rows with a task, ``{stage}/{task}/{name}``.
        ``weights`` (per row) make a value a weighted mean (a loss per token); ``reductions`` name the
        values reduced by their extreme over the set (a reward model's ``min_reward``), not the mean.
        A NaN row value is a metric that row's task does not have: left out."""
        n = len(next(iter(values.values())))
        tasks = tasks or [None] * n
        scopes: list[tuple[Optional[str], list[int]]] = [(None, list(range(n)))]
        if any(t is not None for t in tasks):
            groups: dict[Optional[str], list[int]] = defaultdict(list)
            for i, t in enumerate(tasks):
                groups[t].append(i)
            scopes += list(groups.items())
            self.tasks[stage].update(str(t) for t in groups)
        for task, idx in scopes:
            prefix = f"{stage}/" if task is None else f"{stage}/{task}/"
            for name, v in values.items():
                w = (weights or {}).get(name)
                reduction = (reductions or {}).get(name, "mean")
                if w is None:
                    part = v[idx]
                    if part.is_floating_point():
                        part = part[~torch.isnan(part)]
                    if part.numel():
                        self.state(prefix + name, reduction).update(part)
                elif w[idx].sum() > 0:
                    self.state(prefix + name, reduction).update(v[idx].sum() / w[idx].sum(), weight=w[idx].sum())

    def update_corpus(self, stage: str, task: Optional[str], metric: Any, predictions: list[str],
                      references: list[str]) -> None:
        """Feed a corpus-level metric under ``{stage}/{name}`` and, for rows with a task,
        ``{stage}/{task}/{name}``."""
        preds, refs = metric.corpus_inputs(predictions, references)
        for prefix in [f"{stage}/"] + ([f"{stage}/{task}/"] if task is not None else []):
            key = prefix + metric.name
            if key not in self.states:
                self.states[key] = metric.corpus_metric().to(self.device)
            self.states[key].update(preds, refs)

    def results(self, stage: str, derive: Optional[Callable[[dict[str, float], str], None]] = None) -> dict[str, float]:
        """Every metric of ``stage`` computed; ``derive(results, stage)`` adds the metrics computed from
        the others (perplexity from the loss) before the macro averages over tasks are taken."""
        results: dict[str, float] = {}
        tasks = self.tasks[stage]
        kinds: set[str] = set()
        for name, state in list(self.states.items()):
            if not name.startswith(stage + "/") or state.update_count == 0:
                continue
            results[name] = float(state.compute())
            parts = name.split("/", 2)
            if len(parts) == 3 and parts[1] in tasks:
                kinds.add(parts[2])
        if derive is not None:
            derive(results, stage)
        for kind in sorted(kinds):
            vals = [results[f"{stage}/{t}/{kind}"] for t in sorted(tasks) if f"{stage}/{t}/{kind}" in results]
            if vals:
                results[f"{stage}/macro_{kind}"] = sum(vals) / len(vals)
        return results
