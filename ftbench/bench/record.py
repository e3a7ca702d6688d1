"""One run, one record: a JSON file with ``run_info``, ``train_info`` and ``meta_info``.

The layout follows PEFT's method-comparison suite. The file is rewritten atomically (temporary file
+ ``os.replace``) at every change of state, so a reader (or a sweep resuming after ``kill -9``)
sees either the previous complete record or the new one, never half a file.

Evaluation adds ``train_info.predictions`` (``{"path": "{run_id}.predictions.jsonl", "rows": {stage: n}}``:
the file next to the record with every evaluated row, :mod:`ftbench.evaluation.predictions`) and, with
``--evaluate.lm_eval_tasks``, ``train_info.lm_eval`` and ``lm_eval/<task>/<metric>`` in ``final``.
"""

from __future__ import annotations

import enum
import json
import math
import os
import platform
import re
import subprocess
import tempfile
import time
import traceback
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch

from ftbench.bench.measure import PeakMemory, Throughput
from ftbench.fileio import portable_path, write_text_atomic

SCHEMA_VERSION = 1
PACKAGES = ("ftbench", "torch", "lightning", "transformers", "peft", "bitsandbytes", "datasets",
            "torchmetrics", "jsonargparse", "wandb")
_SECRET = re.compile(r"(api[_-]?key|token|secret|password|passwd|credential)", re.I)
REDACTED = "<redacted>"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def redact(obj: Any) -> Any:
    """Copy of ``obj`` with the values of secret-looking keys replaced (API keys never reach a record)."""
    if isinstance(obj, dict):
        return {k: (REDACTED if isinstance(k, str) and _SECRET.search(k) and obj[k] not in (None, "") and not isinstance(obj[k], (bool, int)) else redact(v))
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    return obj


def portable(obj: Any) -> Any:
    """Copy of a config without jsonargparse's ``__path__`` entries (where a file was read from: an
    absolute path of this machine has no place in a record)."""
    if isinstance(obj, dict):
        return {k: portable(v) for k, v in obj.items() if k != "__path__"}
    if isinstance(obj, (list, tuple)):
        return [portable(v) for v in obj]
    return obj


def portable_paths(obj: Any) -> Any:
    """:func:`portable` with every absolute path among the values made :func:`portable_path` (relative
    to the working directory, ``~/...``): what Lightning's ``config.yaml`` dump keeps."""
    if isinstance(obj, dict):
        return {k: portable_paths(v) for k, v in obj.items() if k != "__path__"}
    if isinstance(obj, (list, tuple)):
        return [portable_paths(v) for v in obj]
    if isinstance(obj, Path) or type(obj).__name__.startswith("Path_"):
        obj = str(obj)
    return portable_path(obj) if isinstance(obj, str) and os.path.isabs(obj) else obj


def jsonable(obj: Any) -> Any:
    if isinstance(obj, enum.Enum):  # peft keeps some options as enums (prompt_tuning_init: RANDOM)
        return jsonable(obj.value)
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return jsonable(obj.item())
    if isinstance(obj, Path) or type(obj).__name__.startswith("Path_"):  # jsonargparse's Path_fr etc.
        return str(obj)
    return repr(obj)


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(jsonable(data), indent=2))


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.+)", f.read())
        if m:
            return m.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def meta_info(results_dir: Optional[Path] = None) -> dict[str, Any]:
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    commit = _git("rev-parse", "HEAD")
    # dirty: tracked files changed, other than the results folder itself (a sweep rewriting committed
    # records there is the run's own output, not a change to what computes it)
    top = _git("rev-parse", "--show-toplevel")
    exclude = []
    if top and results_dir is not None and Path(results_dir).resolve().is_relative_to(top):
        exclude = [f":(top,exclude){Path(results_dir).resolve().relative_to(top).as_posix() or '.'}"]
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ":/", *exclude)
    return {
        "versions": versions,
        "python": platform.python_version(),
        "git": {"commit": commit, "dirty": bool(status) if status is not None else None},
        "hardware": {
            "cpu": _cpu_name(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        },
        "platform": platform.platform(),
    }


def classify_error(err: BaseException) -> str:
    """Status for a run that raised: ``oom``, ``nan``, ``interrupted`` (Ctrl-C/SIGTERM; a sweep reruns it) or ``failed``."""
    from ftbench.objectives.step import NonFiniteLossError

    if isinstance(err, NonFiniteLossError):
        return "nan"
    if isinstance(err, KeyboardInterrupt) or type(err).__name__ == "SIGTERMException":
        return "interrupted"
    if isinstance(err, torch.cuda.OutOfMemoryError) or isinstance(err, MemoryError) or "out of memory" in str(err).lower():
        return "oom"
    return "failed"


#: a final training loss this far (nats) above the first one is a diverged run
DIVERGENCE_MARGIN = 1.0


def diverged(initial: Optional[float], final: Optional[float], uniform: Optional[float] = None) -> Optional[bool]:
    """Whether a run diverged: its final training loss at least :data:`DIVERGENCE_MARGIN` above its
    first (a run made worse by training), or, for a token cross-entropy that started clearly below the
    uniform-output loss ``uniform`` = ln(vocabulary size), ended within half a nat of it or above (the
    model forgot everything: lr 1e10 leaves the loss at ln(V) = 10.803 for a 49,152-token vocabulary).
    None without both losses."""
    if initial is None or final is None or not math.isfinite(initial):
        return None
    if not math.isfinite(final) or final >= initial + DIVERGENCE_MARGIN:
        return True
    return bool(uniform is not None and initial < uniform - DIVERGENCE_MARGIN and final >= uniform - 0.5)


def attempt_path(path: Path) -> Path:
    """Where a run that replaces a completed record (``--overwrite true``) writes until it completes:
    ``{run_id}.json.attempt`` (not ``*.json``: no report or sweep reads it as a record)."""
    return path.with_name(path.name + ".attempt")


def _completed(path: Path) -> bool:
    try:
        return json.loads(path.read_text())["train_info"]["status"] == "completed"
    except (OSError, ValueError, KeyError, TypeError):
        return False


class RunRecorder(L.Callback):
    """Writes the run's record: at start (``running``), after each validation, at the end
    (``completed``) and on an exception (``failed``/``oom``/``nan`` with the error and the last metrics).

    A run that replaces a completed record (``--overwrite true``) writes beside it
    (:func:`attempt_path`, its predictions likewise) and renames over it only when it completes: a
    Ctrl-C or a crash leaves the old completed record (and its predictions) as they were."""

    def __init__(self, path: str | Path, run_info: dict[str, Any], save_weights_to: Optional[str | Path] = None,
                 method: Optional[str] = None):
        from ftbench.data import fingerprint

        fingerprint.reset()  # this run's data sources: what its data module reads from now on
        self.final_path = Path(path)
        self.path = attempt_path(self.final_path) if _completed(self.final_path) else self.final_path
        self.save_weights_to = Path(save_weights_to) if save_weights_to else None
        self.record: dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            "run_info": {**redact(run_info), "created": now()},
            # the method label the CLI read from the config (ftbench.config_reading.identity), as the sweep and the run id say it
            "train_info": {"status": "running", "metrics": [], "final": {}, **({"method": method} if method else {})},
            "meta_info": meta_info(self.path.parent),
        }
        self.initial_phase = False  # set by the CLI around a validation before fit
        self._predictions: dict[str, list[dict[str, Any]]] = {}
        self._t_fit: Optional[float] = None
        self._t_test: Optional[float] = None
        self._first_train_loss: Optional[float] = None

    # -- helpers
    @property
    def train_info(self) -> dict[str, Any]:
        return self.record["train_info"]

    def write(self) -> None:
        self.record["run_info"]["updated"] = now()
        write_json_atomic(self.path, self.record)

    @staticmethod
    def _callback(trainer: L.Trainer, kind: type):
        return next((c for c in trainer.callbacks if isinstance(c, kind)), None)

    @staticmethod
    def _metrics(trainer: L.Trainer, prefix: str) -> dict[str, float]:
        return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefix)}

    def _describe(self, trainer: L.Trainer, pl_module) -> None:
        info = self.train_info
        # objective+tuner[+quantization] (ftbench.naming): LoRA on an nf4 backbone is QLoRA, its own row
        info.setdefault("method", getattr(pl_module, "method_label", type(pl_module).__name__.lower()))
        info["objective"] = getattr(pl_module, "name", None)
        tuner = getattr(pl_module, "tuner", None)
        if tuner is not None:
            info["tuner"] = tuner.describe()
        if getattr(pl_module, "model", None) is not None and hasattr(pl_module, "parameter_counts"):
            counts = pl_module.parameter_counts()
            info["params"] = {**counts, "trainable_pct": 100.0 * counts["trainable"] / max(1, counts["total"])}
        backbone = getattr(pl_module, "backbone", None)
        if backbone is not None:
            info["backbone"] = backbone.describe()
            for key in ("resolved", "init_from"):
                if isinstance(info["backbone"].get(key), str):
                    info["backbone"][key] = portable_path(info["backbone"][key])
            if hasattr(backbone, "memory_footprint"):
                info["backbone"].update(backbone.memory_footprint(pl_module.model))
        dm = trainer.datamodule
        if dm is not None and hasattr(dm, "describe"):
            info["data"] = dm.describe()
        from ftbench.data import fingerprint

        # what each data file was (size and hash): two seeds of one point trained on different files
        # are not one point (the report refuses to group them; a resumed sweep warns)
        if fingerprint.seen():
            info["data_fingerprints"] = fingerprint.seen()
        info["device"] = str(pl_module.device)
        info["precision"] = str(trainer.precision)
        from ftbench.levers import precision_kernels

        info["kernels"] = precision_kernels(pl_module.device)  # what the device offers that precision
        info["world_size"] = trainer.world_size

    # -- fit
    def on_fit_start(self, trainer, pl_module):
        self._t_fit = time.perf_counter()
        self.train_info["started"] = now()
        self._describe(trainer, pl_module)
        if trainer.is_global_zero:
            self.write()

    def save_predictions(self, trainer, pl_module, stage: str) -> None:
        """Write ``{out}/{run_id}.predictions.jsonl`` (the latest rows of each stage, atomically) and point
        the record at it (``train_info.predictions``). Every rank calls it (the rows are gathered)."""
        evaluator = getattr(pl_module, "evaluator", None)
        if evaluator is None or not evaluator.options.predictions:  # --evaluate.predictions false
            return
        rows = evaluator.prediction_rows(stage)
        if not rows or not trainer.is_global_zero:
            return
        from ftbench.evaluation.predictions import predictions_path, write_predictions

        self._predictions[stage] = rows
        counts = write_predictions(self._predictions_file(), self._predictions)
        self.train_info["predictions"] = {"path": predictions_path(self.final_path).name, "rows": counts}

    def _predictions_file(self) -> Path:
        from ftbench.evaluation.predictions import predictions_path

        final = predictions_path(self.final_path)
        return final if self.path == self.final_path else attempt_path(final)

    def record_lm_eval(self, summary: dict[str, Any], final: dict[str, float]) -> None:
        """lm-evaluation-harness results: the summary under ``train_info.lm_eval`` and the headline
        numbers (``lm_eval/<task>/<metric>``) in ``train_info.final``."""
        self.train_info["lm_eval"] = summary
        self.train_info["final"].update(final)

    def mark_failed(self, err: BaseException) -> None:
        """A step after training (lm-eval) raised: the record says so, as :meth:`on_exception` does."""
        info = self.train_info
        info["status"] = classify_error(err)
        info["ended"] = now()
        info["error"] = {"type": type(err).__name__, "message": str(err)[:2000],
                         "traceback": traceback.format_exc()[-4000:]}
        self.write()

    def on_validation_end(self, trainer, pl_module):
        # after the module's on_validation_epoch_end has logged (callbacks' epoch-end hooks run first)
        if not trainer.sanity_checking:
            self.save_predictions(trainer, pl_module, "val")
        if trainer.state.fn == "validate":
            target = "initial" if self.initial_phase else "final"
            self.train_info.setdefault(target, {}).update(self._metrics(trainer, "val/"))
            return
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        entry = {"step": trainer.global_step, "epoch": trainer.current_epoch,
                 **self._metrics(trainer, "val/"), **self._metrics(trainer, "train/")}
        self.train_info["metrics"].append(entry)
        if trainer.is_global_zero:
            self.write()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._first_train_loss is None and "train/loss" in trainer.callback_metrics:
            self._first_train_loss = float(trainer.callback_metrics["train/loss"])

    def _divergence(self, pl_module) -> None:
        """``train_info.diverged`` (:func:`diverged`) from the first and the final training loss; SFT's
        loss is a token cross-entropy, whose uniform-output value is ln(vocabulary size)."""
        final = self.train_info["final"].get("train/loss")
        vocab = getattr(getattr(getattr(pl_module, "model", None), "config", None), "vocab_size", None)
        uniform = math.log(vocab) if getattr(pl_module, "name", None) == "sft" and isinstance(vocab, int) and vocab > 1 else None
        flag = diverged(self._first_train_loss, final, uniform)
        if flag is not None:
            self.train_info["diverged"] = flag

    def on_fit_end(self, trainer, pl_module):
        info = self.train_info
        info["fit_seconds"] = time.perf_counter() - (self._t_fit or time.perf_counter())
        info["global_steps"] = trainer.global_step
        mem = self._callback(trainer, PeakMemory)
        if mem is not None and "train" in mem.results:
            info["memory"] = mem.results["train"]
        tp = self._callback(trainer, Throughput)
        if tp is not None:
            info["throughput"] = tp.summary()
        from ftbench.bench.memory import MemoryBreakdown

        split = pl_module.step_time_split()  # online RL: the step time split into its phases
        if split is not None:
            info["step_time_split"] = split
        breakdown = self._callback(trainer, MemoryBreakdown)
        if breakdown is not None and breakdown.results:
            info["memory_breakdown"] = breakdown.results
        from ftbench.bench.syncs import HostSyncs

        syncs = self._callback(trainer, HostSyncs)  # added by a check (scripts/gpu_check.py), not by every run
        if syncs is not None and syncs.results:
            info["host_syncs"] = syncs.results
        info["final"].update(self._metrics(trainer, "val/"))
        if "train/loss" in trainer.callback_metrics:
            info["final"]["train/loss"] = float(trainer.callback_metrics["train/loss"])
        self._divergence(pl_module)
        if hasattr(pl_module, "save_trained"):
            with pl_module.gathered_weights():  # FSDP2: every rank takes part in gathering the shards
                if trainer.is_global_zero:
                    info["saved"] = self._save(pl_module)
                    self.write()

    def _save(self, pl_module) -> dict[str, Any]:
        """Save what the method trained and measure its size; kept only when asked for. Without
        ``--save_weights`` it is saved into a temporary folder of the system's (``$TMPDIR``), never
        ``--out``, and removed at once; a save that fails there (a full disk) leaves the size out of
        the record rather than failing a run that trained."""
        target = self.save_weights_to
        tmp = None
        if target is None:
            try:
                tmp = tempfile.TemporaryDirectory(prefix="ftbench-size-")
                target = Path(tmp.name)
                pl_module.save_trained(target)
            except OSError as err:
                if tmp is not None:
                    tmp.cleanup()
                import sys

                print(f"ftbench: warning: the trained weights' size was not measured ({err.strerror or err})",
                      file=sys.stderr)
                return {"bytes": None, "files": None, "path": None, "error": str(err)[:300]}
        try:
            if tmp is None:
                pl_module.save_trained(target)
            files = [p for p in target.rglob("*") if p.is_file()]
            weights = [p for p in files if p.suffix in (".safetensors", ".bin", ".pt")]
            return {"bytes": sum(p.stat().st_size for p in weights), "files": len(files),
                    "path": str(self.save_weights_to) if self.save_weights_to else None}
        finally:
            if tmp is not None:
                tmp.cleanup()

    # -- test / validate
    def on_test_start(self, trainer, pl_module):
        self._t_test = time.perf_counter()
        if "params" not in self.train_info:
            self._describe(trainer, pl_module)

    def on_test_end(self, trainer, pl_module):
        self.save_predictions(trainer, pl_module, "test")
        info = self.train_info
        info["test_seconds"] = time.perf_counter() - (self._t_test or time.perf_counter())
        info["final"].update(self._metrics(trainer, "test/"))
        mem = self._callback(trainer, PeakMemory)
        if mem is not None and "test" in mem.results:
            info["test_memory"] = mem.results["test"]
        if trainer.is_global_zero:
            self.write()

    def on_validation_start(self, trainer, pl_module):
        if trainer.state.fn == "validate" and "params" not in self.train_info:
            self._describe(trainer, pl_module)

    # -- end states
    def finish(self, trainer: Optional[L.Trainer] = None, status: str = "completed") -> None:
        """The run ended: ``completed``, or ``pruned`` (a search's pruner stopped it; its curve kept)."""
        self.train_info["status"] = status
        self.train_info["ended"] = now()
        if trainer is None or trainer.is_global_zero:
            self.write()
            if self.path != self.final_path and status == "completed":  # the new run completed: now it replaces the old one
                from ftbench.evaluation.predictions import predictions_path

                if self._predictions_file().exists():
                    os.replace(self._predictions_file(), predictions_path(self.final_path))
                os.replace(self.path, self.final_path)
                self.path = self.final_path

    def on_exception(self, trainer, pl_module, exception):
        info = self.train_info
        info["status"] = classify_error(exception)
        info["ended"] = now()
        info["error"] = {"type": type(exception).__name__, "message": str(exception)[:2000],
                         "traceback": traceback.format_exc()[-4000:]}
        info["last_metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        info["global_steps"] = trainer.global_step
        if trainer.is_global_zero:
            self.write()
