"""The evaluation hooks every objective shares: the run's :class:`~ftbench.evaluation.evaluator.Evaluator`
generates, scores, aggregates by task and keeps the prediction rows; an objective says only what its
evaluation computes itself (:meth:`EvaluationSteps.evaluate`, handing it to ``self.evaluator.update``)."""

from __future__ import annotations

from typing import Any

from ftbench.evaluation.evaluator import Evaluator


class EvaluationSteps:
    """Lightning's validation and test hooks of an objective (a mixin of
    :class:`~ftbench.objectives.base.Objective`), through its evaluator."""

    @property
    def evaluator(self) -> Evaluator:
        """The run's evaluation (:mod:`ftbench.evaluation.evaluator`); setting one attaches it here."""
        return self._evaluator

    @evaluator.setter
    def evaluator(self, evaluator: Evaluator) -> None:
        evaluator.attach(self)
        self._evaluator = evaluator

    def evaluate(self, batch: dict[str, Any], stage: str) -> None:
        """One evaluation batch: what the objective computes itself, handed to ``self.evaluator.update``
        (which adds the data set's answer metrics)."""
        raise NotImplementedError

    def derived_metrics(self, results: dict[str, float], stage: str) -> None:
        """Metrics computed from the others at the end of an evaluation (e.g. perplexity)."""

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.evaluate(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.evaluate(batch, "test")

    def on_validation_epoch_start(self) -> None:
        self.evaluator.start("val")
        self.merge_for_evaluation()

    def on_test_epoch_start(self) -> None:
        self.evaluator.start("test")
        self.merge_for_evaluation()

    def on_validation_epoch_end(self) -> None:
        self.unmerge_after_evaluation()
        self.log_results("val")

    def on_test_epoch_end(self) -> None:
        self.unmerge_after_evaluation()
        self.log_results("test")

    def merge_for_evaluation(self) -> None:
        """The tuner folds its adapter into the weights for this evaluation where that is exact
        (:meth:`ftbench.tuners.base.Tuner.merge_for_evaluation`), on one device or under DDP (every
        rank merges the same weights); a sharding strategy (FSDP, DeepSpeed) holds shards, so it stays
        unmerged. Undone in the epoch-end hook, before Lightning's checkpoint callback saves weights
        (``on_validation_end`` comes after it). An objective that reads the reference policy keeps it
        unmerged: peft's ``disable_adapter()`` on a merged model unmerges it (and does not merge back)."""
        from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

        self._merged = False
        if self.model is None or self.tuner is None or self._trainer is None or self.needs_reference:
            return
        if type(self.trainer.strategy) in (SingleDeviceStrategy, DDPStrategy):  # not DeepSpeed's DDP subclass
            self._merged = self.tuner.merge_for_evaluation(self.model, self.backbone)

    def unmerge_after_evaluation(self) -> None:
        if getattr(self, "_merged", False):
            self.tuner.unmerge_after_evaluation(self.model)
            self._merged = False

    def log_results(self, stage: str) -> None:
        for name, value in self.evaluator.results(stage, self.derived_metrics).items():
            self.log(name, value, prog_bar=name in (f"{stage}/loss", f"{stage}/accuracy"), sync_dist=False)
