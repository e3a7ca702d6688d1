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

    def on_test_epoch_start(self) -> None:
        self.evaluator.start("test")

    def on_validation_epoch_end(self) -> None:
        self.log_results("val")

    def on_test_epoch_end(self) -> None:
        self.log_results("test")

    def log_results(self, stage: str) -> None:
        for name, value in self.evaluator.results(stage, self.derived_metrics).items():
            self.log(name, value, prog_bar=name in (f"{stage}/loss", f"{stage}/accuracy"), sync_dist=False)
