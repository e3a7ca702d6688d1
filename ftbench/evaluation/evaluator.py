"""The run's evaluation: one :class:`Evaluator`, built once per run from the evaluation options and the
data module's metric specs, handed to the objective by the CLI (as the tuner is).

An objective evaluates a batch by computing what is its own (SFT's per-row losses, DPO's implicit
rewards, a reward model's pairwise accuracy, GRPO's reward on its greedy answers) and handing those
values to :meth:`Evaluator.update`; the evaluator adds the data set's answer metrics (generating
through the tuner only when a metric needs a generation, scoring options only when one needs them,
or taking the objective's own greedy texts), aggregates everything overall, per task and as macro
averages (:mod:`ftbench.evaluation.aggregate`), and keeps each row for the predictions file.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Optional

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ftbench.errors import ConfigError
from ftbench.evaluation.aggregate import Reduction, StageMetrics
from ftbench.evaluation.answer_forward import AnswerForward, answer_forward, cache_argument
from ftbench.evaluation.metrics import default_metrics
from ftbench.evaluation.options import EvaluationOptions

#: greedy-generation budget when neither the options nor the data module say one
DEFAULT_BUDGET = 32


class StopOnSigterm(StoppingCriteria):
    """Stops ``generate`` between two tokens once the trainer has received SIGTERM (Lightning's signal
    handler sets ``trainer.received_sigterm`` and waits for the loop to look; a long generation would
    otherwise run to its budget). SIGINT needs none: Python raises KeyboardInterrupt between tokens."""

    def __init__(self, trainer):
        self.trainer = trainer

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), bool(getattr(self.trainer, "received_sigterm", False)), dtype=torch.bool,
                          device=input_ids.device)


class Evaluator:
    """Generation, multiple-choice scoring, answer and corpus metrics, per-task and macro aggregation,
    and the prediction rows of one run's evaluations."""

    def __init__(self, options: Optional[EvaluationOptions] = None, data: Any = None):
        """
        Args:
            options: The run's ``--evaluate.*`` options (default: all defaults).
            data: The run's data module: it names each task's metrics (``metrics_for``) and the longest
                reference answer (``max_answer_tokens``), both read when evaluation runs (it sets them up
                in its ``setup``). None: exact match, and a budget of ``DEFAULT_BUDGET`` tokens.
        """
        self.options = options or EvaluationOptions()
        self.data = data
        self.metrics = StageMetrics()
        self.objective: Any = None
        self._predictions: dict[str, list[dict[str, Any]]] = defaultdict(list)  # stage -> evaluated rows

    def attach(self, objective: Any) -> None:
        """The objective whose model is evaluated: its tuner generates, its forward scores options, its
        tokenizer decodes."""
        self.objective = objective

    # ------------------------------------------------------------------ what is evaluated
    def generates(self, stage: str) -> bool:
        """Whether this stage generates answers: test always, validation unless switched off; never for
        a model with a score head (a reward model scores, it writes no text)."""
        if getattr(self.objective, "head", "causal_lm") != "causal_lm":
            return False
        return stage == "test" or self.options.generate_in_validation

    def metrics_for(self, task: Optional[str]) -> list:
        """The answer metrics of ``task``'s rows: what the data module names (``data.metrics``, per task
        in a mixture), else ``[exact_match]`` (:mod:`ftbench.evaluation.metrics`)."""
        if self.data is not None and hasattr(self.data, "metrics_for"):
            return self.data.metrics_for(task)
        return default_metrics()

    def exact_match(self, task: Optional[str]):
        """``task``'s ``exact_match`` metric (with the data's options), else the default one (white space
        folded): the comparison GRPO's ``ExactAnswer`` reward makes, the held-out metric's."""
        suite = self.metrics_for(task)
        return next((m for m in suite if m.kind == "exact_match"), None) or default_metrics()[0]

    def generation_budget(self, prompt_width: int = 0) -> int:
        """``evaluate.max_new_tokens`` when given, else what the data module says its longest reference
        answer needs, else ``DEFAULT_BUDGET``. A budget that would run past the model's context after a
        ``prompt_width``-token prompt is an error (generation past it is not defined, and an unbounded
        one would not end)."""
        given = self.options.max_new_tokens
        budget = given if given is not None else int(getattr(self.data, "max_answer_tokens", None) or DEFAULT_BUDGET)
        model = getattr(self.objective, "model", None)
        context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if isinstance(context, int) and prompt_width + budget > context:
            where = "evaluate.max_new_tokens" if given is not None else "the data's longest reference answer"
            raise ConfigError(f"{where}: {budget} new tokens after a {prompt_width}-token prompt run past the "
                              f"model's context of {context} tokens")
        return budget

    # ------------------------------------------------------------------ generation and options
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: Optional[int] = None,
                 **sampling: Any) -> list[str]:
        """Continuations of left-padded prompts through the tuner, decoded without special tokens (greedy
        by default; budget: :meth:`generation_budget`; ``cache`` (``past_key_values`` before transformers
        5.2x): a KV cache of the prompts
        less their last token, from :meth:`answer_forward`)."""
        obj = self.objective
        tok = obj.backbone.tokenizer
        budget = max_new_tokens if max_new_tokens is not None else self.generation_budget(input_ids.shape[1])
        sampling.setdefault("do_sample", False)
        trainer = getattr(obj, "_trainer", None)
        if trainer is not None:  # SIGTERM (Lightning sets the flag) ends generation at the next token
            sampling.setdefault("stopping_criteria", StoppingCriteriaList([StopOnSigterm(trainer)]))
        new = obj.tuner.generate(obj.model, tok, input_ids, attention_mask, budget, **sampling)
        if getattr(trainer, "received_sigterm", False):
            # the answers are cut short: the run ends here, recorded `interrupted` (a sweep reruns it)
            from lightning.pytorch.utilities.exceptions import SIGTERMException

            raise SIGTERMException
        return tok.batch_decode(new, skip_special_tokens=True)

    def predict_answers(self, batch: dict[str, Any], prompt_cache: Any = None) -> list[str]:
        """The greedy answers to the batch's generation prompts (``gen_input_ids``), continuing from
        ``prompt_cache`` when given (:meth:`answer_forward`)."""
        if prompt_cache is None:
            return self.generate(batch["gen_input_ids"], batch["gen_attention_mask"])
        return self.generate(batch["gen_input_ids"], batch["gen_attention_mask"], **{cache_argument(): prompt_cache})

    def answer_forward(self, batch: dict[str, Any], stage: str) -> Optional[AnswerForward]:
        """The logits of the batch's answer tokens from one forward whose KV cache the answer metrics'
        generation then continues (:mod:`ftbench.evaluation.answer_forward`), or None where that is not
        exact (the caller computes its loss on the whole batch, and generation encodes the prompts).
        The cache is kept only when this stage generates every row of the batch."""
        obj = self.objective
        if obj is None or obj.model is None or not obj.tuner.reuses_prompt_cache:
            return None
        generates = "gen_input_ids" in batch and self.generates(stage)
        keep_cache = generates and len(self.generation_rows(batch)) == len(batch["answers"])
        return answer_forward(obj.model, batch, keep_cache)

    def choice_scores(self, batch: dict[str, Any]) -> list[Optional[list[float]]]:
        """Per row, the summed log-probability of each option (``choice_ids``) after the row's generation
        prompt; None for a row without options (:mod:`ftbench.evaluation.choices`)."""
        from ftbench.evaluation.choices import score_choices

        obj = self.objective
        ids, mask = batch["gen_input_ids"], batch["gen_attention_mask"]
        prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
        return score_choices(lambda i, a: obj(i, a), prompts, batch["choice_ids"],
                             obj.backbone.tokenizer.pad_token_id, ids.device)

    # ------------------------------------------------------------------ one batch
    def update(self, batch: dict[str, Any], stage: str, values: Optional[dict[str, torch.Tensor]] = None,
               weights: Optional[dict[str, torch.Tensor]] = None,
               reductions: Optional[dict[str, Reduction]] = None,
               predictions: Optional[list[str]] = None, prompt_cache: Any = None) -> None:
        """One evaluation batch: the objective's per-row ``values`` (``weights``: per-row weights of a
        weighted mean; ``reductions``: values reduced by min/max) and, when the batch has generation
        prompts and the stage generates, the data set's answer metrics (``predictions``: the greedy
        answer of every row, when the objective generated them already; ``prompt_cache``: the prompts'
        KV cache from :meth:`answer_forward`, which generation continues)."""
        values = dict(values or {})
        if "gen_input_ids" in batch and self.generates(stage):
            values.update(self.answer_metrics(batch, stage, predictions, prompt_cache))
        if values:
            self.metrics.device = self.objective.device if self.objective is not None else "cpu"
            self.metrics.update(stage, batch.get("tasks"), values, weights, reductions)

    def task_rows(self, batch: dict[str, Any]) -> dict[Optional[str], list[int]]:
        """The batch's row indices by task (None: rows without one)."""
        groups: dict[Optional[str], list[int]] = defaultdict(list)
        for i, t in enumerate(batch.get("tasks") or [None] * len(batch["answers"])):
            groups[t].append(i)
        return groups

    def generation_rows(self, batch: dict[str, Any]) -> list[int]:
        """The rows whose task has a metric that needs a generated answer."""
        return sorted(i for t, idx in self.task_rows(batch).items()
                      if any(m.needs_generation for m in self.metrics_for(t)) for i in idx)

    def answer_metrics(self, batch: dict[str, Any], stage: str,
                       predictions: Optional[list[str]] = None, prompt_cache: Any = None) -> dict[str, torch.Tensor]:
        """Each row's answer metrics (the metrics of its task): a tensor per metric name, NaN for rows
        whose task does not have it. Generates only the rows whose metrics need a generation (unless
        ``predictions`` are given), scores options only when a metric needs them; corpus metrics (BLEU,
        chrF) are fed here and not returned; every row goes to the predictions file."""
        answers = list(batch["answers"])
        n = len(answers)
        groups = self.task_rows(batch)
        suites = {t: self.metrics_for(t) for t in groups}
        gen_rows = self.generation_rows(batch)
        preds: list[Optional[str]] = [None] * n
        if predictions is not None:
            for i in gen_rows:
                preds[i] = predictions[i]
        elif len(gen_rows) == n:
            preds = list(self.predict_answers(batch, prompt_cache))
        elif gen_rows:
            sel = torch.tensor(gen_rows, device=batch["gen_input_ids"].device)
            for i, text in zip(gen_rows, self.generate(batch["gen_input_ids"][sel], batch["gen_attention_mask"][sel])):
                preds[i] = text
        scores: list[Optional[list[float]]] = [None] * n
        if batch.get("choice_ids") is not None and any(m.needs_choices for s in suites.values() for m in s):
            scores = self.choice_scores(batch)
        rows = [self.prediction_row(batch, i, stage, preds[i]) for i in range(n)]
        values: dict[str, list[float]] = {}
        for t, idx in groups.items():
            for m in suites[t]:
                col = [math.nan] * n
                if m.needs_choices:
                    for i in idx:
                        if scores[i] is None:
                            continue
                        picked = m.pick(scores[i], batch["choices"][i])
                        col[i] = float(picked == batch["gold"][i])
                        rows[i].setdefault("picked", {})[m.name] = picked
                        if rows[i]["prediction"] is None:
                            rows[i]["prediction"] = batch["choices"][i][picked]
                else:
                    p, r = [preds[i] for i in idx], [answers[i] for i in idx]
                    for i, v in zip(idx, m.row_values(p, r)):
                        col[i] = v
                    if m.corpus:
                        self.metrics.device = self.objective.device if self.objective is not None else "cpu"
                        self.metrics.update_corpus(stage, t, m, p, r)
                for i in idx:
                    if not math.isnan(col[i]):
                        rows[i]["metrics"][m.name] = col[i]
                if not m.corpus:
                    prev = values.get(m.name)
                    values[m.name] = col if prev is None else [a if math.isnan(b) else b for a, b in zip(prev, col)]
        self._predictions[stage].extend(rows)
        device = self.objective.device if self.objective is not None else "cpu"
        return {name: torch.tensor(col, dtype=torch.float32, device=device) for name, col in values.items()}

    # ------------------------------------------------------------------ prediction rows
    def prediction_row(self, batch: dict[str, Any], i: int, stage: str, prediction: Optional[str]) -> dict[str, Any]:
        """Row ``i`` of the predictions file: stage, step, task, prompt, reference, prediction, metrics
        (and the options and gold index of a multiple-choice row)."""
        prompts = batch.get("prompts")
        if prompts is not None and prompts[i] is not None:
            prompt = prompts[i]
        else:
            ids, mask = batch["gen_input_ids"][i], batch["gen_attention_mask"][i]
            prompt = self.objective.backbone.tokenizer.decode(ids[mask.bool()].tolist(), skip_special_tokens=False)
        tasks = batch.get("tasks")
        trainer = getattr(self.objective, "_trainer", None)
        row: dict[str, Any] = {"stage": stage, "step": int(self.objective.global_step) if trainer is not None else 0,
                               "task": tasks[i] if tasks else None, "prompt": prompt,
                               "reference": batch["answers"][i], "prediction": prediction, "metrics": {}}
        if batch.get("choices") is not None and batch["choices"][i] is not None:
            row["choices"], row["gold"] = batch["choices"][i], batch["gold"][i]
        return row

    def prediction_rows(self, stage: str) -> list[dict[str, Any]]:
        """The rows of this stage's latest evaluation, from every rank (a collective under DDP: every
        rank calls it)."""
        rows = list(self._predictions.get(stage, []))
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            gathered: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in (part or [])]
        return rows

    # ------------------------------------------------------------------ one evaluation
    def start(self, stage: str) -> None:
        """Before an evaluation loop: fresh metric states and prediction rows for ``stage``."""
        self.metrics.start(stage)
        self._predictions[stage] = []

    def results(self, stage: str, derive=None) -> dict[str, float]:
        """After the loop: every metric of ``stage`` (see :meth:`StageMetrics.results`)."""
        return self.metrics.results(stage, derive)
