"""The run's side of a search's pruner: each validation reported to the trial, the run stopped early
when the study's pruner says so (the record then says ``pruned``, its curve kept).

``ftbench sweep`` sets ``FTBENCH_SEARCH_TRIAL`` (:data:`ftbench.sweep.search.TRIAL_ENV`: the storage URL,
study name, trial id, metric and pruner) for a trial of a search with a pruner; the CLI then adds
:class:`PruneOnValidation`. It is optuna-integration's Lightning callback
(``optuna_integration.PyTorchLightningPruningCallback``, which imports ``lightning.pytorch``, as ftbench
does) with two changes for ftbench's runs, which validate every ``val_check_interval`` steps within
one epoch and record themselves:

* the value is reported at the global step, not the epoch (Optuna keeps one value per step: at
  ``step=epoch`` every validation of a one-epoch run but the first would be dropped);
* a prune stops training (``trainer.should_stop``) instead of raising ``optuna.TrialPruned`` out of
  ``fit``, which Lightning would turn into a failed run with a traceback; the CLI then records the
  run ``pruned`` and the sweep tells the study.

Under DDP the parent's path is kept (rank 0 reports, the decision is broadcast).
"""

from __future__ import annotations

import json

from optuna_integration import PyTorchLightningPruningCallback


class PruneOnValidation(PyTorchLightningPruningCallback):
    """Reports ``monitor`` after each validation at the global step; stops the run when pruned."""

    pruned = False

    @classmethod
    def from_env(cls, text: str) -> "PruneOnValidation":
        import optuna

        spec = json.loads(text)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.load_study(study_name=spec["study"], storage=spec["storage"], pruner=make_pruner(spec["pruner"]))
        return cls(optuna.trial.Trial(study, spec["trial_id"]), spec["metric"])

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.is_ddp_backend:
            super().on_validation_end(trainer, pl_module)
            self.pruned = bool(trainer.should_stop)  # the parent sets should_stop when any rank prunes
            return
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        self._trial.report(float(trainer.callback_metrics[self.monitor]), step=trainer.global_step)
        if self._trial.should_prune():
            self.pruned = True
            trainer.should_stop = True


def make_pruner(name: str):
    """Optuna's pruner of a search's ``pruner:`` (none, median, hyperband): the sweep's study and the run's
    callback make the same one."""
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner()
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()
