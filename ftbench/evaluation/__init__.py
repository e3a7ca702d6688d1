"""Evaluation that fits the task: answer metrics named by the data config (:mod:`.metrics`), multiple
choice by log-likelihood (:mod:`.choices`), the predictions file of every evaluation
(:mod:`.predictions`) and lm-evaluation-harness tasks on the trained model (:mod:`.lm_eval`)."""

from ftbench.evaluation.metrics import MetricSpec, build_metrics, default_metrics

__all__ = ["MetricSpec", "build_metrics", "default_metrics"]
