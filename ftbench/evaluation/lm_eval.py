"""Standard benchmarks through lm-evaluation-harness, on the trained model, in the same process.

``--evaluate.lm_eval_tasks [arc_easy, hellaswag] --evaluate.lm_eval_limit 200`` runs the tasks after
``fit`` (after its test) and after ``test`` on the objective's model as it is (adapter and all: lm-eval's
``HFLM`` takes a loaded model and tokenizer, so nothing is saved and reloaded). Results go into the record:
``train_info.lm_eval`` (every number lm-eval reports, per task and group, with the sample counts) and
``train_info.final["lm_eval/<task>/<metric>"]`` for each task asked for (``acc``, ``acc_norm``,
``exact_match,strict-match``, ...), which the report shows.

The task list is resolved with lm-eval's ``TaskManager`` when the run starts, before any model is loaded:
an unknown name, or a task whose data set cannot be loaded (offline, a hub data set that is not in the
cache), is a one-line error then, not after training. Local task YAMLs: ``--evaluate.lm_eval_include_path DIR``.

``lm_eval`` is an optional extra: ``pip install 'ftbench[eval]'``.
"""

from __future__ import annotations

import difflib
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from ftbench.errors import ConfigError

INSTALL_HINT = "pip install 'ftbench[eval]' (or: pip install lm-eval)"


@dataclass
class LmEvalPlan:
    """Tasks resolved at start-up: the names asked for, lm-eval's TaskManager and the loaded task
    objects (each name's task, group, or list of tasks for a tag), reused for the evaluation."""

    names: list[str]
    task_manager: Any
    loaded: dict[str, Any] = field(default_factory=dict)
    limit: Optional[float] = None
    num_fewshot: Optional[int] = None
    batch_size: int = 8
    apply_chat_template: bool = False
    output_types: dict[str, str] = field(default_factory=dict)


def _import_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.tasks import TaskManager  # noqa: F401
    except ImportError as err:
        e = ConfigError(f"--evaluate.lm_eval_tasks: lm-evaluation-harness is not installed ({err})")
        e.hint = INSTALL_HINT
        raise e from None
    import lm_eval

    return lm_eval


def plan(tasks: list[str], include_path: Optional[str] = None, limit: Optional[float] = None,
         num_fewshot: Optional[int] = None, batch_size: int = 8, apply_chat_template: bool = False) -> LmEvalPlan:
    """Resolve ``tasks`` with lm-eval's TaskManager and load each (its data set included): an unknown
    name or a data set that cannot be loaded is a :class:`ConfigError` naming the task."""
    import logging
    import os

    _import_lm_eval()
    from lm_eval.tasks import TaskManager

    if include_path is not None and not os.path.isdir(include_path):
        raise ConfigError(f"--evaluate.lm_eval_include_path {include_path}: not a folder")
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    tm = None
    if include_path is not None:  # indexing lm-eval's own ~10k task files takes ~15 s: only when needed
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in set(local.all_tasks) for t in tasks):
            tm = local
    if tm is None:
        tm = TaskManager(include_path=include_path)
    known = set(tm.all_tasks)
    unknown = [t for t in tasks if t not in known and not (t.endswith((".yaml", ".yml")) and os.path.isfile(t))]
    if unknown:
        parts = []
        for t in unknown:
            close = difflib.get_close_matches(t, tm.all_tasks, n=3)
            parts.append(f"{t!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        err = ConfigError(f"--evaluate.lm_eval_tasks: unknown lm-eval task(s) {', '.join(parts)}")
        err.hint = "`lm-eval ls tasks` lists them; a local task: --evaluate.lm_eval_include_path DIR"
        raise err
    p = LmEvalPlan(list(tasks), tm, limit=limit, num_fewshot=num_fewshot, batch_size=batch_size,
                   apply_chat_template=apply_chat_template)
    for name in tasks:
        try:
            loaded = tm.load([name])
        except Exception as exc:  # datasets' own errors: offline, missing file, missing config
            err = ConfigError(f"--evaluate.lm_eval_tasks: task {name!r} cannot be loaded: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}"[:600])
            err.hint = ("its data set must be reachable or in the datasets cache (HF_DATASETS_OFFLINE=1 reads only the "
                        "cache)")
            raise err from None
        groups, leaves = loaded.get("groups") or {}, loaded["tasks"]
        p.loaded[name] = groups.get(name) or leaves.get(name) or list(leaves.values())
        for tname, task in leaves.items():
            p.output_types[tname] = str(task.get_config("output_type"))
    return p


def _lm_class():
    from lm_eval.models.huggingface import HFLM

    class ObjectiveLM(HFLM):
        """lm-eval's HFLM on an objective's model: logits through the objective's forward (the tuner
        aligns them, e.g. prompt tuning's virtual tokens), generation through the tuner where it has
        its own (prompt learning)."""

        def __init__(self, objective, batch_size: int = 8):
            super().__init__(pretrained=objective.model, tokenizer=objective.backbone.tokenizer, batch_size=batch_size)
            self._objective = objective

        def _model_call(self, inps, attn_mask=None, labels=None):
            import torch

            with torch.no_grad():
                return self._objective(inps)

        def _model_generate(self, context, max_length, stop, **generation_kwargs):
            import torch

            tuner = self._objective.tuner
            if not getattr(tuner, "is_prompt_learning", False):
                return super()._model_generate(context, max_length, stop, **generation_kwargs)
            mask = generation_kwargs.get("attention_mask")
            if mask is None:
                mask = torch.ones_like(context)
            new = tuner.generate(self._objective.model, self.tokenizer, context, mask, max(1, max_length - context.shape[1]))
            return torch.cat([context, new.to(context.device)], dim=1)

    return ObjectiveLM


def metric_key(key: str) -> Optional[str]:
    """lm-eval's result key as a record name: ``acc,none`` -> ``acc``, ``exact_match,strict-match`` kept;
    None for what is not a headline number (stderr, alias, sample counts)."""
    if not isinstance(key, str) or key in ("alias", "name", "sample_len", "samples") or "_stderr" in key:
        return None
    metric, _, filt = key.partition(",")
    return metric if filt in ("", "none") else key


def _numbers(d: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in d.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
    return out


def run(objective, p: LmEvalPlan) -> tuple[dict[str, Any], dict[str, float]]:
    """Run the planned tasks on ``objective.model``; returns (the record's ``lm_eval`` section, the
    ``lm_eval/<task>/<metric>`` numbers for ``final``). The model's train/eval mode is restored."""
    import logging

    import torch

    lm_eval = _import_lm_eval()
    from lm_eval import simple_evaluate

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    model = objective.model
    was_training = model.training
    t0 = time.perf_counter()
    try:
        lm = _lm_class()(objective, batch_size=p.batch_size)
        objects: list = []
        for name in p.names:
            obj = p.loaded[name]
            objects += obj if isinstance(obj, list) else [obj]
        with torch.no_grad():
            results = simple_evaluate(model=lm, tasks=objects, limit=p.limit, num_fewshot=p.num_fewshot,
                                      task_manager=p.task_manager, log_samples=False,
                                      apply_chat_template=p.apply_chat_template)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - t0
    results = results or {}
    per_task = {t: _numbers(v) for t, v in (results.get("results") or {}).items()}
    for g, v in (results.get("groups") or {}).items():
        per_task.setdefault(g, {}).update(_numbers(v))
    final: dict[str, float] = {}
    for name in p.names:
        for key, value in per_task.get(name, {}).items():
            m = metric_key(key)
            if m is not None:
                final[f"lm_eval/{name}/{m}"] = value
    summary = {
        "tasks": p.names,
        "limit": p.limit,
        "num_fewshot": p.num_fewshot,
        "apply_chat_template": p.apply_chat_template,
        "results": per_task,
        "n_samples": results.get("n-samples"),
        "versions": results.get("versions"),
        "seconds": seconds,
        "lm_eval_version": getattr(lm_eval, "__version__", None),
    }
    return summary, final
