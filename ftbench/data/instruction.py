"""Instruction fine-tuning: instruction-response pairs, prompt tokens masked out of the loss."""

from __future__ import annotations

import string
from collections import Counter
from typing import Any, NamedTuple, Optional

from ftbench.data import tasks
from ftbench.data.base import (
    Collator,
    Example,
    Row,
    Source,
    SplitDataModule,
    TruncationStats,
    chat_messages,
    check_conversation,
    prompt_key,
    row_choices,
    segments_to_example,
    warn_empty_texts,
)
from ftbench.data.formats import PROMPT_TURNS, Format, read_source
from ftbench.errors import ConfigError

BUILTIN = "builtin:"

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


class Formatted(NamedTuple):
    """A formatted row: token segments ``(ids, trained)``, the generation prompt's ids, the reference
    answer and the rendered prompt text."""

    segments: list[tuple[list[int], bool]]
    prompt_ids: list[int]
    answer: str
    prompt_text: str


def conversation(row: Row) -> list[dict[str, str]]:
    """An instruction row as chat messages, validated by the shared chat check (roles known and
    alternating, the last one the assistant's): its ``messages``, or the Alpaca fields as one turn.
    A multiple-choice row (``choices`` and ``gold``) without ``output`` answers with its gold choice.
    Rows of other forms (TRL's prompt-completion, LLaMA-Factory's) arrive converted to these two
    (:mod:`ftbench.data.formats`)."""
    if "messages" in row.fields:
        msgs = chat_messages(row, "messages", row.fields["messages"])
        check_conversation(row, ("messages", msgs))
        return msgs
    instruction = row.get_str("instruction")
    inp = row.get_str("input", required=False)
    mc = row_choices(row)
    output = row.get_str("output", required=mc is None, default=mc[0][mc[1]] if mc else "")
    user = f"{instruction}\n\n{inp}" if inp else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


class Formatter:
    """Turns a row (Alpaca or chat) into token segments ``(ids, trained)`` and a generation prompt."""

    def __init__(self, tokenizer, prompt_template: str = "auto", system_prompt: Optional[str] = None):
        self.tok = tokenizer
        if prompt_template == "auto":
            prompt_template = "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"
        if prompt_template not in ("chat", *PROMPT_TEMPLATES) and "{instruction}" not in prompt_template:
            raise ConfigError(
                f"data.prompt_template: {prompt_template!r} is not 'auto', 'chat', "
                f"{', '.join(repr(k) for k in PROMPT_TEMPLATES)} or a format string with {{instruction}}"
            )
        if prompt_template not in ("chat", *PROMPT_TEMPLATES):
            try:
                fields = {f for _, f, _, _ in string.Formatter().parse(prompt_template) if f is not None}
            except ValueError as err:
                raise ConfigError(f"data.prompt_template: not a valid format string: {err}") from err
            if fields - {"instruction", "input"}:
                raise ConfigError(
                    f"data.prompt_template: unknown field(s) {', '.join('{' + f + '}' for f in sorted(fields - {'instruction', 'input'}))} "
                    "in the format string (use {instruction} and {input}; write {{ and }} for literal braces)"
                )
        if prompt_template == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ConfigError("data.prompt_template: 'chat' needs a tokenizer with a chat template (or backbone.chat_template)")
        self.template = prompt_template
        self.system_prompt = system_prompt

    # -- rows -> messages / prompt text
    def messages(self, row: Row) -> tuple[list[dict[str, str]], int]:
        """The row as chat messages (:func:`conversation`) with the system prompt put first when it has
        none, and the index of the first message that may be trained (a converted prompt-completion
        row's prompt is context, its assistant turns included; see ``ftbench.data.formats``)."""
        out = conversation(row)
        first_trained = row.fields.get(PROMPT_TURNS, 0)
        if self.system_prompt is not None and out[0]["role"] != "system":
            out.insert(0, {"role": "system", "content": self.system_prompt})
            first_trained += 1
        return out, first_trained

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _encode(self, text: str, special: bool = False) -> list[int]:
        return self.tok(text, add_special_tokens=special)["input_ids"]

    def segments(self, row: Row) -> "Formatted":
        """Token segments (trained or not), the prompt ids for generation, the reference answer and
        the prompt as text."""
        msgs, first_trained = self.messages(row)
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
                segs.append((self._encode(full[len(prompt) :]), i >= first_trained))
                done = full
            return Formatted(segs, prompt_ids, msgs[-1]["content"], prompt)
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
        return Formatted([(prompt_ids, False), (answer_ids, True)], prompt_ids, answer, prompt)


class InstructionData(SplitDataModule):
    """Instruction-response pairs (Alpaca rows or chat ``messages``) with prompt tokens masked."""

    regime = "instruction"

    def __init__(
        self,
        *,
        source: Source = "builtin:instruction",
        format: Format = "auto",
        prompt_template: str = "auto",
        system_prompt: Optional[str] = None,
        packing: bool = False,
        **kwargs: Any,
    ):
        """
        Args:
            source: ``builtin:TASK`` (see ``ftbench.data.tasks``), a .jsonl/.json/.csv file, ``hf:NAME``
                for ``datasets.load_dataset`` or a ``save_to_disk`` folder (a list reads several).
                Rows: ``{instruction, input?, output}`` or chat ``{messages: [{role, content}]}``;
                a multiple-choice row adds ``choices`` (the options) and ``gold`` (the right one's index;
                ``output`` defaults to that option). ``dataset_info:PATH#NAME`` reads the set ``NAME`` of
                LLaMA-Factory's ``dataset_info.json`` (its ``file_name``, ``formatting``, ``columns``, ``tags``).
            format: The rows' form (``ftbench.data.formats``): ``auto`` (each row's by its fields), ``trl``
                (``messages``, or ``prompt``/``completion`` as strings or chat messages), ``alpaca``
                (LLaMA-Factory's: ``instruction``, ``input``, ``output``, ``system``, ``history``) or
                ``sharegpt`` (``conversations: [{from, value}]``, roles human/gpt/system/observation/function_call).
            prompt_template: ``auto`` (the tokenizer's chat template if it has one, else ``alpaca``),
                ``chat``, ``alpaca``, ``short``, or a format string with ``{instruction}`` and ``{input}``.
            system_prompt: A system message put before every row that has none.
            packing: Pack each training batch's rows into ``max_length`` blocks, positions restarting
                at each row and no attention across rows (``ftbench.data.packing``; TRL's
                ``padding_free``): the same rows and loss, less padding. Validation and test batches
                are not packed.
            **kwargs: The arguments every regime shares (:class:`~ftbench.data.base.SplitDataModule`).
        """
        super().__init__(source=source, **kwargs)
        if format not in ("auto", "trl", "alpaca", "sharegpt"):
            raise ConfigError(f"data.format: {format!r} is not one of auto, trl, alpaca, sharegpt")
        self.format = format
        self.forms: dict[str, int] = {}
        self.prompt_template, self.system_prompt = prompt_template, system_prompt
        self.stats = TruncationStats()
        self.set_row_packing(packing)

    # ------------------------------------------------------------------ rows
    def read_one(self, source: str) -> list[Row]:
        if source.startswith(BUILTIN):
            name = source[len(BUILTIN) :]
            return [Row(r, f"{source}#{i + 1}", None) for i, r in enumerate(tasks.generate(name, self.builtin_size, self.seed))]
        return read_source(source, "instruction", self.format)

    def split_rows(self) -> dict[str, list[Row]]:
        """Train/val/test rows under the shared split rule (rows with the same prompt share a split)."""
        parts = self.split(self.read(self.source), lambda row: prompt_key(conversation(row)[:-1]))
        return {name: self.limit(name, rows) for name, rows in parts.items()}

    # ------------------------------------------------------------------ tokenisation
    def formatter(self) -> Formatter:
        return Formatter(self.backbone.tokenizer, self.prompt_template, self.system_prompt)

    def encode(self, rows: list[Row], formatter: Formatter) -> list[Example]:
        out = []
        for row in rows:
            f = formatter.segments(row)
            if not f.answer.strip():
                self.__dict__.setdefault("empty_outputs", []).append(row)
            ex = segments_to_example(f.segments, self.max_length, self.truncation, self.stats)
            if ex is None:
                continue
            ex.prompt_ids, ex.answer, ex.prompt_text = f.prompt_ids, f.answer, f.prompt_text
            mc = row_choices(row)
            if mc is not None:  # options scored as continuations of the prompt, tokenised as the answer is
                ex.choices, ex.gold = mc
                ex.choice_ids = [formatter._encode(c) for c in ex.choices]
            task = row.fields.get("task")
            ex.task = task if isinstance(task, str) else None
            out.append(ex)
        return out

    def setup(self, stage: Optional[str] = None) -> None:
        if self.splits:
            return
        formatter = self.formatter()
        rows = self.split_rows()
        # the forms the rows came in (ftbench.data.formats), for the record: {"sharegpt": 60}
        self.forms = dict(Counter(row.form or "builtin" for part in rows.values() for row in part))
        self.stats = TruncationStats()
        self.empty_outputs: list[Row] = []
        self.splits = {name: self.encode(r, formatter) for name, r in rows.items()}
        first = self.empty_outputs[0] if self.empty_outputs else None
        warn_empty_texts(self.source_name(), "output", len(self.empty_outputs),
                         first and (f"{first.source}:{first.line}" if first.line else first.source))
        self.finish_setup(stage)

    # ------------------------------------------------------------------ loaders
    def collator(self, generation: bool = True) -> Collator:
        return Collator(self.backbone.tokenizer.pad_token_id, self.pad_to_multiple_of, generation)

    def describe(self) -> dict[str, Any]:
        """What the record says about the data."""
        return {
            "regime": self.regime,
            "source": self.source,
            "format": self.format,
            "forms": self.forms,
            "rows": {k: len(v) for k, v in self.splits.items()},
            "removed_as_held_out": self.removed_as_held_out,
            "prompt_template": Formatter(self.backbone.tokenizer, self.prompt_template).template,
            "max_length": self.max_length,
            "max_answer_tokens": self.max_answer_tokens,
            "truncation": {"policy": self.truncation, **self.stats.as_dict()},
            "metrics": self.metric_names(),
            "packing": self.packing_record(),
        }
