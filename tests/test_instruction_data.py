"""Instruction data: prompt masking (exact labels), format errors (exact messages), the split,
truncation, dynamic padding and the generation prompts. Offline, CPU, tiny tokenizer."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from ftbench.data.base import IGNORE_INDEX, Collator, DataFormatError, Example, PromptCollator, Row, group_split, prompt_key
from ftbench.data.instruction import PROMPT_TEMPLATES, Formatter, InstructionData, conversation

M = IGNORE_INDEX


@pytest.fixture
def tok(backbone):
    return backbone.tokenizer


def enc(tok, text: str) -> list[int]:
    """Plain BPE ids of a piece of text, no special tokens added."""
    return tok(text, add_special_tokens=False)["input_ids"]


def sid(tok, token: str) -> int:
    i = tok.convert_tokens_to_ids(token)
    assert isinstance(i, int) and i != tok.unk_token_id
    return i


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def data(backbone, **kw) -> InstructionData:
    kw.setdefault("batch_size", 4)
    return InstructionData(backbone=backbone, **kw)


# ---------------------------------------------------------------------------- masking
ROW = {"instruction": "What is 12 + 30?", "input": "", "output": "42"}


def test_tiny_tokenizer_is_what_the_expectations_assume(tok):
    # the expected labels below are built from these facts, not from the formatter
    assert len(tok) == 512
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|endoftext|>", "<|im_end|>", "<pad>")
    assert tok("x", add_special_tokens=True)["input_ids"] == tok("x", add_special_tokens=False)["input_ids"]


def test_chat_masking_exact_labels(backbone, tok):
    """ChatML: '<|im_start|>user\\n{q}<|im_end|>\\n<|im_start|>assistant\\n' is masked,
    '{answer}<|im_end|>\\n' is trained."""
    start, end = sid(tok, "<|im_start|>"), sid(tok, "<|im_end|>")
    prompt = [start, *enc(tok, "user\nWhat is 12 + 30?"), end, *enc(tok, "\n"), start, *enc(tok, "assistant\n")]
    answer = [*enc(tok, "42"), end, *enc(tok, "\n")]

    fmt = Formatter(tok, "auto")
    assert fmt.template == "chat"
    segs, prompt_ids, ref, text = fmt.segments(Row(dict(ROW), "mem", 1))
    ids = [t for s, _ in segs for t in s]
    labels = [t if trained else M for s, trained in segs for t in s]
    assert ids == prompt + answer
    assert labels == [M] * len(prompt) + answer
    assert prompt_ids == prompt
    assert ref == "42"
    assert text == "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n"

    # and the same through the data module (which is what training sees)
    dm = data(backbone, source="builtin:arithmetic", builtin_size=20)
    [ex] = dm.encode([Row(dict(ROW), "mem", 1)], dm.formatter())
    assert ex.input_ids == prompt + answer
    assert ex.labels == [M] * len(prompt) + answer
    assert ex.prompt_ids == prompt and ex.answer == "42" and ex.prompt_text == text


def test_chat_multi_turn_masks_every_user_turn(tok):
    start, end = sid(tok, "<|im_start|>"), sid(tok, "<|im_end|>")
    nl = enc(tok, "\n")
    row = Row({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 1 + 1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
    ]}, "mem", 1)
    p1 = [start, *enc(tok, "system\nBe brief."), end, *nl, start, *enc(tok, "user\nWhat is 1 + 1?"), end, *nl,
          start, *enc(tok, "assistant\n")]
    a1 = [*enc(tok, "2"), end, *nl]
    p2 = [start, *enc(tok, "user\nWhat is 2 + 2?"), end, *nl, start, *enc(tok, "assistant\n")]
    a2 = [*enc(tok, "4"), end, *nl]
    segs, prompt_ids, ref, text = Formatter(tok, "chat").segments(row)
    labels = [t if trained else M for s, trained in segs for t in s]
    assert [t for s, _ in segs for t in s] == p1 + a1 + p2 + a2
    assert labels == [M] * len(p1) + a1 + [M] * len(p2) + a2
    assert prompt_ids == p1 + a1 + p2  # generation continues the last turn
    assert ref == "4"
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 1 + 1?<|im_end|>\n"
                    "<|im_start|>assistant\n2<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("template", ["alpaca", "short"])
@pytest.mark.parametrize("with_input", [False, True])
def test_alpaca_masking_exact_labels(tok, template, with_input):
    row = {"instruction": "Sort these numbers.", "input": "3 1 2" if with_input else "", "output": "1 2 3"}
    if template == "alpaca":
        head = ("Below is an instruction that describes a task"
                + (", paired with an input that provides further context" if with_input else "")
                + ". Write a response that appropriately completes the request.\n\n")
        text = head + "### Instruction:\nSort these numbers.\n\n" + ("### Input:\n3 1 2\n\n" if with_input else "") + "### Response:\n"
    else:
        text = "### Instruction:\nSort these numbers.\n" + ("3 1 2\n" if with_input else "") + "### Response:\n"
    prompt = enc(tok, text)
    answer = enc(tok, "1 2 3") + [sid(tok, "<|im_end|>")]  # eos closes the answer
    segs, prompt_ids, ref, prompt_text = Formatter(tok, template).segments(Row(row, "mem", 1))
    ex_ids = [t for s, _ in segs for t in s]
    ex_labels = [t if trained else M for s, trained in segs for t in s]
    assert ex_ids == prompt + answer
    assert ex_labels == [M] * len(prompt) + answer
    assert prompt_ids == prompt and ref == "1 2 3" and prompt_text == text


def test_alpaca_exact_ids_for_a_fixed_row(tok):
    """One row pinned to literal ids, so a change of the tokenizer builder shows up here too."""
    segs, _, _, _ = Formatter(tok, "short").segments(Row({"instruction": "What is 12 + 30?", "output": "42"}, "m", 1))
    ids = [t for s, _ in segs for t in s]
    labels = [t if trained else M for s, trained in segs for t in s]
    n_prompt = len(enc(tok, "### Instruction:\nWhat is 12 + 30?\n### Response:\n"))
    assert labels[:n_prompt] == [M] * n_prompt
    assert labels[n_prompt:] == enc(tok, "42") + [2] and ids[n_prompt:] == labels[n_prompt:]
    assert enc(tok, "What is 12 + 30?") == [289, 280, 408, 354, 279, 19, 34]


def test_custom_template_and_system_prompt(tok):
    fmt = Formatter(tok, "Q: {instruction} {input}\nA: ", system_prompt="SYS")
    segs, prompt_ids, _, text = fmt.segments(Row({"instruction": "up", "input": "cat", "output": "CAT"}, "m", 1))
    assert prompt_ids == enc(tok, "SYS\n\nQ: up cat\nA: ") and text == "SYS\n\nQ: up cat\nA: "
    assert segs[1] == (enc(tok, "CAT") + [tok.eos_token_id], True)


def test_empty_system_prompt_adds_nothing_to_an_alpaca_prompt(tok):
    """configs/data/instruction.yaml sets system_prompt: "" (to drop a chat template's default one);
    with a plain template that must not prefix every prompt with a blank line."""
    row = Row({"instruction": "up", "input": "cat", "output": "CAT"}, "m", 1)
    _, with_empty, _, _ = Formatter(tok, "short", system_prompt="").segments(row)
    assert with_empty == enc(tok, "### Instruction:\nup\ncat\n### Response:\n")
    _, with_system, _, _ = Formatter(tok, "short", system_prompt="Be brief.").segments(row)
    assert with_system == enc(tok, "Be brief.\n\n### Instruction:\nup\ncat\n### Response:\n")


def test_custom_template_fields_are_checked(tok):
    with pytest.raises(ValueError) as e:
        Formatter(tok, "{instruction} {context}\n")
    assert str(e.value) == ("data.prompt_template: unknown field(s) {context} in the format string "
                            "(use {instruction} and {input}; write {{ and }} for literal braces)")
    with pytest.raises(ValueError) as e:
        Formatter(tok, "{instruction} {input")
    assert str(e.value) == "data.prompt_template: not a valid format string: expected '}' before end of string"
    assert Formatter(tok, "{{json}} {instruction}").template == "{{json}} {instruction}"


def test_custom_template_without_input_refuses_rows_with_input(tok):
    """A template without {input} would silently drop the row's input (the model never sees it)."""
    fmt = Formatter(tok, "Q: {instruction}\nA: ")
    segs, prompt_ids, _, _ = fmt.segments(Row({"instruction": "up", "output": "UP"}, "f.jsonl", 3))
    assert prompt_ids == enc(tok, "Q: up\nA: ")
    with pytest.raises(DataFormatError) as e:
        fmt.segments(Row({"instruction": "up", "input": "cat", "output": "CAT"}, "f.jsonl", 4))
    assert str(e.value) == "f.jsonl:4: field 'input': the prompt_template has no {input}, so this row's input would be dropped"


def test_bad_prompt_template_is_named(tok):
    with pytest.raises(ValueError) as e:
        Formatter(tok, "vicuna")
    assert str(e.value) == ("data.prompt_template: 'vicuna' is not 'auto', 'chat', 'alpaca', 'short' "
                            "or a format string with {instruction}")
    assert set(PROMPT_TEMPLATES) == {"alpaca", "short"}


# ---------------------------------------------------------------------------- format errors
def _setup_error(backbone, path: Path) -> str:
    dm = data(backbone, source=str(path), val_fraction=0.0, test_fraction=0.0)
    with pytest.raises(DataFormatError) as e:
        dm.setup("fit")
    return str(e.value)


GOOD = {"instruction": "a", "output": "b"}


def test_malformed_jsonl_line(backbone, tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [GOOD, '{"instruction": "a", "output": }', GOOD])
    assert _setup_error(backbone, p) == f"{p}:2: invalid JSON: Expecting value (column 32)"


def test_jsonl_line_not_an_object(backbone, tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [GOOD, "[1, 2]"])
    assert _setup_error(backbone, p) == f"{p}:2: expected a JSON object, got list"


def test_missing_output(backbone, tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD, {"instruction": "x"}])
    assert _setup_error(backbone, p) == f"{p}:3: field 'output': missing"


def test_output_not_a_string(backbone, tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "x", "output": 7}])
    assert _setup_error(backbone, p) == f"{p}:1: field 'output': must be a string, got int"


def test_empty_file(backbone, tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n\n")
    assert _setup_error(backbone, p) == f"{p}: no rows (the file is empty)"


def test_unknown_role(backbone, tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "bot", "content": "hi"}]}])
    assert _setup_error(backbone, p) == (
        f"{p}:1: field 'messages[0].role': unknown role 'bot' (expected one of system, user, assistant)")


def test_roles_not_alternating(backbone, tmp_path):
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
            {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]
    p = write_jsonl(tmp_path / "d.jsonl", [GOOD, {"messages": msgs}])
    assert _setup_error(backbone, p) == (
        f"{p}:2: field 'messages[2].role': roles must alternate user/assistant: expected 'assistant', got 'user'")


def test_last_message_not_assistant(backbone, tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "a"}]}])
    assert _setup_error(backbone, p) == f"{p}:1: field 'messages[0].role': the last message must be from the assistant"


def test_non_utf8_file(backbone, tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"instruction": "caf\xe9", "output": "b"}\n')
    assert _setup_error(backbone, p) == f"{p}:2: not UTF-8 (byte 0xe9)"


def test_missing_file_and_unknown_suffix(backbone, tmp_path):
    missing = tmp_path / "nope.jsonl"
    assert _setup_error(backbone, missing) == f"{missing}: cannot read: No such file or directory"
    txt = tmp_path / "d.txt"
    txt.write_text("hello\n")
    assert _setup_error(backbone, txt) == f"{txt}: unsupported file type '.txt' (use .jsonl, .json, .csv, .tsv)"


def test_data_format_error_fields():
    err = DataFormatError("f.jsonl", 12, "output", "missing")
    assert str(err) == "f.jsonl:12: field 'output': missing"
    assert (err.source, err.line, err.field, err.problem) == ("f.jsonl", 12, "output", "missing")
    assert str(DataFormatError("f.jsonl", None, None, "no rows")) == "f.jsonl: no rows"


def test_csv_rows_name_their_line(backbone, tmp_path):
    p2 = tmp_path / "e.csv"
    p2.write_text("instruction,answer\na,b\n")
    assert _setup_error(backbone, p2) == f"{p2}:2: field 'output': missing"


# ---------------------------------------------------------------------------- split
def test_split_is_deterministic_and_keeps_each_prompt_in_one_split(backbone):
    def rows(seed):
        dm = data(backbone, source="builtin:instruction", builtin_size=300, val_fraction=0.1, test_fraction=0.1, seed=seed)
        return dm.split_rows()

    a, b = rows(7), rows(7)
    for split in ("train", "val", "test"):
        assert [r.fields for r in a[split]] == [r.fields for r in b[split]]
    # the generator repeats prompts (300 rows, 278 distinct prompts: the same word to upper-case, ...);
    # no row is lost, and no prompt is in two splits
    assert {k: len(v) for k, v in a.items()} == {"train": 240, "val": 30, "test": 30}
    keys = {k: {prompt_key(conversation(r)[:-1]) for r in v} for k, v in a.items()}
    assert sum(map(len, keys.values())) == 278
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"] and not keys["val"] & keys["test"]
    c = rows(8)
    assert [r.fields for r in c["val"]] != [r.fields for r in a["val"]]


def test_group_split_exact_indices():
    order = list(range(8))
    random.Random(3).shuffle(order)
    assert order == [0, 5, 7, 2, 1, 6, 4, 3]
    # no repeated key: a plain seeded row split (the first 2 shuffled rows val, the next 2 test)
    assert group_split(list("abcdefgh"), [0.25, 0.25], 3) == [[0, 5], [2, 7], [1, 3, 4, 6]]
    # rows 5 and 7 share "f": val takes "a" (row 0) and, still short of 2 rows, the whole "f" group
    assert group_split(list("abcdefgf"), [0.25, 0.25], 3) == [[0, 5, 7], [1, 2], [3, 4, 6]]
    # a group sits where its first row landed: row 3 ("a", shuffled last) goes to val with row 0
    assert group_split(list("abcaefgf"), [0.25, 0.25], 3) == [[0, 3], [5, 7], [1, 2, 4, 6]]
    # a group that crosses the mark goes in whole: 3 rows of "x" where val wants 1
    assert group_split(["x", "y", "x", "x"], [0.25, 0.0], 0) == [[0, 2, 3], [], [1]]
    # at least one row for a positive fraction, none for 0
    assert [len(p) for p in group_split(list("abcdefghij"), [0.01, 0.0], 0)] == [1, 0, 9]


def test_prompt_key_normalises_and_treats_text_as_a_user_turn():
    assert prompt_key("What is  2 +\n3? ") == prompt_key([{"role": "user", "content": "What is 2 + 3?"}]) == (("user", "What is 2 + 3?"),)
    assert prompt_key("ﬁle") == prompt_key("file")  # NFKC
    assert prompt_key("Apple") != prompt_key("apple")  # case is content


def test_builtin_split_numbers(backbone):
    """The shipped instruction.yaml split (2000 rows, 2% val, 5% test): before the shared rule val 40,
    test 100 and 1,860 training rows of which 132 repeated a held-out prompt and were removed (1,728);
    now every row is used and no prompt is in two splits."""
    dm = data(backbone, source="builtin:instruction", builtin_size=2000, val_fraction=0.02, test_fraction=0.05)
    parts = dm.split_rows()
    assert {k: len(v) for k, v in parts.items()} == {"train": 1860, "val": 40, "test": 100}
    keys = {k: {prompt_key(conversation(r)[:-1]) for r in v} for k, v in parts.items()}
    assert not keys["train"] & (keys["val"] | keys["test"]) and not keys["val"] & keys["test"]
    assert dm.removed_as_held_out == 0


def test_explicit_val_and_test_sources(backbone, tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(6)])
    val = write_jsonl(tmp_path / "v.jsonl", [{"instruction": "q1", "output": "a1"}])
    test = write_jsonl(tmp_path / "s.jsonl", [{"instruction": "q2", "output": "a2"}, {"instruction": "q9", "output": "a9"}])
    dm = data(backbone, source=str(train), val_source=str(val), test_source=str(test))
    out = dm.split_rows()
    assert [r.fields["instruction"] for r in out["train"]] == ["q0", "q3", "q4", "q5"]  # q1, q2 held out
    assert [r.fields["instruction"] for r in out["val"]] == ["q1"]
    assert [r.fields["instruction"] for r in out["test"]] == ["q2", "q9"]
    assert dm.removed_as_held_out == 2


# ---------------------------------------------------------------------------- truncation
def _long_rows(tmp_path: Path) -> Path:
    rows = [{"instruction": "What is the last word of this list?", "input": "apple " * n, "output": "apple"}
            for n in (1, 2, 40, 50)]
    return write_jsonl(tmp_path / "long.jsonl", rows)


@pytest.mark.parametrize("policy", ["truncate", "drop"])
def test_truncation_policy_is_counted(backbone, tmp_path, policy):
    dm = data(backbone, source=str(_long_rows(tmp_path)), val_fraction=0.0, test_fraction=0.0,
              prompt_template="short", max_length=45, truncation=policy)
    dm.setup("fit")
    train = dm.splits["train"]
    info = dm.describe()["truncation"]
    if policy == "drop":
        # the two long rows do not fit: dropped, never cut
        assert info == {"policy": "drop", "seen": 4, "truncated": 0, "dropped": 2}
        assert len(train) == 2 and all(len(e.input_ids) <= 45 for e in train)
    else:
        # cut at 45 tokens (their prompts alone are 76 and 86), their answers are gone, so nothing is left to train on: counted as dropped
        assert info == {"policy": "truncate", "seen": 4, "truncated": 0, "dropped": 2}
        assert len(train) == 2


def test_truncate_keeps_a_row_whose_answer_survives(backbone, tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Write this word in capital letters.", "input": "apple",
                                            "output": "APPLE " * 30}])
    dm = data(backbone, source=str(p), val_fraction=0.0, test_fraction=0.0, prompt_template="short", max_length=40)
    dm.setup("fit")
    [ex] = dm.splits["train"]
    n_prompt = len(enc(backbone.tokenizer, "### Instruction:\nWrite this word in capital letters.\napple\n### Response:\n"))
    assert n_prompt == 34
    assert len(ex.input_ids) == 40 and ex.labels == [M] * 34 + ex.input_ids[34:]
    assert dm.describe()["truncation"] == {"policy": "truncate", "seen": 1, "truncated": 1, "dropped": 0}
    dm2 = data(backbone, source=str(p), val_fraction=0.0, test_fraction=0.0, prompt_template="short",
               max_length=40, truncation="drop")
    with pytest.raises(DataFormatError) as e:
        dm2.setup("fit")
    assert str(e.value) == f"{p}: no training rows left after the split and truncation"


# ---------------------------------------------------------------------------- collation
def test_dynamic_padding_batch_width_is_longest_row():
    a = Example(input_ids=[5, 6, 7], labels=[M, 6, 7], prompt_ids=[5], answer="x")
    b = Example(input_ids=[8, 9, 10, 11, 12], labels=[M, M, 10, 11, 12], prompt_ids=[8, 9, 10], answer="y")
    batch = Collator(pad_id=3)([a, b])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 3, 3], [8, 9, 10, 11, 12]]
    assert batch["labels"].tolist() == [[M, 6, 7, M, M], [M, M, 10, 11, 12]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    # generation prompts: left-padded so every prompt ends at the last column
    assert batch["gen_input_ids"].tolist() == [[3, 3, 5], [8, 9, 10]]
    assert batch["gen_attention_mask"].tolist() == [[0, 0, 1], [1, 1, 1]]
    assert batch["answers"] == ["x", "y"]
    assert "tasks" not in batch
    wide = Collator(pad_id=3, pad_to_multiple_of=8)([a, b])
    assert wide["input_ids"].shape == (2, 8) and wide["labels"][0, 3:].tolist() == [M] * 5


def test_training_batches_have_no_generation_prompts():
    ex = Example(input_ids=[1, 2], labels=[M, 2], task="t")
    batch = Collator(pad_id=0)([ex])
    assert "gen_input_ids" not in batch and batch["tasks"] == ["t"]


def test_loaders_pad_dynamically_and_shuffle_deterministically(backbone):
    def first_batches():
        dm = data(backbone, source="builtin:instruction", builtin_size=80, batch_size=8, eval_batch_size=3)
        dm.setup("fit")
        return dm, [b for _, b in zip(range(3), dm.train_dataloader())]

    dm, batches = first_batches()
    _, again = first_batches()
    for b, c in zip(batches, again):
        assert torch.equal(b["input_ids"], c["input_ids"])
    for b in batches:
        longest = int(b["attention_mask"].sum(1).max())
        assert b["input_ids"].shape[1] == longest  # no padding beyond the longest row
        assert "gen_input_ids" not in b
    val = next(iter(dm.val_dataloader()))
    assert val["input_ids"].shape[0] == 3 and "gen_input_ids" in val
    # each left-padded prompt is the example's prompt, right-aligned
    for i, ex in enumerate(dm.splits["val"][:3]):
        row = val["gen_input_ids"][i].tolist()
        assert row[len(row) - len(ex.prompt_ids):] == ex.prompt_ids
        assert val["gen_attention_mask"][i].sum() == len(ex.prompt_ids)
    assert set(val["tasks"]) <= {"arithmetic", "last_word", "sort_numbers", "uppercase", "count_words"}


# ---------------------------------------------------------------------------- prompt batches (online RL)
def test_prompt_collator_exact():
    a = Example([5, 6, 7], [M, 6, 7], prompt_ids=[5], answer="x", task="t", prompt_text="P5")
    b = Example([8, 9, 10, 11], [M, M, M, 11], prompt_ids=[8, 9, 10], answer=None, prompt_text="P8")
    batch = PromptCollator(pad_id=3)([a, b])
    assert set(batch) == {"prompt_input_ids", "prompt_attention_mask", "prompts", "answers", "tasks"}
    assert batch["prompt_input_ids"].tolist() == [[3, 3, 5], [8, 9, 10]]
    assert batch["prompt_attention_mask"].tolist() == [[0, 0, 1], [1, 1, 1]]
    assert (batch["prompts"], batch["answers"], batch["tasks"]) == (["P5", "P8"], ["x", None], ["t", "default"])
    # the same tensors as the generation prompts of an evaluation batch
    gen = Collator(pad_id=3)([a, Example([8], [8], prompt_ids=[8, 9, 10], answer="y")])
    assert torch.equal(gen["gen_input_ids"], batch["prompt_input_ids"]) and torch.equal(gen["gen_attention_mask"], batch["prompt_attention_mask"])
    with pytest.raises(ValueError) as e:
        PromptCollator(pad_id=3)([Example([1, 2], [1, 2])])
    assert str(e.value) == "data.prompt_batches: these examples have no prompt (raw text has nothing to answer)"


def test_prompt_batches_from_instruction_rows(backbone, tok, tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "What is 12 + 30?", "output": "42", "task": "add"},
                                           {"instruction": "Sort these numbers.", "input": "3 1 2", "output": "1 2 3"}])
    dm = data(backbone, source=str(p), val_fraction=0.0, test_fraction=0.0, prompt_template="short",
              prompt_batches=True, batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    texts = ["### Instruction:\nWhat is 12 + 30?\n### Response:\n", "### Instruction:\nSort these numbers.\n3 1 2\n### Response:\n"]
    order = [batch["prompts"].index(t) for t in texts]
    ids = [enc(tok, t) for t in texts]
    assert [len(x) for x in ids] == [31, 32]
    assert [batch["prompt_input_ids"][i].tolist() for i in order] == [[tok.pad_token_id] + ids[0], ids[1]]
    assert [batch["prompt_attention_mask"][i].tolist() for i in order] == [[0] + [1] * 31, [1] * 32]
    assert [batch["answers"][i] for i in order] == ["42", "1 2 3"]
    assert [batch["tasks"][i] for i in order] == ["add", "default"]
    # the supervised loaders are unchanged: validation batches of the same data module
    dm.splits["val"] = dm.splits["train"]
    val = next(iter(dm.val_dataloader()))
    assert {"input_ids", "labels", "attention_mask", "gen_input_ids", "gen_attention_mask", "answers"} <= set(val)
    assert "prompts" not in val


def test_supervised_training_batches_are_unchanged_by_the_new_example_fields(backbone):
    """Training examples now carry their prompt too (for prompt batches); training batches still
    have no generation keys, and evaluation batches do."""
    dm = data(backbone, source="builtin:instruction", builtin_size=40)
    dm.setup("fit")
    assert all(e.prompt_ids is not None and e.answer is not None for e in dm.splits["train"])
    train = next(iter(dm.train_dataloader()))
    assert set(train) == {"input_ids", "labels", "attention_mask", "tasks"}
    assert set(next(iter(dm.val_dataloader()))) == {"input_ids", "labels", "attention_mask", "gen_input_ids",
                                                     "gen_attention_mask", "answers", "tasks"}


# ---------------------------------------------------------------------------- shared arguments
@pytest.mark.parametrize("kwargs,message", [
    ({"val_fraction": 1.0}, "data.val_fraction: must be in [0, 1), got 1.0"),
    ({"test_fraction": -0.1}, "data.test_fraction: must be in [0, 1), got -0.1"),
    ({"val_fraction": 0.5, "test_fraction": 0.5}, "data.val_fraction + data.test_fraction: must be below 1, got 1.0"),
    ({"max_length": 1}, "data.max_length: must be at least 2, got 1"),
    ({"batch_size": 0}, "data.batch_size: must be at least 1, got 0"),
    ({"source": []}, "data.source: give at least one source"),
])
def test_shared_arguments_are_checked(backbone, kwargs, message):
    with pytest.raises(ValueError) as e:
        InstructionData(backbone=backbone, **kwargs)
    assert str(e.value) == message


def test_a_list_of_sources_is_read_in_order(backbone, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "q1", "output": "a1"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"instruction": "q2", "output": "a2"}, {"instruction": "q1", "output": "again"}])
    dm = data(backbone, source=[str(a), str(b)], val_fraction=0.0, test_fraction=0.0)
    assert [(r.source, r.line) for r in dm.split_rows()["train"]] == [(str(a), 1), (str(b), 1), (str(b), 2)]


def test_describe(backbone):
    dm = data(backbone, source="builtin:uppercase", builtin_size=40, val_fraction=0.1, test_fraction=0.1)
    dm.setup("fit")
    d = dm.describe()
    assert d["regime"] == "instruction" and d["prompt_template"] == "chat" and d["max_length"] == 512
    # 40 rows, 27 distinct words: val wants 4 rows and takes a whole group of 2 to get there
    assert d["rows"] == {"train": 31, "val": 5, "test": 4} and d["removed_as_held_out"] == 0
    assert d["truncation"] == {"policy": "truncate", "seen": sum(d["rows"].values()), "truncated": 0, "dropped": 0}


def test_truncation_counts_are_never_negative():
    """A row that fits but has nothing to train on is dropped, and was never truncated."""
    from ftbench.data.base import TruncationStats, segments_to_example

    stats = TruncationStats()
    assert segments_to_example([([1, 2, 3], False), ([], True)], 10, "truncate", stats) is None
    assert stats.as_dict() == {"seen": 1, "truncated": 0, "dropped": 1}
