"""Reward functions for online RL (:class:`ftbench.objectives.GRPO`), in TRL's calling convention::

    f(prompts: list[str], completions: list[str], **columns) -> list[float]

one reward per completion (``None`` for "does not apply to this row": it counts as NaN, left out of
that function's mean and of the weighted sum, as TRL does). ``prompts`` are the rendered prompt texts
(chat template applied, as the data module renders them), each repeated for its ``G`` completions;
``completions`` are the sampled continuations decoded without special tokens, cut at the first EOS
(the EOS and anything after it never appear in the text). ``columns`` always holds, one entry per
completion:

* ``answers``: the row's exact answer (``str``) or ``None``;
* ``tasks``: the row's task name (``"default"`` when it has none);
* ``prompt_ids``: the prompt's token ids (no padding);
* ``completion_ids``: the completion's token ids up to and including the first EOS (TRL's
  ``completion_ids``);

and a function should accept ``**columns`` so that columns added later do not break it.

Given in YAML as a list under ``reward_funcs`` (jsonargparse subclass mode: a class path and its
``init_args``), with an optional ``reward_weights`` list of the same length::

    reward_funcs:
      - class_path: ftbench.objectives.rewards.ExactAnswer
      - class_path: ftbench.objectives.rewards.RewardModel
        init_args: {path: runs/rm-xyz/weights}
      - class_path: ftbench.objectives.rewards.FromImport
        init_args: {name: mypkg.rewards.length, kwargs: {target: 20}}
    reward_weights: [1.0, 0.5, 0.1]

From Python any callable works too (``GRPO(reward_funcs=[my_func])``); it is logged under its
``__name__``. Each function is logged as ``train/rewards/<name>/mean`` and ``.../std``; ``<name>``
is :attr:`RewardFunction.name` (``exact_answer``, ``reward_model``, the imported function's name, or
the ``alias`` given).
"""

from __future__ import annotations

import functools
import importlib
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch

from ftbench.errors import ConfigError, FTBenchError

if TYPE_CHECKING:
    from ftbench.backbone import Backbone

__all__ = ["RewardFunction", "ExactAnswer", "RewardModel", "FromImport", "CallableReward", "as_reward_function",
           "RewardError", "load_reward_model"]


class RewardError(FTBenchError):
    """A reward function that cannot score what it was given (a row without an answer, a wrong count)."""


class RewardFunction:
    """Base of the reward functions: ``__call__(prompts, completions, **columns) -> list[float]``.

    :meth:`bind` is called by the objective before the first call (and again when the objective
    moves to another device), with the objective itself: a function that needs a model (the reward
    model) loads it there, on the objective's device and backbone."""

    #: the name the function's rewards are logged under (``rewards/<name>/mean``)
    name = "reward"

    def bind(self, objective: Any) -> None:
        """Prepare for scoring inside ``objective`` (its ``backbone`` and ``device``); default: nothing."""

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[Optional[float]]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


# ---------------------------------------------------------------------------- exact answer
class ExactAnswer(RewardFunction):
    """1.0 when the completion equals the row's exact answer, else 0.0.

    The comparison is the held-out exact match's, so that the training reward is the training-set
    version of the metric the run is judged by: the run's evaluator's ``exact_match`` metric for the
    row's task (:meth:`ftbench.evaluation.evaluator.Evaluator.exact_match`: ``data.metrics`` with its
    options, ``ignore_case``, ``first_line``, ``regex``, ...; by default, and outside a run, white space
    at the ends removed and inner runs folded on both sides). No first-line cut is made unless ``data.metrics`` asks for one: a completion
    that adds a second line after the right answer gets 0, as exact match scores it. The completion
    text is already cut at the first EOS and decoded without special tokens, so no EOS text is there
    to strip.
    """

    name = "exact_answer"

    def __init__(self):
        from ftbench.evaluation.evaluator import Evaluator

        self.evaluator = Evaluator()  # outside a run: the default exact match

    def bind(self, objective: Any) -> None:
        self.evaluator = objective.evaluator

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        answers = columns.get("answers")
        if answers is None:
            raise RewardError("reward exact_answer: the batch has no 'answers' column (the data module's prompt "
                              "batches give one: set data.init_args.prompt_batches: true)")
        tasks = columns.get("tasks") or [None] * len(completions)
        out = []
        for i, (completion, answer) in enumerate(zip(completions, answers)):
            if answer is None:
                prompt = prompts[i] if i < len(prompts) else ""
                raise RewardError(
                    f"reward exact_answer: a training row has no exact answer (task {tasks[i]!r}, prompt "
                    f"{prompt[-80:]!r}): every row of data.source needs one (the built-in tasks have one; a "
                    "preference file row needs an 'answer' field); use another reward function for rows without")
            out.append(float(self.evaluator.exact_match(tasks[i]).row_values([completion], [answer])[0]))
        return out


# ---------------------------------------------------------------------------- a user's function
class CallableReward(RewardFunction):
    """A plain callable with TRL's signature, named by its ``__name__`` (or ``alias``)."""

    def __init__(self, func: Callable[..., Sequence[Optional[float]]], alias: Optional[str] = None):
        if not callable(func):
            raise ConfigError(f"reward function: {func!r} is not callable")
        self.func = func
        base = func.func if isinstance(func, functools.partial) else func
        self.name = alias or getattr(base, "__name__", type(base).__name__)

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[Optional[float]]:
        return list(self.func(prompts=prompts, completions=completions, **columns))


class FromImport(CallableReward):
    """A user's reward function by import path, e.g. ``mypkg.rewards.length`` (module, then the
    function's name; a class attribute such as ``mypkg.rewards.Rules.length`` works too), called
    with TRL's convention ``f(prompts=..., completions=..., **columns)``."""

    def __init__(self, name: str, kwargs: Optional[dict[str, Any]] = None, alias: Optional[str] = None):
        """
        Args:
            name: ``module.function``: the import path of a callable with TRL's signature
                ``f(prompts, completions, **columns) -> list[float]``.
            kwargs: Keyword arguments bound to the function (``functools.partial``), e.g. a target length.
            alias: The name its rewards are logged under (default: the function's ``__name__``).
        """
        self.import_path = name
        func = import_object(name)
        if kwargs:
            func = functools.partial(func, **kwargs)
        super().__init__(func, alias)


def import_object(path: str) -> Any:
    """The object at ``module.attr[.attr...]``: the longest importable module prefix, then attributes."""
    if not isinstance(path, str) or "." not in path:
        raise ConfigError(f"reward function: {path!r} is not an import path (module.function)")
    # a reward module beside the user's configs imports without PYTHONPATH: `python -m ftbench.cli` has
    # the working directory on the path, the `ftbench` script does not. Appended, so that an installed
    # package of the same name still wins.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name is not None and not module_name.startswith(err.name):
                raise  # the module exists but imports something missing: show that
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                raise ConfigError(f"reward function: {path!r}: module {module_name!r} has no {'.'.join(parts[cut:])!r}")
            obj = getattr(obj, attr)
        if not callable(obj):
            raise ConfigError(f"reward function: {path!r} is a {type(obj).__name__}, not a callable")
        return obj
    raise ConfigError(f"reward function: cannot import {path!r} (no module {parts[0]!r} on the Python path)")


def as_reward_function(func: Any) -> RewardFunction:
    """A :class:`RewardFunction` as it is; an import path string or a plain callable wrapped."""
    if isinstance(func, RewardFunction):
        return func
    if isinstance(func, str):
        return FromImport(func)
    if callable(func):
        return CallableReward(func)
    raise ConfigError(f"reward_funcs: {func!r} is neither a reward function, a callable nor an import path")


# ---------------------------------------------------------------------------- reward model
def load_reward_model(path: str | Path, backbone: "Backbone") -> torch.nn.Module:
    """The score-head model a ``Reward`` run saved (``tuner.save``) in ``path``, on ``backbone``: the
    backbone loaded with a score head and the saved weights applied by :func:`ftbench.tuners.saved.apply_saved`
    (the one reader of a tuner's saved folder: a peft adapter with its ``score`` layer, bottleneck
    adapters with the head, the trained blocks and head of freeze-tuning, or a full model). Returned
    in eval mode with no parameter requiring grad."""
    from safetensors import safe_open

    from ftbench.backbone import score_module
    from ftbench.errors import BackboneError
    from ftbench.tuners.saved import apply_saved, load_backbone, saved_kind

    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"reward_model.path: {str(path)!r} is not a folder (give the weights folder of a reward "
                          "run: ftbench fit ... --save_weights true writes {out}/{run_id}/weights)")
    not_reward = saved_by_another_objective(path)
    if not_reward:
        raise ConfigError(f"reward_model.path: {str(path)!r} {not_reward}, not a reward run (a reward model is what "
                          "objective reward trains: configs/objective/reward.yaml)")
    try:
        if saved_kind(path) in ("full", "partial"):
            names = [n for f in path.glob("*.safetensors") for n in safe_open(str(f), "pt").keys()]
            if not any(n == "score.weight" or n.endswith(".score.weight") for n in names):
                raise ConfigError(f"{str(path)!r} has no score head weights: not the output of a reward run")
        model = apply_saved(load_backbone(backbone, head="score"), path, backbone, merge=False)
        score_module(model)
    except (ConfigError, BackboneError) as err:
        raise ConfigError(f"reward_model.path: {str(err).removeprefix('backbone.init_from: ')}") from None
    except (AttributeError, KeyError, RuntimeError) as err:  # weights of another head or shape
        raise ConfigError(f"reward_model.path: {str(path)!r} does not load as a score-head model "
                          f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}): not the output of "
                          "a reward run") from None
    model.requires_grad_(False)
    model.eval()
    return model


def saved_by_another_objective(weights: Path) -> Optional[str]:
    """What the record beside a run's weights (``{out}/{run_id}/weights`` -> ``{out}/{run_id}.json``)
    says trained them, when that was not the reward objective; None when it was, or without a record."""
    import json

    record = weights.parent.parent / f"{weights.parent.name}.json"
    try:
        info = json.loads(record.read_text())["train_info"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    objective = info.get("objective") if isinstance(info, dict) else None
    if not isinstance(objective, str) or objective == "reward":
        return None
    return f"holds the weights of run {weights.parent.name} ({info.get('method') or objective}: objective {objective})"


def chat_turn_end(tokenizer) -> str:
    """What the tokenizer's chat template writes after the EOS that ends an assistant turn (SmolLM2:
    ``"\\n"`` after ``<|im_end|>``), or ``""``."""
    template = getattr(tokenizer, "chat_template", None)
    eos = tokenizer.eos_token
    if not template or not eos:
        return ""
    marker = "\x00ftbench-marker\x00"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}],
                                             tokenize=False)
    except Exception:  # a template that refuses this conversation: nothing to add
        return ""
    at = text.find(marker + eos)
    return text[at + len(marker) + len(eos):] if at >= 0 else ""


class RewardModel(RewardFunction):
    """The score a reward model gives prompt + completion. The model is the saved output of a
    ``Reward`` run (what ``tuner.save`` wrote); the score is its head's output at the last token,
    under ``no_grad`` in eval mode (:func:`ftbench.backbone.last_token_scores`, which reads the last
    real token from the attention mask).

    What is scored, so that it looks like what the reward model was trained on (the preference data
    module's ``prompt + response``):

    * with the reward model's tokenizer the policy's (the default), the token ids themselves: the
      prompt's ids, the completion's ids up to and including its first EOS, and, for a completion that
      ended with EOS after a chat-rendered prompt, the tokens the chat template writes after the end of
      an assistant turn (``end_of_turn: auto``; SmolLM2 and the tiny test model: ``"\\n"`` after
      ``<|im_end|>``), because the preference data's chat sequences end with them. No text round trip.
    * with another tokenizer (a ``backbone`` with another vocabulary), the text
      ``prompt + completion (+ EOS text + end of turn when it ended)``, tokenized without special tokens.
    """

    name = "reward_model"

    def __init__(self, path: str, backbone: Optional["Backbone"] = None, alias: Optional[str] = None,
                 end_of_turn: Optional[str] = "auto", batch_size: int = 32):
        """
        Args:
            path: The weights folder of a ``Reward`` run (``--save_weights true`` writes
                ``{out}/{run_id}/weights``): a peft adapter with its score head, bottleneck adapters,
                the trained blocks of freeze-tuning, or a full model.
            backbone: The backbone the reward model was trained on (default: the run's backbone).
            alias: The name its rewards are logged under (default ``reward_model``).
            end_of_turn: Text added after a completion that ended with EOS: ``auto`` (what the chat
                template writes after an assistant turn's EOS, when the prompt ends with the
                template's generation prompt; else nothing), or the text itself (``""``: nothing).
            batch_size: Sequences scored per forward.
        """
        if batch_size < 1:
            raise ConfigError(f"reward_model.batch_size: must be >= 1, got {batch_size}")
        self.path = str(path)
        self.backbone = backbone
        self.name = alias or type(self).name
        self.end_of_turn = end_of_turn
        self.batch_size = batch_size
        self.model: Optional[torch.nn.Module] = None
        self.device = torch.device("cpu")
        self._same_tokenizer: Optional[bool] = None
        self._policy_tokenizer = None
        self._chat: Optional[tuple[str, str]] = None  # (the template's generation prompt, its end of turn)

    # ------------------------------------------------------------------ loading
    def bind(self, objective: Any) -> None:
        if self.backbone is None:
            self.backbone = objective.backbone
        self._policy_tokenizer = objective.backbone.tokenizer
        device = torch.device(getattr(objective, "device", "cpu"))
        if self.model is None:
            self.model = load_reward_model(self.path, self.backbone)
        if device != self.device or next(self.model.parameters()).device != device:
            self.model.to(device)
            self.device = device

    @property
    def tokenizer(self):
        return self.backbone.tokenizer

    def same_tokenizer(self) -> bool:
        if self._same_tokenizer is None:
            policy = self._policy_tokenizer
            self._same_tokenizer = policy is None or policy is self.tokenizer or policy.get_vocab() == self.tokenizer.get_vocab()
        return self._same_tokenizer

    def turn_end(self, prompt: str) -> str:
        """The text added after a completion of ``prompt`` that ended with EOS (see ``end_of_turn``)."""
        if self.end_of_turn != "auto":
            return self.end_of_turn or ""
        if self._chat is None:
            tok = self.tokenizer
            generation_prompt = ""
            if getattr(tok, "chat_template", None):
                user = [{"role": "user", "content": "x"}]
                try:
                    gen = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
                    bare = tok.apply_chat_template(user, tokenize=False)
                    generation_prompt = gen[len(bare):] if gen.startswith(bare) else ""
                except Exception:  # a template that refuses a lone user turn: no chat rendering to follow
                    generation_prompt = ""
            self._chat = (generation_prompt, chat_turn_end(tok) if generation_prompt else "")
        generation_prompt, end = self._chat
        return end if generation_prompt and prompt.endswith(generation_prompt) else ""

    # ------------------------------------------------------------------ scoring
    def sequences(self, prompts: list[str], completions: list[str], columns: dict[str, Any]) -> list[list[int]]:
        """The token ids scored for each completion (see the class docstring)."""
        tok = self.tokenizer
        policy_eos = getattr(self._policy_tokenizer or tok, "eos_token_id", None)
        completion_ids = columns.get("completion_ids")
        use_ids = "prompt_ids" in columns and completion_ids is not None and self.same_tokenizer()
        end_ids: dict[str, list[int]] = {}
        out = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            ended = completion_ids is not None and policy_eos is not None and list(completion_ids[i])[-1:] == [policy_eos]
            end = self.turn_end(prompt) if ended else ""
            if use_ids:
                if end and end not in end_ids:
                    end_ids[end] = tok(end, add_special_tokens=False)["input_ids"]
                ids = list(columns["prompt_ids"][i]) + list(completion_ids[i]) + end_ids.get(end, [])
            else:
                text = prompt + completion + ((tok.eos_token or "") + end if ended else "")
                ids = tok(text, add_special_tokens=False)["input_ids"]
            if not ids:
                raise RewardError(f"reward {self.name}: nothing to score (prompt {prompt!r}, completion {completion!r})")
            out.append(ids)
        return out

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        from ftbench.backbone import last_token_scores
        from ftbench.data.base import pad_batch

        if self.model is None:
            raise RuntimeError(f"reward {self.name}: bind(objective) loads the reward model before the first call")
        seqs = self.sequences(prompts, completions, columns)
        pad = self.tokenizer.pad_token_id
        scores: list[float] = []
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(seqs), self.batch_size):
                chunk = seqs[start:start + self.batch_size]
                ids = pad_batch(chunk, pad).to(self.device)
                lengths = torch.tensor([len(s) for s in chunk], device=self.device)
                mask = (torch.arange(ids.shape[1], device=self.device)[None, :] < lengths[:, None]).long()
                scores.extend(float(s) for s in last_token_scores(self.model, ids, mask).float().cpu())
        finally:
            self.model.train(was_training)
        return scores

    def __repr__(self) -> str:
        return f"RewardModel(path={self.path!r}, name={self.name!r})"


def finite_or_nan(values: Sequence[Optional[float]], name: str, n: int) -> list[float]:
    """A reward function's output checked: ``n`` numbers (``None`` -> NaN); an infinite value is an error."""
    values = list(values)
    if len(values) != n:
        raise RewardError(f"reward {name}: returned {len(values)} values for {n} completions")
    out = []
    for v in values:
        if v is None:
            out.append(math.nan)
            continue
        v = float(v)
        if math.isinf(v):
            raise RewardError(f"reward {name}: returned {v} (rewards must be finite; None means 'does not apply')")
        out.append(v)
    return out
