"""Instruction fine-tuning: instruction-response pairs, prompt tokens masked out of the loss."""

from __future__ import annotations

import string
from typing import Any, Literal, Optional


from ftbench.backbone import Backbone
from ftbench.data import tasks
from ftbench.data.base import (
    SplitDataModule,
    Collator,
    DataFormatError,
    Example,
    Row,
    TruncationStats,
    load_rows,
    segments_to_example,
    split_indices,
)

BUILTIN = "builtin:"
ANSWER_SLACK = 4  # tokens allowed past the longest reference answer: EOS and white space
ROLES = ("system", "user", "assistant")

PROMPT_TEMPLATES = {
    "alpaca": (
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n",
    ),
    "short": (
        "### Instruction:\n{instruction}\n{input}\n### Response:\n",
        "### Instruction:\n{instruction}\n### Response:\n",
    ),
}


class Formatter:
    """Turns a row (Alpaca or chat) into token segments ``(ids, trained)`` and a generation prompt."""

    def __init__(self, tokenizer, prompt_template: str = "auto", system_prompt: Optional[str] = None):
        self.tok = tokenizer
        if prompt_template == "auto":
            prompt_template = "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"
        if prompt_template not in ("chat", *PROMPT_TEMPLATES) and "{instruction}" not in prompt_template:
            raise ValueError(
                f"data.prompt_template: {prompt_template!r} is not 'auto', 'chat', "
                f"{', '.join(repr(k) for k in PROMPT_TEMPLATES)} or a format string with {{instruction}}"
            )
        if prompt_template not in ("chat", *PROMPT_TEMPLATES):
            try:
                fields = {f for _, f, _, _ in string.Formatter().parse(prompt_template) if f is not None}
            except ValueError as err:
                raise ValueError(f"data.prompt_template: not a valid format string: {err}") from err
            if fields - {"instruction", "input"}:
                raise ValueError(
                    f"data.prompt_template: unknown field(s) {', '.join('{' + f + '}' for f in sorted(fields - {'instruction', 'input'}))} "
                    "in the format string (use {instruction} and {input}; write {{ and }} for literal braces)"
                )
        if prompt_template == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("data.prompt_template: 'chat' needs a tokenizer with a chat template (or backbone.chat_template)")
        self.template = prompt_template
        self.system_prompt = system_prompt

    # -- rows -> messages / prompt text
    def messages(self, row: Row) -> list[dict[str, str]]:
        """The row as chat messages, validated (roles known and alternating, last one assistant)."""
        if "messages" in row.fields:
            msgs = row.fields["messages"]
            if not isinstance(msgs, list) or not msgs:
                raise row.error("messages", "must be a non-empty list of {role, content} objects")
            out = []
            for i, m in enumerate(msgs):
                name = f"messages[{i}]"
                if not isinstance(m, dict):
                    raise row.error(name, "must be an object with 'role' and 'content'")
                role, content = m.get("role"), m.get("content")
                if role not in ROLES:
                    raise row.error(f"{name}.role", f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
                if not isinstance(content, str):
                    raise row.error(f"{name}.content", "missing or not a string")
                out.append({"role": role, "content": content})
            turns = out[1:] if out[0]["role"] == "system" else out
            for i, m in enumerate(turns):
                want = "user" if i % 2 == 0 else "assistant"
                if m["role"] != want:
                    idx = i + (len(out) - len(turns))
                    raise row.error(f"messages[{idx}].role", f"roles must alternate user/assistant: expected {want!r}, got {m['role']!r}")
            if out[-1]["role"] != "assistant":
                raise row.error(f"messages[{len(out) - 1}].role", "the last message must be from the assistant")
        else:
            instruction = row.get_str("instruction")
            inp = row.get_str("input", required=False)
            output = row.get_str("output")
            user = f"{instruction}\n\n{inp}" if inp else instruction
            out = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        if self.system_prompt is not None and out[0]["role"] != "system":
            out.insert(0, {"role": "system", "content": self.system_prompt})
        return out

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _encode(self, text: str, special: bool = False) -> list[int]:
        return self.tok(text, add_special_tokens=special)["input_ids"]

    def segments(self, row: Row) -> tuple[list[tuple[list[int], bool]], list[int], str]:
        """Token segments (trained or not), the prompt ids for generation, and the reference answer."""
        msgs = self.messages(row)
        if self.template == "chat":
            segs: list[tuple[list[int], bool]] = []
            done = ""
            prompt_ids: list[int] = []
            for i, m in enumerate(msgs):
                if m["role"] != "assistant":
                    continue
                prompt = self._render(msgs[:i], True)
                full = self._render(msgs[: i + 1], False)
                if not (prompt.startswith(done) and full.startswith(prompt)):
                    raise row.error("messages", "the chat template does not render turns as prefixes of each other; use a prompt_template")
                segs.append((self._encode(prompt[len(done) :]), False))
                prompt_ids = [t for s, _ in segs for t in s]
                segs.append((self._encode(full[len(prompt) :]), True))
                done = full
            return segs, prompt_ids, msgs[-1]["content"]
        if "messages" in row.fields:
            if len(msgs) - (msgs[0]["role"] == "system") != 2:
                raise row.error("messages", f"multi-turn chat rows need prompt_template 'chat', not {self.template!r}")
            instruction, inp = msgs[-2]["content"], ""
        else:
            instruction, inp = row.get_str("instruction"), row.get_str("input", required=False)
        if self.template in PROMPT_TEMPLATES:
            with_input, without = PROMPT_TEMPLATES[self.template]
            prompt = (with_input if inp else without).format(instruction=instruction, input=inp)
        else:
            if inp and "{input}" not in self.template:
                raise row.error("input", "the prompt_template has no {input}, so this row's input would be dropped")
            prompt = self.template.format(instruction=instruction, input=inp)
        if msgs[0]["role"] == "system" and msgs[0]["content"]:  # an empty one (system_prompt: "") adds nothing
            prompt = f"{msgs[0]['content']}\n\n{prompt}"
        prompt_ids = self._encode(prompt, special=True)
        answer = msgs[-1]["content"]
        answer_ids = self._encode(answer)
        if self.tok.eos_token_id is not None:
            answer_ids = answer_ids + [self.tok.eos_token_id]
        return [(prompt_ids, False), (answer_ids, True)], prompt_ids, answer


class InstructionData(SplitDataModule):
    """Instruction-response pairs (Alpaca rows or chat ``messages``) with prompt tokens masked."""

    def __init__(
        self,
        backbone: Optional[Backbone] = None,
        source: str = "builtin:instruction",
        val_source: Optional[str] = None,
        test_source: Optional[str] = None,
        prompt_template: str = "auto",
        system_prompt: Optional[str] = None,
        max_length: int = 512,
        truncation: Literal["truncate", "drop"] = "truncate",
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
            source: ``builtin:TASK`` (see ``ftbench.data.tasks``), a .jsonl/.json/.csv file, ``hf:NAME``
                for ``datasets.load_dataset`` or a ``save_to_disk`` folder.
            val_source: Validation rows; when absent, ``val_fraction`` of ``source`` is held out.
            test_source: Test rows (exact-match evaluation); when absent, ``test_fraction`` is held out.
            prompt_template: ``auto`` (the tokenizer's chat template if it has one, else ``alpaca``),
                ``chat``, ``alpaca``, ``short``, or a format string with ``{instruction}`` and ``{input}``.
            system_prompt: A system message put before every row that has none.
            max_length: Longest tokenised row, prompt and response together.
            truncation: What to do with longer rows: ``truncate`` (cut the end) or ``drop``. Counted.
            val_fraction: Share of ``source`` held out for validation when there is no ``val_source``.
            test_fraction: Share of ``source`` held out for testing when there is no ``test_source``.
            builtin_size: Rows generated for a ``builtin:`` source (before the split).
            max_train_rows: Use at most this many training rows (after the split).
            max_eval_rows: Use at most this many validation and test rows each.
            batch_size: Training micro-batch size.
            eval_batch_size: Validation/test batch size (default: ``batch_size``).
            pad_to_multiple_of: Round padded lengths up (8 helps tensor cores on GPU).
            num_workers: DataLoader workers.
            seed: Seed of the split and of the training order.
        """
        super().__init__()
        self.backbone = backbone or Backbone()
        self.source, self.val_source, self.test_source = source, val_source, test_source
        self.prompt_template, self.system_prompt = prompt_template, system_prompt
        self.max_length, self.truncation = max_length, truncation
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.builtin_size = builtin_size
        self.max_train_rows, self.max_eval_rows = max_train_rows, max_eval_rows
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.pad_to_multiple_of, self.num_workers, self.seed = pad_to_multiple_of, num_workers, seed
        self.stats = TruncationStats()
        self.splits: dict[str, list[Example]] = {}
        self.max_answer_tokens: Optional[int] = None

    # ------------------------------------------------------------------ rows
    def _rows(self, source: str) -> list[Row]:
        if source.startswith(BUILTIN):
            name = source[len(BUILTIN) :]
            return [Row(r, f"{source}#{i + 1}", None) for i, r in enumerate(tasks.generate(name, self.builtin_size, self.seed))]
        return load_rows(source)

    def split_rows(self) -> dict[str, list[Row]]:
        """Train/val/test rows: explicit sources where given, else a deterministic split of ``source``.
        Rows whose prompt also appears in val or test are removed from train (no leakage)."""
        rows = self._rows(self.source)
        fractions = [0.0 if self.val_source else self.val_fraction, 0.0 if self.test_source else self.test_fraction]
        val_idx, test_idx, train_idx = split_indices(len(rows), fractions, self.seed)
        out = {
            "train": [rows[i] for i in train_idx],
            "val": self._rows(self.val_source) if self.val_source else [rows[i] for i in val_idx],
            "test": self._rows(self.test_source) if self.test_source else [rows[i] for i in test_idx],
        }
        held_out = {self._prompt_key(r) for r in out["val"] + out["test"]}
        out["train"] = [r for r in out["train"] if self._prompt_key(r) not in held_out]
        if self.max_train_rows is not None:
            out["train"] = out["train"][: self.max_train_rows]
        if self.max_eval_rows is not None:
            out["val"], out["test"] = out["val"][: self.max_eval_rows], out["test"][: self.max_eval_rows]
        return out

    @staticmethod
    def _prompt_key(row: Row) -> str:
        f = row.fields
        if "messages" in f and isinstance(f["messages"], list):
            return repr([m for m in f["messages"][:-1]])
        return repr((f.get("instruction"), f.get("input") or ""))

    # ------------------------------------------------------------------ tokenisation
    def formatter(self) -> Formatter:
        return Formatter(self.backbone.tokenizer, self.prompt_template, self.system_prompt)

    def encode(self, rows: list[Row], formatter: Formatter, for_eval: bool) -> list[Example]:
        out = []
        for row in rows:
            segs, prompt_ids, answer = formatter.segments(row)
            ex = segments_to_example(segs, self.max_length, self.truncation, self.stats)
            if ex is None:
                continue
            if for_eval:
                ex.prompt_ids, ex.answer = prompt_ids, answer
            task = row.fields.get("task")
            ex.task = task if isinstance(task, str) else None
            out.append(ex)
        return out

    def setup(self, stage: Optional[str] = None) -> None:
        if self.splits:
            return
        formatter = self.formatter()
        rows = self.split_rows()
        self.stats = TruncationStats()
        self.splits = {name: self.encode(r, formatter, for_eval=name != "train") for name, r in rows.items()}
        # greedy generation never needs more than the longest reference answer (+ EOS and slack)
        answers = [e.answer for split in ("val", "test") for e in self.splits[split] if e.answer is not None]
        if answers:
            tok = self.backbone.tokenizer
            self.max_answer_tokens = max(len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers) + ANSWER_SLACK
        if not self.splits["train"] and stage in (None, "fit"):
            raise DataFormatError(self.source, None, None, "no training rows left after the split and truncation")

    # ------------------------------------------------------------------ loaders
    def collator(self) -> Collator:
        return Collator(self.backbone.tokenizer.pad_token_id, self.pad_to_multiple_of)

    def describe(self) -> dict[str, Any]:
        """What the record says about the data."""
        return {
            "regime": "instruction",
            "source": self.source,
            "rows": {k: len(v) for k, v in self.splits.items()},
            "prompt_template": Formatter(self.backbone.tokenizer, self.prompt_template).template,
            "max_length": self.max_length,
            "max_answer_tokens": self.max_answer_tokens,
            "truncation": {"policy": self.truncation, **self.stats.as_dict()},
        }
