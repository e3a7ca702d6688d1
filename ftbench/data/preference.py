"""Preference pairs: a prompt with a chosen and a rejected response, for reward models and DPO.

Accepted rows (the forms TRL and LLaMA-Factory read, detected row by row or named by ``format``;
:mod:`ftbench.data.formats` converts the LLaMA-Factory forms and TRL's standard implicit prompt into
the native ones below):

- TRL standard, explicit prompt: ``{"prompt": str, "chosen": str, "rejected": str}``
- TRL standard, implicit prompt: ``{"chosen": str, "rejected": str}``; the prompt is their common
  prefix (TRL's ``extract_prompt``)
- TRL conversational, explicit prompt: ``{"prompt": [messages], "chosen": [assistant message],
  "rejected": [assistant message]}`` (messages are ``{"role", "content"}``)
- TRL conversational, implicit prompt: ``{"chosen": [messages], "rejected": [messages]}``; the
  prompt is the longest common run of leading messages
- LLaMA-Factory alpaca: ``{"instruction", "input"?, "system"?, "history"?, "chosen": str, "rejected": str}``
- LLaMA-Factory sharegpt: ``{"conversations": [{"from", "value"}], "chosen": {"from": "gpt",
  "value"}, "rejected": {...}}``
- a ranking set of LLaMA-Factory's ``dataset_info.json``: ``source: dataset_info:PATH#NAME``

Any form may add ``answer`` (a string): the exact answer, for exact-match evaluation and for the
rewards of online RL (the built-in pairs set it to the chosen response). Chat messages are checked by
the shared :func:`~ftbench.data.base.check_conversation`. Pairs with the same (normalised) prompt
share a split.

Each pair is tokenised into two sequences, prompt + chosen and prompt + rejected, with the prompt
tokens masked out of the labels (-100). A batch carries ``chosen_input_ids``,
``chosen_attention_mask``, ``chosen_labels``, the same three for ``rejected_*`` (both padded to one
width, so a DPO step can concatenate them into one forward), the left-padded prompt
(``prompt_input_ids``, ``prompt_attention_mask``), and ``input_ids``/``attention_mask``/``labels``
equal to the chosen sequence, so that any supervised method trains on the chosen responses.
Validation and test batches whose rows all have an ``answer`` also carry ``gen_input_ids``,
``gen_attention_mask`` (the left-padded prompt, as in the instruction regime) and ``answers``.
"""

from __future__ import annotations

import random
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal, Optional, Sequence

import torch

from ftbench.data import tasks
from ftbench.data.base import (
    IGNORE_INDEX,
    Example,
    Row,
    Source,
    SplitDataModule,
    TruncationStats,
    chat_messages,
    check_conversation,
    left_padded,
    pad_batch,
    prompt_key,
    segments_to_example,
    warn_empty_texts,
)
from ftbench.data.formats import Format, read_source
from ftbench.errors import ConfigError

BUILTIN = "builtin:"
MAX_WARNINGS = 10


class PreferenceDataWarning(UserWarning):
    """A preference row that is kept but suspicious (its chosen equals its rejected response)."""


# ---------------------------------------------------------------------------- built-in pairs
def wrong_answer(row: dict[str, str], rng: random.Random) -> str:
    """A plausible wrong answer to a built-in task row (never equal to the right one)."""
    task, out, inp = row["task"], row["output"], row["input"]
    if task in ("arithmetic", "count_words"):
        n = int(out)
        delta = rng.choice([-1, 1]) * (rng.randint(1, 10) if task == "arithmetic" else 1)
        return str(n + delta if n + delta >= 0 else n - delta)
    if task == "last_word":
        words = inp.split()
        return rng.choice(words[:-1])
    if task == "sort_numbers":
        nums = out.split()
        i = rng.randrange(len(nums) - 1)
        nums[i], nums[i + 1] = nums[i + 1], nums[i]
        return " ".join(nums)
    if task == "uppercase":
        return out.capitalize() if rng.random() < 0.5 else out.lower()
    raise ValueError(f"no wrong answer for task {task!r}")


CAPITALS = "capitals"


def capitals_pairs(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``builtin:capitals``: a surface preference that a tiny model learns in a few dozen steps. The
    prompt asks to repeat 3 to 5 words; chosen = the words in capital letters, rejected = the same
    words in lower case (the exact answer: the chosen response)."""
    rng = random.Random(f"preference:{CAPITALS}:{seed}")
    out = []
    for _ in range(n):
        words = " ".join(rng.sample(tasks.WORDS, rng.randint(3, 5)))
        out.append({"prompt": f"Repeat these words: {words}", "chosen": words.upper(), "rejected": words,
                    "answer": words.upper(), "task": CAPITALS})
    return out


def builtin_pairs(task: str, n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` built-in preference rows. ``capitals``: :func:`capitals_pairs`. A task of
    :mod:`ftbench.data.tasks`: chosen = the right answer (also the row's exact ``answer``),
    rejected = a plausible wrong one."""
    if task == CAPITALS:
        return capitals_pairs(n, seed)
    if task != tasks.MIXTURE and task not in tasks.TASKS:
        raise ConfigError(f"unknown built-in preference set {task!r}; choose from {', '.join([CAPITALS, *tasks.task_names()])}")
    rows = tasks.generate(task, n, seed)
    rng = random.Random(f"preference:{task}:{seed}")
    out = []
    for r in rows:
        prompt = f"{r['instruction']}\n\n{r['input']}" if r["input"] else r["instruction"]
        out.append({"prompt": prompt, "chosen": r["output"], "rejected": wrong_answer(r, rng), "answer": r["output"], "task": r["task"]})
    return out


# ---------------------------------------------------------------------------- rows -> pairs
@dataclass
class Pair:
    """A normalised row: messages (chat form) or plain text, and where it came from."""

    prompt: Any  # list of messages, or str
    chosen: Any  # list of messages, or str
    rejected: Any
    chat: bool
    row: Row
    answer: Optional[str] = None  # the exact answer, for exact-match evaluation


def parse_pair(row: Row) -> Pair:
    """Normalise one row of any accepted form (see the module docstring), checking its fields."""
    f = row.fields
    for name in ("chosen", "rejected"):
        if name not in f or f[name] is None:
            raise row.error(name, "missing")
    answer = f.get("answer")
    if answer is not None and not isinstance(answer, str):
        raise row.error("answer", f"must be a string, got {type(answer).__name__}")
    if isinstance(f["chosen"], list) or isinstance(f.get("prompt"), list):
        chosen = chat_messages(row, "chosen", f["chosen"])
        rejected = chat_messages(row, "rejected", f["rejected"])
        if "prompt" in f and f["prompt"] is not None:
            prompt = chat_messages(row, "prompt", f["prompt"])
            for name, msgs in (("chosen", chosen), ("rejected", rejected)):
                check_conversation(row, ("prompt", prompt), (name, msgs))
            return Pair(prompt, chosen, rejected, True, row, answer)
        # implicit prompt: the shared leading messages, up to the last user turn before they differ
        for name, msgs in (("chosen", chosen), ("rejected", rejected)):
            check_conversation(row, (name, msgs))
        k = 0
        while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
            k += 1
        while k > 0 and chosen[k - 1]["role"] != "user":
            k -= 1
        if k == 0:
            raise row.error("chosen", "no prompt: give 'prompt', or start 'chosen' and 'rejected' with the same user turn")
        return Pair(chosen[:k], chosen[k:], rejected[k:], True, row, answer)
    if "prompt" in f:
        prompt = row.get_str("prompt")
    elif "instruction" in f:  # LLaMA-Factory Alpaca
        inst, inp = row.get_str("instruction"), row.get_str("input", required=False)
        prompt = f"{inst}\n\n{inp}" if inp else inst
    else:
        raise row.error("prompt", "missing (give 'prompt', 'instruction', 'conversations' or chat lists)")
    return Pair(prompt, row.get_str("chosen"), row.get_str("rejected"), False, row, answer)


def completion_text(value: Any) -> str:
    return value if isinstance(value, str) else "\n".join(m["content"] for m in value)


# ---------------------------------------------------------------------------- tokenisation
@dataclass
class PreferenceExample:
    chosen: Example
    rejected: Example
    prompt_ids: list[int]
    task: Optional[str] = None
    answer: Optional[str] = None  # the exact answer (exact-match evaluation, prompt batches)
    prompt_text: Optional[str] = None  # the rendered prompt


class PreferenceCollator:
    """Pads chosen and rejected (right, to one common width) and the prompts (left); with
    ``generation`` (evaluation batches) and an exact answer in every row, also the generation prompts
    and answers, as the instruction regime's :class:`~ftbench.data.base.Collator` gives them."""

    def __init__(self, pad_id: int, pad_to_multiple_of: int = 1, generation: bool = True):
        self.pad_id, self.multiple_of, self.generation = pad_id, pad_to_multiple_of, generation

    def __call__(self, examples: Sequence[PreferenceExample]) -> dict[str, Any]:
        seqs = [e.chosen for e in examples] + [e.rejected for e in examples]
        ids = pad_batch([s.input_ids for s in seqs], self.pad_id, multiple_of=self.multiple_of)
        labels = pad_batch([s.labels for s in seqs], IGNORE_INDEX, multiple_of=self.multiple_of)
        lengths = torch.tensor([len(s.input_ids) for s in seqs])
        mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
        n = len(examples)
        batch: dict[str, Any] = {
            "chosen_input_ids": ids[:n], "chosen_attention_mask": mask[:n], "chosen_labels": labels[:n],
            "rejected_input_ids": ids[n:], "rejected_attention_mask": mask[n:], "rejected_labels": labels[n:],
        }
        batch["prompt_input_ids"], batch["prompt_attention_mask"] = left_padded([e.prompt_ids for e in examples], self.pad_id)
        # the chosen sequence under the plain names: a supervised method trains on the chosen responses
        batch["input_ids"], batch["attention_mask"], batch["labels"] = (
            batch["chosen_input_ids"], batch["chosen_attention_mask"], batch["chosen_labels"])
        if self.generation and all(e.answer is not None for e in examples):
            # the left-padded prompt is the generation prompt (the same tensors)
            batch["gen_input_ids"], batch["gen_attention_mask"] = batch["prompt_input_ids"], batch["prompt_attention_mask"]
            batch["answers"] = [e.answer for e in examples]
        if any(e.task is not None for e in examples):
            batch["tasks"] = [e.task or "default" for e in examples]
        return batch


class PackedPairCollator(PreferenceCollator):
    """Training batches of packed pairs (``data.packing``, :mod:`ftbench.data.packing`): the unpacked pair
    batch, by which the objectives lay out their per-token masks and per-pair results (and the reference
    table its row keys), plus its ``2 x pairs`` sequences, chosen rows first as
    :func:`~ftbench.data.pairs.concatenate_pairs` stacks them, packed into blocks: ``packed_input_ids``,
    ``packed_attention_mask``, ``packed_labels``, ``packed_position_ids`` and ``packed_segments``
    (``(2 pairs, 3)``: each sequence's ``(block, start, length)``). The model sees only the blocks
    (:mod:`ftbench.objectives.pair_forward`)."""

    def __init__(self, pad_id: int, max_length: int, pad_to_multiple_of: int = 1):
        from ftbench.data.packing import RowPackingCollator

        super().__init__(pad_id, pad_to_multiple_of, generation=False)
        self.rows = RowPackingCollator(pad_id, max_length, pad_to_multiple_of)

    def __call__(self, examples: Sequence[PreferenceExample]) -> dict[str, Any]:
        batch = super().__call__(examples)
        packed = self.rows([e.chosen for e in examples] + [e.rejected for e in examples])
        batch.update({f"packed_{k}": packed[k] for k in ("input_ids", "attention_mask", "labels", "position_ids", "segments")})
        return batch


class PreferenceData(SplitDataModule):
    """Prompt / chosen / rejected pairs, tokenised with the prompt masked, for preference methods.

    Built-in sets (``builtin:NAME``, ``builtin_size`` pairs, deterministic in ``seed``):

    - ``builtin:capitals``: a surface preference that a tiny reward model learns in a few dozen steps:
      "Repeat these words: apple river stone", chosen ``APPLE RIVER STONE`` (capital letters),
      rejected ``apple river stone``.
    - ``builtin:TASK`` for a task of :mod:`ftbench.data.tasks` (``instruction`` mixes them all):
      chosen = the right answer, rejected = a plausible wrong one (an off-by-a-few sum, two numbers
      swapped, another word of the list).

    Both give every row its exact ``answer`` (the chosen response), so validation and test batches
    also carry ``gen_input_ids``/``gen_attention_mask``/``answers`` for exact match; a file row can
    give one in an ``answer`` field.
    """

    regime = "preference"
    empty_train = "no training pairs left after the split and truncation"

    def __init__(
        self,
        *,
        source: Source = "builtin:instruction",
        format: Format = "auto",
        prompt_template: Literal["auto", "chat", "plain"] = "auto",
        system_prompt: Optional[str] = None,
        identical: Literal["warn", "drop", "error"] = "warn",
        packing: bool = False,
        **kwargs: Any,
    ):
        """
        Args:
            source: ``builtin:capitals`` (an easy surface preference: capital letters chosen, lower
                case rejected), ``builtin:TASK`` (pairs from ``ftbench.data.tasks``: chosen = the right
                answer, rejected = a plausible wrong one), a .jsonl/.json/.csv file, ``hf:NAME`` or a
                ``save_to_disk`` folder (a list reads several); rows in TRL's or LLaMA-Factory's
                preference forms, with an optional exact ``answer``; ``dataset_info:PATH#NAME`` reads the
                ranking set ``NAME`` of LLaMA-Factory's ``dataset_info.json``.
            format: The rows' form (``ftbench.data.formats``): ``auto`` (each row's by its fields), ``trl``
                (``prompt``/``chosen``/``rejected``, or ``chosen``/``rejected`` with the prompt their common
                prefix; strings or chat messages), ``alpaca`` (LLaMA-Factory's ``instruction``/``input``/
                ``system``/``history`` with ``chosen``/``rejected`` strings) or ``sharegpt``
                (``conversations`` ending with the user, ``chosen``/``rejected`` messages).
            prompt_template: ``chat`` (the tokenizer's chat template), ``plain`` (prompt text, then
                the response and EOS; chat rows need ``chat``), or ``auto`` (``chat`` when the
                tokenizer has a chat template).
            system_prompt: A system message put before every chat prompt that has none.
            identical: A pair whose chosen equals its rejected response: ``warn`` (keep, warn and
                count), ``drop`` (count and leave out) or ``error``.
            packing: Pack each training batch's chosen and rejected sequences into ``max_length``
                blocks, positions restarting at each sequence and no attention across them
                (``ftbench.data.packing``); objectives that read packed pairs (DPO, CPO, ORPO, the reward
                model) gather each sequence's log-probs or score from its segment. Validation and test
                batches are not packed.
            **kwargs: The arguments every regime shares (:class:`~ftbench.data.base.SplitDataModule`);
                ``batch_size`` counts pairs (each is two sequences), ``max_length`` each sequence,
                and a pair is truncated or dropped when either of its sequences is too long.
        """
        super().__init__(source=source, **kwargs)
        if format not in ("auto", "trl", "alpaca", "sharegpt"):
            raise ConfigError(f"data.format: {format!r} is not one of auto, trl, alpaca, sharegpt")
        self.format = format
        self.forms: dict[str, int] = {}
        self.prompt_template, self.system_prompt, self.identical = prompt_template, system_prompt, identical
        self.stats = TruncationStats()
        self.identical_count = {"seen": 0, "dropped": 0}
        self.set_row_packing(packing)

    # ------------------------------------------------------------------ rows
    def read_one(self, source: str) -> list[Row]:
        if source.startswith(BUILTIN):
            name = source[len(BUILTIN):]
            return [Row(r, f"{source}#{i + 1}", None) for i, r in enumerate(builtin_pairs(name, self.builtin_size, self.seed))]
        return read_source(source, "preference", self.format)

    def split_rows(self) -> dict[str, list[Row]]:
        """Train/val/test rows under the shared split rule (pairs with the same prompt share a split)."""
        parts = self.split(self.read(self.source), lambda row: prompt_key(parse_pair(row).prompt))
        return {name: self.limit(name, rows) for name, rows in parts.items()}

    # ------------------------------------------------------------------ tokenisation
    def template(self) -> str:
        has_chat = bool(getattr(self.backbone.tokenizer, "chat_template", None))
        if self.prompt_template == "auto":
            return "chat" if has_chat else "plain"
        if self.prompt_template == "chat" and not has_chat:
            raise ConfigError("data.prompt_template: 'chat' needs a tokenizer with a chat template (or backbone.chat_template)")
        return self.prompt_template

    def _encode(self, text: str, special: bool = False) -> list[int]:
        return self.backbone.tokenizer(text, add_special_tokens=special)["input_ids"]

    def tokenize(self, pair: Pair, template: str) -> tuple[list[int], list[int], list[int], str]:
        """Prompt, chosen and rejected token ids (the responses without the prompt), and the prompt text."""
        tok = self.backbone.tokenizer
        row = pair.row
        if template == "chat":
            prompt = pair.prompt if pair.chat else [{"role": "user", "content": pair.prompt}]
            if self.system_prompt is not None and prompt[0]["role"] != "system":
                prompt = [{"role": "system", "content": self.system_prompt}, *prompt]
            as_msgs = (lambda v: v) if pair.chat else (lambda v: [{"role": "assistant", "content": v}])
            prompt_text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            out = []
            for name, value in (("chosen", pair.chosen), ("rejected", pair.rejected)):
                full = tok.apply_chat_template(prompt + as_msgs(value), tokenize=False)
                if not full.startswith(prompt_text):
                    raise row.error(name, "the chat template does not render the prompt as a prefix of the conversation; use prompt_template 'plain'")
                out.append(self._encode(full[len(prompt_text):]))
            return self._encode(prompt_text), out[0], out[1], prompt_text
        if pair.chat:
            raise row.error("prompt" if "prompt" in row.fields else "chosen", "chat messages need prompt_template 'chat' (a tokenizer with a chat template)")
        prompt_text = pair.prompt if self.system_prompt is None else f"{self.system_prompt}\n\n{pair.prompt}"
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        return self._encode(prompt_text, special=True), self._encode(pair.chosen) + eos, self._encode(pair.rejected) + eos, prompt_text

    def encode(self, rows: list[Row], template: str) -> list[PreferenceExample]:
        out = []
        for row in rows:
            pair = parse_pair(row)
            if not completion_text(pair.chosen).strip() or not completion_text(pair.rejected).strip():
                self.__dict__.setdefault("empty_pairs", []).append(row)
            if completion_text(pair.chosen) == completion_text(pair.rejected):
                err = row.error("rejected", "equals 'chosen' (the pair teaches no preference)")
                if self.identical == "error":
                    raise err
                self.identical_count["seen"] += 1
                if self.identical == "drop":
                    self.identical_count["dropped"] += 1
                    continue
                if self.identical_count["seen"] <= MAX_WARNINGS:
                    warnings.warn(f"{err} (kept; data.identical: drop leaves such pairs out)", PreferenceDataWarning, stacklevel=2)
            prompt_ids, chosen_ids, rejected_ids, prompt_text = self.tokenize(pair, template)
            pair_stats = TruncationStats()  # counted per pair, not per sequence
            chosen = segments_to_example([(prompt_ids, False), (chosen_ids, True)], self.max_length, self.truncation, pair_stats)
            rejected = segments_to_example([(prompt_ids, False), (rejected_ids, True)], self.max_length, self.truncation, pair_stats)
            self.stats.seen += 1
            if chosen is None or rejected is None:
                self.stats.dropped += 1
                continue
            self.stats.truncated += int(pair_stats.truncated > 0)
            task = row.fields.get("task")
            task = task if isinstance(task, str) else None
            chosen.task = rejected.task = task
            out.append(PreferenceExample(chosen, rejected, prompt_ids[: self.max_length], task, pair.answer, prompt_text))
        return out

    def setup(self, stage: Optional[str] = None) -> None:
        if self.splits:
            return
        template = self.template()
        rows = self.split_rows()
        # the forms the rows came in (ftbench.data.formats), for the record: {"sharegpt": 60}
        self.forms = dict(Counter(row.form or "builtin" for part in rows.values() for row in part))
        self.stats = TruncationStats()
        self.identical_count = {"seen": 0, "dropped": 0}
        self.empty_pairs: list[Row] = []
        self.splits = {name: self.encode(r, template) for name, r in rows.items()}
        first = self.empty_pairs[0] if self.empty_pairs else None
        warn_empty_texts(self.source_name(), "chosen or rejected text", len(self.empty_pairs),
                         first and (f"{first.source}:{first.line}" if first.line else first.source))
        self.finish_setup(stage)

    # ------------------------------------------------------------------ loaders
    def collator(self, generation: bool = True) -> PreferenceCollator:
        return PreferenceCollator(self.backbone.tokenizer.pad_token_id, self.pad_to_multiple_of, generation)

    def packing_collator(self) -> PackedPairCollator:
        return PackedPairCollator(self.backbone.tokenizer.pad_token_id, self.max_length, self.pad_to_multiple_of)

    def item_lengths(self, item: PreferenceExample) -> list[int]:
        """A pair's two sequences (padded to one width unpacked, packed together)."""
        return [len(item.chosen.input_ids), len(item.rejected.input_ids)]

    def describe(self) -> dict[str, Any]:
        """What the record says about the data."""
        return {
            "regime": self.regime,
            "source": self.source,
            "format": self.format,
            "forms": self.forms,
            "rows": {k: len(v) for k, v in self.splits.items()},
            "removed_as_held_out": self.removed_as_held_out,
            "prompt_template": self.template(),
            "max_length": self.max_length,
            "truncation": {"policy": self.truncation, **self.stats.as_dict()},
            "identical_pairs": {"policy": self.identical, **self.identical_count},
            "packing": self.packing_record(),
        }
