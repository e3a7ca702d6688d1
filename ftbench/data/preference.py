"""Preference pairs: a prompt with a chosen and a rejected response, for reward models and DPO.

Accepted rows (the forms TRL and LLaMA-Factory read):

- TRL standard, explicit prompt: ``{"prompt": str, "chosen": str, "rejected": str}``
- TRL conversational, explicit prompt: ``{"prompt": [messages], "chosen": [assistant message],
  "rejected": [assistant message]}`` (messages are ``{"role", "content"}``)
- TRL conversational, implicit prompt: ``{"chosen": [messages], "rejected": [messages]}``; the
  prompt is the longest common run of leading messages
- LLaMA-Factory Alpaca: ``{"instruction", "input"?, "chosen": str, "rejected": str}``
- LLaMA-Factory ShareGPT: ``{"conversations": [{"from", "value"}], "chosen": {"from": "gpt",
  "value"}, "rejected": {...}}``

Each pair is tokenised into two sequences, prompt + chosen and prompt + rejected, with the prompt
tokens masked out of the labels (-100). A batch carries ``chosen_input_ids``,
``chosen_attention_mask``, ``chosen_labels``, the same three for ``rejected_*`` (both padded to one
width, so a DPO step can concatenate them into one forward), the left-padded prompt
(``prompt_input_ids``, ``prompt_attention_mask``), and ``input_ids``/``attention_mask``/``labels``
equal to the chosen sequence, so that any supervised method trains on the chosen responses.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from typing import Any, Literal, Optional, Sequence

import torch

from ftbench.backbone import Backbone
from ftbench.data import tasks
from ftbench.data.base import (
    SplitDataModule,
    IGNORE_INDEX,
    DataFormatError,
    Example,
    Row,
    TruncationStats,
    load_rows,
    pad_batch,
    segments_to_example,
    split_indices,
)

BUILTIN = "builtin:"
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
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


def builtin_pairs(task: str, n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` preference rows from a built-in task: chosen = the right answer, rejected = a wrong one."""
    rows = tasks.generate(task, n, seed)
    rng = random.Random(f"preference:{task}:{seed}")
    out = []
    for r in rows:
        prompt = f"{r['instruction']}\n\n{r['input']}" if r["input"] else r["instruction"]
        out.append({"prompt": prompt, "chosen": r["output"], "rejected": wrong_answer(r, rng), "task": r["task"]})
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


def _messages(row: Row, name: str, value: Any, sharegpt: bool = False) -> list[dict[str, str]]:
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise row.error(name, "must be a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(m, dict):
            raise row.error(where, "must be an object with 'role' and 'content'")
        if sharegpt:
            role, content = SHAREGPT_ROLES.get(m.get("from")), m.get("value")
            if role is None:
                raise row.error(f"{where}.from", f"unknown role {m.get('from')!r} (expected one of {', '.join(SHAREGPT_ROLES)})")
            if not isinstance(content, str):
                raise row.error(f"{where}.value", "missing or not a string")
        else:
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                raise row.error(f"{where}.role", f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
            if not isinstance(content, str):
                raise row.error(f"{where}.content", "missing or not a string")
        out.append({"role": role, "content": content})
    return out


def _check_turns(row: Row, named: list[tuple[str, dict[str, str]]]) -> None:
    """Roles alternate user/assistant after an optional leading system message; the prompt ends
    with a user turn so the completion is the assistant's."""
    start = 1 if named and named[0][1]["role"] == "system" else 0
    for k, (where, m) in enumerate(named[start:]):
        want = "user" if k % 2 == 0 else "assistant"
        if m["role"] != want:
            raise row.error(f"{where}.role", f"roles must alternate user/assistant: expected {want!r}, got {m['role']!r}")


def _named(field: str, msgs: list[dict[str, str]], offset: int = 0) -> list[tuple[str, dict[str, str]]]:
    return [(f"{field}[{offset + i}]", m) for i, m in enumerate(msgs)]


def parse_pair(row: Row) -> Pair:
    """Normalise one row of any accepted form (see the module docstring), checking its fields."""
    f = row.fields
    for name in ("chosen", "rejected"):
        if name not in f or f[name] is None:
            raise row.error(name, "missing")
    if "conversations" in f:  # LLaMA-Factory ShareGPT
        prompt = _messages(row, "conversations", f["conversations"], sharegpt=True)
        chosen = _messages(row, "chosen", f["chosen"], sharegpt=True)
        rejected = _messages(row, "rejected", f["rejected"], sharegpt=True)
        for name, msgs in (("chosen", chosen), ("rejected", rejected)):
            _check_turns(row, _named("conversations", prompt) + _named(name, msgs))
        return Pair(prompt, chosen, rejected, True, row)
    if isinstance(f["chosen"], list) or isinstance(f.get("prompt"), list):
        chosen = _messages(row, "chosen", f["chosen"])
        rejected = _messages(row, "rejected", f["rejected"])
        if "prompt" in f and f["prompt"] is not None:
            prompt = _messages(row, "prompt", f["prompt"])
            for name, msgs in (("chosen", chosen), ("rejected", rejected)):
                _check_turns(row, _named("prompt", prompt) + _named(name, msgs))
            return Pair(prompt, chosen, rejected, True, row)
        # implicit prompt: the shared leading messages, up to the last user turn before they differ
        for name, msgs in (("chosen", chosen), ("rejected", rejected)):
            _check_turns(row, _named(name, msgs))
        k = 0
        while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
            k += 1
        while k > 0 and chosen[k - 1]["role"] != "user":
            k -= 1
        if k == 0:
            raise row.error("chosen", "no prompt: give 'prompt', or start 'chosen' and 'rejected' with the same user turn")
        return Pair(chosen[:k], chosen[k:], rejected[k:], True, row)
    if "prompt" in f:
        prompt = row.get_str("prompt")
    elif "instruction" in f:  # LLaMA-Factory Alpaca
        inst, inp = row.get_str("instruction"), row.get_str("input", required=False)
        prompt = f"{inst}\n\n{inp}" if inp else inst
    else:
        raise row.error("prompt", "missing (give 'prompt', 'instruction', 'conversations' or chat lists)")
    return Pair(prompt, row.get_str("chosen"), row.get_str("rejected"), False, row)


def completion_text(value: Any) -> str:
    return value if isinstance(value, str) else "\n".join(m["content"] for m in value)


# ---------------------------------------------------------------------------- tokenisation
@dataclass
class PreferenceExample:
    chosen: Example
    rejected: Example
    prompt_ids: list[int]
    task: Optional[str] = None


class PreferenceCollator:
    """Pads chosen and rejected (right, to one common width) and the prompts (left)."""

    def __init__(self, pad_id: int, pad_to_multiple_of: int = 1):
        self.pad_id, self.multiple_of = pad_id, pad_to_multiple_of

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
        prompts = [e.prompt_ids for e in examples]
        batch["prompt_input_ids"] = pad_batch(prompts, self.pad_id, left=True)
        width = batch["prompt_input_ids"].shape[1]
        plen = torch.tensor([len(p) for p in prompts])
        batch["prompt_attention_mask"] = (torch.arange(width)[None, :] >= (width - plen)[:, None]).long()
        # the chosen sequence under the plain names: a supervised method trains on the chosen responses
        batch["input_ids"], batch["attention_mask"], batch["labels"] = (
            batch["chosen_input_ids"], batch["chosen_attention_mask"], batch["chosen_labels"])
        if any(e.task is not None for e in examples):
            batch["tasks"] = [e.task or "default" for e in examples]
        return batch


class PreferenceData(SplitDataModule):
    """Prompt / chosen / rejected pairs, tokenised with the prompt masked, for preference methods."""

    def __init__(
        self,
        backbone: Optional[Backbone] = None,
        source: str = "builtin:instruction",
        val_source: Optional[str] = None,
        test_source: Optional[str] = None,
        prompt_template: Literal["auto", "chat", "plain"] = "auto",
        system_prompt: Optional[str] = None,
        max_length: int = 512,
        truncation: Literal["truncate", "drop"] = "truncate",
        identical: Literal["warn", "drop", "error"] = "warn",
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        builtin_size: int = 2000,
        max_train_rows: Optional[int] = None,
        max_eval_rows: Optional[int] = None,
        batch_size: int = 8,
        eval_batch_size: Optional[int] = None,
        pad_to_multiple_of: int = 1,
        num_workers: int = 0,
        seed: int = 42,
    ):
        """
        Args:
            backbone: The shared backbone (linked from the top-level ``backbone`` by the CLI).
            source: ``builtin:TASK`` (pairs from ``ftbench.data.tasks``: chosen = the right answer,
                rejected = a plausible wrong one), a .jsonl/.json/.csv file, ``hf:NAME`` or a
                ``save_to_disk`` folder; rows in TRL's or LLaMA-Factory's preference forms.
            val_source: Validation rows; when absent, ``val_fraction`` of ``source`` is held out.
            test_source: Test rows; when absent, ``test_fraction`` of ``source`` is held out.
            prompt_template: ``chat`` (the tokenizer's chat template), ``plain`` (prompt text, then
                the response and EOS; chat rows need ``chat``), or ``auto`` (``chat`` when the
                tokenizer has a chat template).
            system_prompt: A system message put before every chat prompt that has none.
            max_length: Longest tokenised sequence, prompt and response together.
            truncation: Longer pairs are ``truncate``d (the end cut) or ``drop``ped. Counted.
            identical: A pair whose chosen equals its rejected response: ``warn`` (keep, warn and
                count), ``drop`` (count and leave out) or ``error``.
            val_fraction: Share of ``source`` held out for validation when there is no ``val_source``.
            test_fraction: Share of ``source`` held out for testing when there is no ``test_source``.
            builtin_size: Rows generated for a ``builtin:`` source (before the split).
            max_train_rows: Use at most this many training pairs (after the split).
            max_eval_rows: Use at most this many validation and test pairs each.
            batch_size: Training micro-batch size (pairs; each is two sequences).
            eval_batch_size: Validation/test batch size (default: ``batch_size``).
            pad_to_multiple_of: Round padded lengths up (8 helps tensor cores on GPU).
            num_workers: DataLoader workers.
            seed: Seed of the split and of the training order.
        """
        super().__init__()
        self.backbone = backbone or Backbone()
        self.source, self.val_source, self.test_source = source, val_source, test_source
        self.prompt_template, self.system_prompt = prompt_template, system_prompt
        self.max_length, self.truncation, self.identical = max_length, truncation, identical
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.builtin_size = builtin_size
        self.max_train_rows, self.max_eval_rows = max_train_rows, max_eval_rows
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.pad_to_multiple_of, self.num_workers, self.seed = pad_to_multiple_of, num_workers, seed
        self.stats = TruncationStats()
        self.identical_count = {"seen": 0, "dropped": 0}
        self.splits: dict[str, list[PreferenceExample]] = {}

    # ------------------------------------------------------------------ rows
    def _rows(self, source: str) -> list[Row]:
        if source.startswith(BUILTIN):
            name = source[len(BUILTIN):]
            return [Row(r, f"{source}#{i + 1}", None) for i, r in enumerate(builtin_pairs(name, self.builtin_size, self.seed))]
        return load_rows(source)

    def split_rows(self) -> dict[str, list[Row]]:
        rows = self._rows(self.source)
        fractions = [0.0 if self.val_source else self.val_fraction, 0.0 if self.test_source else self.test_fraction]
        val_idx, test_idx, train_idx = split_indices(len(rows), fractions, self.seed)
        out = {
            "train": [rows[i] for i in train_idx],
            "val": self._rows(self.val_source) if self.val_source else [rows[i] for i in val_idx],
            "test": self._rows(self.test_source) if self.test_source else [rows[i] for i in test_idx],
        }
        if self.max_train_rows is not None:
            out["train"] = out["train"][: self.max_train_rows]
        if self.max_eval_rows is not None:
            out["val"], out["test"] = out["val"][: self.max_eval_rows], out["test"][: self.max_eval_rows]
        return out

    # ------------------------------------------------------------------ tokenisation
    def template(self) -> str:
        has_chat = bool(getattr(self.backbone.tokenizer, "chat_template", None))
        if self.prompt_template == "auto":
            return "chat" if has_chat else "plain"
        if self.prompt_template == "chat" and not has_chat:
            raise ValueError("data.prompt_template: 'chat' needs a tokenizer with a chat template (or backbone.chat_template)")
        return self.prompt_template

    def _encode(self, text: str, special: bool = False) -> list[int]:
        return self.backbone.tokenizer(text, add_special_tokens=special)["input_ids"]

    def tokenize(self, pair: Pair, template: str) -> tuple[list[int], list[int], list[int]]:
        """Prompt, chosen and rejected token ids (the responses without the prompt)."""
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
            return self._encode(prompt_text), out[0], out[1]
        if pair.chat:
            raise row.error("prompt" if "prompt" in row.fields else "chosen", "chat messages need prompt_template 'chat' (a tokenizer with a chat template)")
        prompt_text = pair.prompt if self.system_prompt is None else f"{self.system_prompt}\n\n{pair.prompt}"
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        return self._encode(prompt_text, special=True), self._encode(pair.chosen) + eos, self._encode(pair.rejected) + eos

    def encode(self, rows: list[Row], template: str) -> list[PreferenceExample]:
        out = []
        for row in rows:
            pair = parse_pair(row)
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
            prompt_ids, chosen_ids, rejected_ids = self.tokenize(pair, template)
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
            out.append(PreferenceExample(chosen, rejected, prompt_ids[: self.max_length], task))
        return out

    def setup(self, stage: Optional[str] = None) -> None:
        if self.splits:
            return
        template = self.template()
        rows = self.split_rows()
        self.stats = TruncationStats()
        self.identical_count = {"seen": 0, "dropped": 0}
        self.splits = {name: self.encode(r, template) for name, r in rows.items()}
        if not self.splits["train"] and stage in (None, "fit"):
            raise DataFormatError(self.source, None, None, "no training pairs left after the split and truncation")

    # ------------------------------------------------------------------ loaders
    def collator(self) -> PreferenceCollator:
        return PreferenceCollator(self.backbone.tokenizer.pad_token_id, self.pad_to_multiple_of)


    def describe(self) -> dict[str, Any]:
        """What the record says about the data."""
        return {
            "regime": "preference",
            "source": self.source,
            "rows": {k: len(v) for k, v in self.splits.items()},
            "prompt_template": self.template(),
            "max_length": self.max_length,
            "truncation": {"policy": self.truncation, **self.stats.as_dict()},
            "identical_pairs": {"policy": self.identical, **self.identical_count},
        }
