"""Answer metrics that fit the task: what a data config names in ``metrics``.

A data set names its metrics (``metrics: [exact_match, rouge_l]``, or objects with options); the
default ``[exact_match]`` is ftbench's original comparison (white space folded, case-sensitive). Each
metric gives a value per evaluated row (written to the predictions file) and a value per evaluation:

==================  ===============  =========================================================================
kind                recorded as      value
==================  ===============  =========================================================================
``exact_match``     ``accuracy``     1 when the prepared prediction equals the prepared reference; mean
``label_accuracy``  same as kind     1 when the label parsed from the generation is the reference's label
``rouge_l``         same as kind     ROUGE-L F-measure (torchmetrics ``rouge_score``); mean over rows, which is
                                     what ``torchmetrics.text.ROUGEScore`` computes
``chrf``            same as kind     chrF (torchmetrics ``CHRFScore``, character 6-grams, beta 2, no word
                                     n-grams unless ``n_word_order``), corpus-level over the evaluated rows;
                                     a row's own value is its sentence chrF. torchmetrics counts a missing
                                     n-gram order as 0: an exact answer shorter than 6 characters scores
                                     below 1 (``hello``: 5/6)
``bleu``            same as kind     BLEU (torchmetrics ``BLEUScore``), corpus-level; a row's value is its
                                     sentence BLEU (0 for most short answers without ``smooth``)
``mc_accuracy``     same as kind     multiple choice by log-likelihood: 1 when the choice with the highest
                                     summed log-probability after the prompt is the gold one (lm-eval's acc)
``mc_accuracy_norm`` same as kind    the same with each log-likelihood divided by the choice's length in
                                     characters (lm-eval's acc_norm; bytes for ASCII)
==================  ===============  =========================================================================

``exact_match`` is recorded as ``{stage}/accuracy`` (and ``{stage}/{task}/accuracy``): the name every
objective and the report's "exact match" column have always used, so existing records, pins and
``--select val/accuracy`` keep their meaning. ``name`` records a metric under another name (two
``exact_match`` with different options need one).

Before a generation metric compares, both texts are prepared in this order: ``first_line`` (the first
non-empty line), ``regex`` (the first or last match; group 1 when the pattern has a group; a prediction
without a match becomes empty, a reference without one is kept whole), ``ignore_case``,
``ignore_punctuation`` (Unicode punctuation removed), ``fold_whitespace`` (surrounding white space
removed, inner runs folded to one space).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, fields
from typing import Any, Literal, Optional, Sequence, Union

from ftbench.errors import ConfigError

MetricKind = Literal["exact_match", "label_accuracy", "rouge_l", "chrf", "bleu", "mc_accuracy", "mc_accuracy_norm"]
KINDS: tuple[str, ...] = ("exact_match", "label_accuracy", "rouge_l", "chrf", "bleu", "mc_accuracy", "mc_accuracy_norm")
#: the record name of a kind when the spec gives none
RECORD_NAMES = {"exact_match": "accuracy"}
GENERATION_KINDS = ("exact_match", "label_accuracy", "rouge_l", "chrf", "bleu")
CHOICE_KINDS = ("mc_accuracy", "mc_accuracy_norm")
#: the options each kind reads (beyond ``metric`` and ``name``)
_PREPARE = ("ignore_case", "ignore_punctuation", "fold_whitespace", "first_line", "regex", "regex_match")
OPTIONS = {
    "exact_match": _PREPARE,
    "label_accuracy": (*_PREPARE, "labels", "label_mode"),
    "rouge_l": (*_PREPARE, "use_stemmer"),
    "chrf": (*_PREPARE, "n_word_order"),
    "bleu": (*_PREPARE, "n_gram", "smooth"),
    "mc_accuracy": (),
    "mc_accuracy_norm": (),
}


class MetricError(ConfigError):
    """A metric spec that cannot be used (unknown kind, option of another kind, bad regex, ...); the
    message names the option (``data.metrics[i]``, ``data.tasks[i].metrics``), so the CLI prints it as
    one line."""


@dataclass
class MetricSpec:
    """One metric of a data set (``data.metrics`` items; a bare string is ``{metric: STRING}``).

    Args:
        metric: ``exact_match``, ``label_accuracy``, ``rouge_l``, ``chrf``, ``bleu``, ``mc_accuracy``
            or ``mc_accuracy_norm``.
        name: Record name (``test/<name>``); default: the kind, ``accuracy`` for ``exact_match``.
        ignore_case: Compare lower-cased (default: on for ``label_accuracy``, off otherwise).
        ignore_punctuation: Remove Unicode punctuation before comparing.
        fold_whitespace: Strip the ends and fold inner white space runs to one space.
        first_line: Keep only the first non-empty line.
        regex: Extract the answer with this pattern (group 1 if it has groups), e.g. ``-?\\d+`` for a
            number; a prediction without a match counts as empty.
        regex_match: Which match: ``first`` or ``last`` (GSM8K-style "the last number").
        labels: ``label_accuracy``: the label set; the label is the one found first in the text (as a
            whole word; the longest at the same position), the reference must be one of them.
        label_mode: ``label_accuracy``: which label a text gives. ``first`` (the default): the label found
            first anywhere ("This email is not spam" reads as ``spam`` when ``not spam`` is no label);
            ``first_word``: the label the text starts with, none otherwise ("Spam." is spam, "It is
            spam" is no label); ``not_negated``: the first label not directly preceded by "not" or "no"
            ("This email is not spam, it is ham" is ``ham``; "not spam" alone is no label).
        use_stemmer: ``rouge_l``: Porter stemming (needs ``nltk``).
        n_gram: ``bleu``: largest n-gram order.
        n_word_order: ``chrf``: word n-gram order (0: chrF, as sacrebleu's and lm-eval's ``chrf``; 2: chrF++).
        smooth: ``bleu``: add-one smoothing (Lin and Och), so short answers do not score 0.
    """

    metric: MetricKind
    name: Optional[str] = None
    ignore_case: Optional[bool] = None
    ignore_punctuation: bool = False
    fold_whitespace: bool = True
    first_line: bool = False
    regex: Optional[str] = None
    regex_match: Literal["first", "last"] = "first"
    labels: Optional[list[str]] = None
    label_mode: Literal["first", "first_word", "not_negated"] = "first"
    use_stemmer: bool = False
    n_gram: int = 4
    smooth: bool = False
    n_word_order: int = 0


MetricConfig = Union[MetricKind, MetricSpec]
_DEFAULTS = {f.name: f.default for f in fields(MetricSpec)}


# ---------------------------------------------------------------------------------- text preparation
def fold_whitespace(text: str) -> str:
    """White space at the ends removed and inner runs folded to one space."""
    return " ".join(text.split())


def first_line(text: str) -> str:
    """The first line that is not blank (``""`` when there is none)."""
    return next((line for line in text.splitlines() if line.strip()), "")


def remove_punctuation(text: str) -> str:
    """``text`` without Unicode punctuation (categories P*: ``.,;:!?'"-()[]{}…``)."""
    return "".join(ch for ch in text if not unicodedata.category(ch).startswith("P"))


def extract(text: str, pattern: "str | re.Pattern[str]", which: str = "first") -> Optional[str]:
    """The first (or last) match of ``pattern`` in ``text``: group 1 when the pattern has groups (the
    first group that took part), else the whole match; None without a match."""
    rx = re.compile(pattern) if isinstance(pattern, str) else pattern
    matches = list(rx.finditer(text))
    if not matches:
        return None
    m = matches[0] if which == "first" else matches[-1]
    if rx.groups:
        found = next((g for g in m.groups() if g is not None), None)
        return found if found is not None else m.group(0)
    return m.group(0)


#: a label right after one of these words is negated (``label_mode: not_negated``)
NEGATIONS = ("not", "no")
_NEGATED = re.compile(r"(?<!\w)(?:" + "|".join(NEGATIONS) + r")\s+$", re.IGNORECASE)


def parse_label(text: str, labels: Sequence[str], ignore_case: bool = True, mode: str = "first") -> Optional[str]:
    """The label of ``labels`` that occurs first in ``text`` as a whole word (not inside a longer word);
    at the same position the longest wins (``not spam`` over ``spam``); None when none occurs.
    ``mode`` ``first_word``: only a label at the start of the text counts; ``not_negated``: an
    occurrence right after "not"/"no" (:data:`NEGATIONS`) does not count. Returns the label as
    written in ``labels``."""
    flags = re.IGNORECASE if ignore_case else 0
    best: Optional[tuple[int, int, str]] = None
    start = len(text) - len(text.lstrip())
    for label in labels:
        if not label.strip():
            continue
        rx = re.compile(r"(?<!\w)" + re.escape(label.strip()) + r"(?!\w)", flags)
        for m in rx.finditer(text):
            if mode == "first_word" and m.start() != start:
                break
            if mode == "not_negated" and _NEGATED.search(text[: m.start()]):
                continue
            if best is None or (m.start(), -len(m.group(0))) < (best[0], -best[1]):
                best = (m.start(), len(m.group(0)), label)
            break
    return best[2] if best else None


# ---------------------------------------------------------------------------------- metrics
class EvalMetric:
    """A resolved metric: its record ``name``, ``kind`` and the preparation of its texts."""

    needs_generation = True
    needs_choices = False
    #: computed by :meth:`corpus_metric` over all rows (not the mean of the row values)
    corpus = False

    def __init__(self, spec: MetricSpec):
        self.spec = spec
        self.kind: str = spec.metric
        self.name: str = spec.name or RECORD_NAMES.get(spec.metric, spec.metric)
        self.ignore_case = bool(spec.ignore_case) if spec.ignore_case is not None else False
        self._regex = re.compile(spec.regex) if spec.regex else None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def prepare(self, text: str, reference: bool = False) -> Optional[str]:
        """``text`` as compared (see the module docstring); None for a prediction the regex finds nothing in."""
        s = self.spec
        if s.first_line:
            text = first_line(text)
        if self._regex is not None:
            found = extract(text, self._regex, s.regex_match)
            if found is None and not reference:
                return None
            text = found if found is not None else text
        if self.ignore_case:
            text = text.lower()
        if s.ignore_punctuation:
            text = remove_punctuation(text)
        if s.fold_whitespace:
            text = fold_whitespace(text)
        return text

    def row_values(self, predictions: Sequence[str], references: Sequence[str]) -> list[float]:
        raise NotImplementedError

    def corpus_metric(self):
        """A torchmetrics metric that the evaluation is computed with (corpus-level), or None for the
        mean of the row values."""
        return None

    def corpus_inputs(self, predictions: Sequence[str], references: Sequence[str]) -> tuple[list[str], list[list[str]]]:
        preds = [self.prepare(p) or "" for p in predictions]
        refs = [[self.prepare(r, reference=True) or ""] for r in references]
        return preds, refs


class ExactMatch(EvalMetric):
    def row_values(self, predictions, references):
        out = []
        for p, r in zip(predictions, references):
            pp = self.prepare(p)
            out.append(float(pp is not None and pp == self.prepare(r, reference=True)))
        return out


class LabelAccuracy(EvalMetric):
    def __init__(self, spec: MetricSpec):
        super().__init__(spec)
        self.ignore_case = True if spec.ignore_case is None else bool(spec.ignore_case)
        self.labels = list(spec.labels or [])
        self.mode = spec.label_mode

    def label(self, text: str, reference: bool = False) -> Optional[str]:
        prepared = self.prepare(text, reference)
        # a reference is its label as written: read the first label found, whatever the mode
        mode = "first" if reference else self.mode
        return None if prepared is None else parse_label(prepared, self.labels, self.ignore_case, mode)

    def row_values(self, predictions, references):
        out = []
        for p, r in zip(predictions, references):
            lp = self.label(p)
            out.append(float(lp is not None and lp == self.label(r, reference=True)))
        return out


class RougeL(EvalMetric):
    def row_values(self, predictions, references):
        from torchmetrics.functional.text import rouge_score

        preds, refs = self.corpus_inputs(predictions, references)
        return [float(rouge_score(p, r[0], rouge_keys="rougeL", use_stemmer=self.spec.use_stemmer)["rougeL_fmeasure"])
                for p, r in zip(preds, refs)]


class ChrF(EvalMetric):
    corpus = True
    def row_values(self, predictions, references):
        from torchmetrics.functional.text import chrf_score

        preds, refs = self.corpus_inputs(predictions, references)
        return [float(chrf_score([p], [r], n_word_order=self.spec.n_word_order)) for p, r in zip(preds, refs)]

    def corpus_metric(self):
        from torchmetrics.text import CHRFScore

        return CHRFScore(n_word_order=self.spec.n_word_order, sync_on_compute=True)


class Bleu(EvalMetric):
    corpus = True
    def row_values(self, predictions, references):
        from torchmetrics.functional.text import bleu_score

        preds, refs = self.corpus_inputs(predictions, references)
        return [float(bleu_score([p], [r], n_gram=self.spec.n_gram, smooth=self.spec.smooth)) for p, r in zip(preds, refs)]

    def corpus_metric(self):
        from torchmetrics.text import BLEUScore

        return BLEUScore(n_gram=self.spec.n_gram, smooth=self.spec.smooth, sync_on_compute=True)


class MultipleChoice(EvalMetric):
    """Accuracy of the choice with the highest log-likelihood (``normalised``: per character)."""

    needs_generation = False
    needs_choices = True

    def __init__(self, spec: MetricSpec):
        super().__init__(spec)
        self.normalised = spec.metric == "mc_accuracy_norm"

    def pick(self, loglikelihoods: Sequence[float], choices: Sequence[str]) -> int:
        from ftbench.evaluation.choices import pick_choice

        return pick_choice(loglikelihoods, choices, self.normalised)

    def row_values(self, predictions, references):  # pragma: no cover - scored from choices, not text
        raise TypeError("multiple-choice metrics are computed from choice log-likelihoods")


_CLASSES = {"exact_match": ExactMatch, "label_accuracy": LabelAccuracy, "rouge_l": RougeL, "chrf": ChrF, "bleu": Bleu,
            "mc_accuracy": MultipleChoice, "mc_accuracy_norm": MultipleChoice}


def as_spec(item: "MetricConfig | dict[str, Any]", where: str = "data.metrics") -> MetricSpec:
    """A ``MetricSpec`` from a kind name, a dict (a YAML object) or a spec; errors name ``where``."""
    if isinstance(item, MetricSpec):
        return item
    if isinstance(item, str):
        item = {"metric": item}
    if not isinstance(item, dict):
        raise MetricError(f"{where}: {item!r} is not a metric (a name such as exact_match, or an object with 'metric')")
    unknown = sorted(set(item) - set(_DEFAULTS))
    if unknown:
        raise MetricError(f"{where}: unknown option(s) {', '.join(unknown)} (options: {', '.join(_DEFAULTS)})")
    if "metric" not in item:
        raise MetricError(f"{where}: 'metric' is missing (one of {', '.join(KINDS)})")
    return MetricSpec(**item)


def build_metric(item: "MetricConfig | dict[str, Any]", where: str = "data.metrics") -> EvalMetric:
    """The metric of one spec, checked: a known kind, only its own options, a valid regex, labels
    for ``label_accuracy``, nltk for a stemmer."""
    spec = as_spec(item, where)
    kind = spec.metric
    if kind not in KINDS:
        raise MetricError(f"{where}: unknown metric {kind!r} (choose from {', '.join(KINDS)})")
    foreign = [k for k, default in _DEFAULTS.items()
               if k not in ("metric", "name") and k not in OPTIONS[kind] and getattr(spec, k) != default]
    if foreign:
        raise MetricError(f"{where}: {kind} does not read {', '.join(foreign)}"
                          + (f" (its options: {', '.join(OPTIONS[kind])})" if OPTIONS[kind] else " (it has no options)"))
    if spec.name is not None and (not spec.name or "/" in spec.name or spec.name != spec.name.strip()):
        raise MetricError(f"{where}: name {spec.name!r} is not a metric name (non-empty, no '/', no surrounding spaces)")
    if spec.regex is not None:
        try:
            re.compile(spec.regex)
        except re.error as err:
            raise MetricError(f"{where}: regex {spec.regex!r} does not compile: {err}") from None
    if kind == "label_accuracy":
        labels = [lab for lab in (spec.labels or []) if isinstance(lab, str) and lab.strip()]
        if len(labels) < 2 or len(labels) != len(spec.labels or []):
            raise MetricError(f"{where}: label_accuracy needs labels: a list of at least two non-empty strings, "
                              f"got {spec.labels!r}")
        if spec.label_mode not in ("first", "first_word", "not_negated"):
            raise MetricError(f"{where}: label_mode {spec.label_mode!r} is not one of first, first_word, not_negated")
    if kind == "chrf" and spec.n_word_order < 0:
        raise MetricError(f"{where}: chrf n_word_order must be >= 0, got {spec.n_word_order}")
    if kind == "bleu" and spec.n_gram < 1:
        raise MetricError(f"{where}: bleu n_gram must be at least 1, got {spec.n_gram}")
    if kind == "rouge_l" and spec.use_stemmer:
        try:
            import nltk  # noqa: F401
        except ImportError:
            raise MetricError(f"{where}: rouge_l with use_stemmer needs nltk (pip install nltk)") from None
    return _CLASSES[kind](spec)


def build_metrics(items: Optional[Sequence["MetricConfig | dict[str, Any]"]], where: str = "data.metrics") -> list[EvalMetric]:
    """The metrics of a data set (``None``: the default ``[exact_match]``); record names must be unique."""
    if items is None:
        items = ["exact_match"]
    if isinstance(items, (str, MetricSpec, dict)):
        items = [items]
    if not items:
        raise MetricError(f"{where}: give at least one metric (default: [exact_match])")
    out = [build_metric(item, f"{where}[{i}]") for i, item in enumerate(items)]
    seen: dict[str, int] = {}
    for i, m in enumerate(out):
        if m.name in seen:
            raise MetricError(f"{where}[{i}]: {m.kind} records as {m.name!r}, as {where}[{seen[m.name]}] does; "
                              "give one of them another 'name'")
        if m.name == "loss" or m.name == "perplexity":
            raise MetricError(f"{where}[{i}]: the name {m.name!r} is the objective's own; choose another")
        seen[m.name] = i
    return out


def default_metrics() -> list[EvalMetric]:
    """``[exact_match]``: what every evaluation computed before data sets named their metrics."""
    return build_metrics(None)
