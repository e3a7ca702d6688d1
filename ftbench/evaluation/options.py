"""The evaluation options of a run: one object, the CLI's ``--evaluate.*`` group (as LitGPT's ``EvalArgs``).

Every objective evaluates through the run's :class:`~ftbench.evaluation.evaluator.Evaluator`, which
reads these; an objective has no evaluation options of its own.
"""

from __future__ import annotations

from typing import Optional, Union

from ftbench.errors import ConfigError


class EvaluationOptions:
    """How a run is evaluated besides what its objective computes: the generation budget, when answers
    are generated, the predictions file and lm-evaluation-harness tasks."""

    def __init__(
        self,
        max_new_tokens: Optional[int] = None,
        generate_in_validation: bool = True,
        predictions: bool = True,
        lm_eval_tasks: Optional[list[str]] = None,
        lm_eval_limit: Optional[Union[int, float]] = None,
        lm_eval_include_path: Optional[str] = None,
        lm_eval_num_fewshot: Optional[int] = None,
        lm_eval_batch_size: int = 8,
        lm_eval_apply_chat_template: bool = False,
    ):
        """
        Args:
            max_new_tokens: Greedy-generation budget of the answer metrics (and of GRPO's evaluation
                reward). Default: what the data module says its longest reference answer needs
                (``max_answer_tokens``), else 32. At most the model's context less the prompt.
            generate_in_validation: Also generate answers (the data set's answer metrics: exact match,
                ...) during validation, not only in test.
            predictions: Write ``{out}/{run_id}.predictions.jsonl`` with every evaluated row.
            lm_eval_tasks: lm-evaluation-harness tasks, groups or tags to run on the trained model after
                fit and after test (e.g. ``[arc_easy, hellaswag]``, ``[mmlu]``); resolved at start-up.
            lm_eval_limit: At most this many documents per task (a fraction when below 1); all when null.
            lm_eval_include_path: A folder of local task YAMLs (lm-eval's ``include_path``).
            lm_eval_num_fewshot: Few-shot examples per prompt (default: each task's own).
            lm_eval_batch_size: Batch size of lm-eval's requests.
            lm_eval_apply_chat_template: Render lm-eval's prompts with the tokenizer's chat template.
        """
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ConfigError(f"evaluate.max_new_tokens: must be at least 1 (or null: the data's longest answer), "
                              f"got {max_new_tokens}")
        if lm_eval_limit is not None and not lm_eval_limit > 0:
            raise ConfigError(f"evaluate.lm_eval_limit: must be > 0 (a count, or a fraction below 1), got {lm_eval_limit}")
        if lm_eval_batch_size < 1:
            raise ConfigError(f"evaluate.lm_eval_batch_size: must be at least 1, got {lm_eval_batch_size}")
        if lm_eval_num_fewshot is not None and lm_eval_num_fewshot < 0:
            raise ConfigError(f"evaluate.lm_eval_num_fewshot: must be >= 0, got {lm_eval_num_fewshot}")
        self.max_new_tokens = max_new_tokens
        self.generate_in_validation = generate_in_validation
        self.predictions = predictions
        self.lm_eval_tasks = list(lm_eval_tasks or [])
        self.lm_eval_limit = lm_eval_limit
        self.lm_eval_include_path = lm_eval_include_path
        self.lm_eval_num_fewshot = lm_eval_num_fewshot
        self.lm_eval_batch_size = lm_eval_batch_size
        self.lm_eval_apply_chat_template = lm_eval_apply_chat_template
