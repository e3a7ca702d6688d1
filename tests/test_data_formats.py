"""The data forms users bring (ftbench/data/formats.py): each form read into the same rows as its
equivalent in ftbench's native form (the same token ids and prompt masks), the rendered texts where a
form's own rule decides what is trained (TRL's prompt-completion prompt is context, LLaMA-Factory's
history is trained, observation turns are tool turns), TRL's implicit prompt, dataset_info.json sets
with a columns/tags mapping, and every error as one line (the CLI: exit 2, no traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ftbench.data import InstructionData, PreferenceData
from ftbench.data.base import DataFormatError
from ftbench.data.formats import extract_prompt
from ftbench.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
Q, A5 = "What is 2 + 3?", "5"


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict:
    return {"role": "system", "content": text}


def write(path: Path, rows: list) -> str:
    if path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def examples(cls, backbone, source: str, **kwargs) -> list:
    dm = cls(backbone=backbone, source=source, val_fraction=0.0, test_fraction=0.0, **kwargs)
    dm.setup("fit")
    return dm.splits["train"]


def tokens(cls, backbone, tmp_path: Path, rows: list, name: str, **kwargs) -> list:
    """Each row's (input_ids, labels); a pair's for chosen and rejected."""
    out = examples(cls, backbone, write(tmp_path / f"{name}.jsonl", rows), **kwargs)
    if cls is PreferenceData:
        return [(e.chosen.input_ids, e.chosen.labels, e.rejected.input_ids, e.rejected.labels, e.prompt_text) for e in out]
    return [(e.input_ids, e.labels, e.prompt_text) for e in out]


def trained_text(backbone, example) -> str:
    return backbone.tokenizer.decode([t for t in example.labels if t != -100])


# ---------------------------------------------------------------------------- instruction forms
SHAREGPT_TURNS = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}, {"from": "human", "value": Q},
                  {"from": "gpt", "value": A5}]
HISTORY_NATIVE = {"messages": [system("Be brief."), user("Hi"), assistant("Hello"), user(Q), assistant(A5)]}

INSTRUCTION_FORMS = {
    # TRL standard prompt-completion: the prompt is the instruction (rendered by prompt_template as any row)
    "trl-prompt-completion": ({"prompt": Q, "completion": A5}, {"instruction": Q, "output": A5}),
    "trl-conversational-prompt-completion": ({"prompt": [user(Q)], "completion": [assistant(A5)]},
                                             {"messages": [user(Q), assistant(A5)]}),
    "trl-messages": ({"messages": [user(Q), assistant(A5)]}, {"instruction": Q, "output": A5}),
    "alpaca": ({"instruction": "Sort these numbers.", "input": "3 1 2", "output": "1 2 3"},
               {"instruction": "Sort these numbers.", "input": "3 1 2", "output": "1 2 3"}),
    # instruction and input joined by a blank line, as ftbench's native rows
    "alpaca-system": ({"instruction": "Sort these numbers.", "input": "3 1 2", "output": "1 2 3", "system": "Be brief."},
                      {"messages": [system("Be brief."), user("Sort these numbers.\n\n3 1 2"), assistant("1 2 3")]}),
    "alpaca-history": ({"instruction": Q, "output": A5, "system": "Be brief.", "history": [["Hi", "Hello"]]}, HISTORY_NATIVE),
    "sharegpt": ({"conversations": [{"from": "system", "value": "Be brief."}, *SHAREGPT_TURNS]}, HISTORY_NATIVE),
    "sharegpt-system-column": ({"conversations": SHAREGPT_TURNS, "system": "Be brief."}, HISTORY_NATIVE),
}


@pytest.mark.parametrize("case", list(INSTRUCTION_FORMS))
def test_each_instruction_form_reads_as_its_native_row(backbone, tmp_path, case):
    row, native = INSTRUCTION_FORMS[case]
    got = tokens(InstructionData, backbone, tmp_path, [row], "form")
    assert got == tokens(InstructionData, backbone, tmp_path, [native], "native")
    # the named format reads it the same
    form = case.split("-")[0]
    assert tokens(InstructionData, backbone, tmp_path, [row], "named", format=form) == got


def test_alpaca_history_responses_are_trained(backbone, tmp_path):
    """LLaMA-Factory's README: the history's responses are learned too (ftbench's rule for every
    assistant turn of a conversation)."""
    row = INSTRUCTION_FORMS["alpaca-history"][0]
    (ex,) = examples(InstructionData, backbone, write(tmp_path / "a.jsonl", [row]))
    assert trained_text(backbone, ex) == "Hello<|im_end|>\n5<|im_end|>\n"
    assert ex.prompt_text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                              "<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
                              "<|im_start|>assistant\n")


def test_trl_prompt_completion_trains_the_completion_only(backbone, tmp_path):
    """TRL's completion-only loss: an assistant turn inside the prompt is context; the same turns as
    ``messages`` train both responses."""
    prompt = [user("Hi"), assistant("Hello"), user(Q)]
    (pc,) = examples(InstructionData, backbone, write(tmp_path / "pc.jsonl", [{"prompt": prompt, "completion": [assistant(A5)]}]))
    (msgs,) = examples(InstructionData, backbone, write(tmp_path / "m.jsonl", [{"messages": prompt + [assistant(A5)]}]))
    assert pc.input_ids == msgs.input_ids
    assert trained_text(backbone, pc) == "5<|im_end|>\n"
    assert trained_text(backbone, msgs) == "Hello<|im_end|>\n5<|im_end|>\n"
    # with a system prompt put first, the prompt's turns stay context
    (sp,) = examples(InstructionData, backbone, write(tmp_path / "pc.jsonl", [{"prompt": prompt, "completion": [assistant(A5)]}]),
                     system_prompt="S")
    assert trained_text(backbone, sp) == "5<|im_end|>\n" and sp.prompt_text.startswith("<|im_start|>system\nS<|im_end|>\n")


def test_sharegpt_function_call_and_observation(backbone, tmp_path):
    """function_call turns are assistant turns (trained), observation turns are tool turns (context)."""
    row = {"conversations": [{"from": "human", "value": Q}, {"from": "function_call", "value": '{"name": "add"}'},
                             {"from": "observation", "value": "5"}, {"from": "gpt", "value": A5}]}
    (ex,) = examples(InstructionData, backbone, write(tmp_path / "s.jsonl", [row]))
    assert backbone.tokenizer.decode(ex.input_ids) == (
        '<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n{"name": "add"}<|im_end|>\n'
        "<|im_start|>tool\n5<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n")
    assert trained_text(backbone, ex) == '{"name": "add"}<|im_end|>\n5<|im_end|>\n'


def test_a_json_list_and_csv_of_alpaca_rows(backbone, tmp_path):
    rows = [{"instruction": f"q{i}", "output": f"a{i}", "system": "S"} for i in range(3)]
    as_json = [(e.input_ids, e.labels) for e in examples(InstructionData, backbone, write(tmp_path / "d.json", rows), format="alpaca")]
    csv = tmp_path / "d.csv"
    csv.write_text("instruction,output,system\n" + "".join(f"q{i},a{i},S\n" for i in range(3)))
    assert [(e.input_ids, e.labels) for e in examples(InstructionData, backbone, str(csv), format="alpaca")] == as_json
    native = [{"messages": [system("S"), user(f"q{i}"), assistant(f"a{i}")]} for i in range(3)]
    assert [(e.input_ids, e.labels) for e in examples(InstructionData, backbone, write(tmp_path / "n.jsonl", native))] == as_json


# ---------------------------------------------------------------------------- preference forms
PAIR_NATIVE = {"prompt": [system("Be brief."), user("Hi"), assistant("Hello"), user(Q)],
               "chosen": [assistant(A5)], "rejected": [assistant("16")]}
PREFERENCE_FORMS = {
    "trl-implicit-standard": ({"chosen": "The sky is blue.", "rejected": "The sky is green."},
                              {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}),
    "trl-implicit-conversational": ({"chosen": [user(Q), assistant(A5)], "rejected": [user(Q), assistant("16")]},
                                    {"prompt": [user(Q)], "chosen": [assistant(A5)], "rejected": [assistant("16")]}),
    "trl-explicit-standard": ({"prompt": Q, "chosen": A5, "rejected": "16"},
                              {"prompt": [user(Q)], "chosen": [assistant(A5)], "rejected": [assistant("16")]}),
    "alpaca": ({"instruction": Q, "input": "", "chosen": A5, "rejected": "16"}, {"prompt": Q, "chosen": A5, "rejected": "16"}),
    "alpaca-history": ({"instruction": Q, "system": "Be brief.", "history": [["Hi", "Hello"]], "chosen": A5, "rejected": "16"},
                       PAIR_NATIVE),
    "sharegpt": ({"conversations": [{"from": "system", "value": "Be brief."}, *SHAREGPT_TURNS[:3]],
                  "chosen": {"from": "gpt", "value": A5}, "rejected": {"from": "gpt", "value": "16"}}, PAIR_NATIVE),
}


@pytest.mark.parametrize("case", list(PREFERENCE_FORMS))
def test_each_preference_form_reads_as_its_native_pair(backbone, tmp_path, case):
    row, native = PREFERENCE_FORMS[case]
    got = tokens(PreferenceData, backbone, tmp_path, [row], "form")
    assert got == tokens(PreferenceData, backbone, tmp_path, [native], "native")
    assert tokens(PreferenceData, backbone, tmp_path, [row], "named", format=case.split("-")[0]) == got


def test_implicit_prompt_standard_renders_the_common_prefix(backbone, tmp_path):
    row = PREFERENCE_FORMS["trl-implicit-standard"][0]
    (pair,) = examples(PreferenceData, backbone, write(tmp_path / "p.jsonl", [row]), prompt_template="plain")
    assert pair.prompt_text == "The sky is"
    assert trained_text(backbone, pair.chosen) == " blue.<|im_end|>" and trained_text(backbone, pair.rejected) == " green.<|im_end|>"


@pytest.mark.parametrize("chosen, rejected, expected", [
    ("The sky is blue.", "The sky is green.", ("The sky is", " blue.", " green.")),  # TRL's docs example
    ("2 + 3 = 5", "2 + 3 = 6", ("2 + 3 =", " 5", " 6")),  # the space before the difference goes with the answers
    ("2+3=5", "2+3=6", ("2+3=", "5", "6")),
    ("abc", "abcd", ("ab", "c", "cd")),  # one a prefix of the other: TRL's loop ends one short
    ("yes", "no", ("", "yes", "no")),
])
def test_extract_prompt_as_trl(chosen, rejected, expected):
    assert extract_prompt(chosen, rejected) == expected


def test_unpaired_rows_pass_through_the_preference_reading(tmp_path):
    """TRL's unpaired rows (KTO's) are read by a subclass of the preference regime: kept as they are."""
    from ftbench.data.formats import read_source

    rows = [{"prompt": Q, "completion": A5, "label": True}, {"prompt": [user(Q)], "completion": [assistant("16")], "label": False}]
    got = read_source(write(tmp_path / "u.jsonl", rows), "preference")
    assert [(r.fields, r.form, r.checked) for r in got] == [(rows[0], "trl", False), (rows[1], "trl", False)]


# ---------------------------------------------------------------------------- dataset_info.json
def dataset_info(tmp_path: Path, sets: dict) -> Path:
    folder = tmp_path / "lf"
    folder.mkdir(exist_ok=True)
    (folder / "dataset_info.json").write_text(json.dumps(sets))
    return folder


def test_dataset_info_alpaca_set_with_a_columns_mapping(backbone, tmp_path):
    folder = dataset_info(tmp_path, {"mails": {"file_name": "mails.json", "columns": {
        "prompt": "question", "query": "context", "response": "answer_text", "system": "sys", "history": "turns"}}})
    write(folder / "mails.json", [{"question": Q, "context": "", "answer_text": A5, "sys": "Be brief.", "turns": [["Hi", "Hello"]]}])
    from_info = examples(InstructionData, backbone, f"dataset_info:{folder}#mails")
    native = examples(InstructionData, backbone, write(tmp_path / "n.jsonl", [HISTORY_NATIVE]))
    assert [(e.input_ids, e.labels) for e in from_info] == [(e.input_ids, e.labels) for e in native]
    # the file itself names the same set
    again = examples(InstructionData, backbone, f"dataset_info:{folder / 'dataset_info.json'}#mails")
    assert [e.input_ids for e in again] == [e.input_ids for e in native]


def test_dataset_info_without_columns_reads_only_the_default_columns(backbone, tmp_path):
    """LLaMA-Factory's DatasetAttr: without ``columns`` a set reads instruction/input/output (alpaca) or
    conversations (sharegpt); a ``system`` or ``history`` column is not read unless mapped."""
    folder = dataset_info(tmp_path, {"plain": {"file_name": "d.jsonl"}})
    write(folder / "d.jsonl", [{"instruction": Q, "output": A5, "system": "Be brief.", "history": [["Hi", "Hello"]]}])
    (ex,) = examples(InstructionData, backbone, f"dataset_info:{folder}#plain")
    (native,) = examples(InstructionData, backbone, write(tmp_path / "n.jsonl", [{"instruction": Q, "output": A5}]))
    assert (ex.input_ids, ex.labels) == (native.input_ids, native.labels)


def test_dataset_info_sharegpt_tags_and_ranking(backbone, tmp_path):
    """The README's OpenAI-style tags (role/content, user/assistant) and a ranking sharegpt set."""
    folder = dataset_info(tmp_path, {
        "chat": {"file_name": "chat.jsonl", "formatting": "sharegpt", "columns": {"messages": "messages"},
                 "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                          "system_tag": "system"}},
        "pairs": {"file_name": "pairs.jsonl", "formatting": "sharegpt", "ranking": True,
                  "columns": {"messages": "dialog", "chosen": "good", "rejected": "bad"}},
    })
    write(folder / "chat.jsonl", [HISTORY_NATIVE])
    (ex,) = examples(InstructionData, backbone, f"dataset_info:{folder}#chat")
    (native,) = examples(InstructionData, backbone, write(tmp_path / "n.jsonl", [HISTORY_NATIVE]))
    assert (ex.input_ids, ex.labels) == (native.input_ids, native.labels)
    write(folder / "pairs.jsonl", [{"dialog": [{"from": "system", "value": "Be brief."}, *SHAREGPT_TURNS[:3]],
                                    "good": {"from": "gpt", "value": A5}, "bad": {"from": "gpt", "value": "16"}}])
    (pair,) = examples(PreferenceData, backbone, f"dataset_info:{folder}#pairs")
    (want,) = examples(PreferenceData, backbone, write(tmp_path / "p.jsonl", [PAIR_NATIVE]))
    assert (pair.chosen.input_ids, pair.chosen.labels, pair.rejected.input_ids) == (want.chosen.input_ids, want.chosen.labels, want.rejected.input_ids)


def test_dataset_info_file_name_a_folder_of_files(backbone, tmp_path):
    """LLaMA-Factory reads every file of a ``file_name`` folder; ftbench in name order."""
    folder = dataset_info(tmp_path, {"s": {"file_name": "parts"}})
    (folder / "parts").mkdir()
    write(folder / "parts" / "b.jsonl", [{"instruction": "q2", "output": "a2"}])
    write(folder / "parts" / "a.jsonl", [{"instruction": "q1", "output": "a1"}])
    dm = InstructionData(backbone=backbone, source=f"dataset_info:{folder}#s", val_fraction=0.0, test_fraction=0.0)
    assert [(r.fields["instruction"], r.source) for r in dm.split_rows()["train"]] == [
        ("q1", str(folder / "parts" / "a.jsonl")), ("q2", str(folder / "parts" / "b.jsonl"))]


def test_dataset_info_file_name_a_saved_dataset(backbone, tmp_path):
    """A ``save_to_disk`` folder is read through ``datasets`` (as ``hf_hub_url`` sets are), its rows
    converted as a file's."""
    import datasets

    folder = dataset_info(tmp_path, {"s": {"file_name": "saved", "formatting": "sharegpt"}})
    datasets.Dataset.from_list([{"conversations": [{"from": "system", "value": "Be brief."}, *SHAREGPT_TURNS]}]).save_to_disk(
        str(folder / "saved"))
    (ex,) = examples(InstructionData, backbone, f"dataset_info:{folder}#s")
    (native,) = examples(InstructionData, backbone, write(tmp_path / "n.jsonl", [HISTORY_NATIVE]))
    assert (ex.input_ids, ex.labels) == (native.input_ids, native.labels)


def test_a_format_in_a_mixture_task(backbone, tmp_path):
    from ftbench.data import MultiTaskData, TaskSpec

    src = write(tmp_path / "s.jsonl", [{"conversations": SHAREGPT_TURNS[2:]}] * 4)
    dm = MultiTaskData(backbone=backbone, tasks=[TaskSpec("chat", src, options={"format": "sharegpt"})],
                       val_fraction=0.0, test_fraction=0.0)
    dm.setup("fit")
    (native,) = examples(InstructionData, backbone, write(tmp_path / "n.jsonl", [{"messages": [user(Q), assistant(A5)]}]))
    assert [e.input_ids for e in dm.splits["train"]] == [native.input_ids] * 4


# ---------------------------------------------------------------------------- errors
def one_error(cls, backbone, source: str, **kwargs) -> str:
    with pytest.raises((DataFormatError, ConfigError)) as err:
        examples(cls, backbone, source, **kwargs)
    message = str(err.value)
    assert "\n" not in message
    return message


ROW_ERRORS = {
    "no-known-form": (InstructionData, {"question": "q", "answer": "a"}, {},
                      "a row in no known instruction form: it has the fields 'question', 'answer' (expected TRL's messages "
                      "or prompt/completion, alpaca's instruction/output or sharegpt's conversations)"),
    "no-known-pair-form": (PreferenceData, {"question": "q", "good": "a"}, {},
                           "a row in no known preference form: it has the fields 'question', 'good' (expected TRL's "
                           "prompt/chosen/rejected, chosen/rejected or prompt/completion/label, alpaca's "
                           "instruction/chosen/rejected or sharegpt's conversations/chosen/rejected)"),
    "not-the-named-form": (InstructionData, {"instruction": Q, "output": A5}, {"format": "sharegpt"},
                           "a row not in the sharegpt form (data.format): it has the fields 'instruction', 'output'"),
    "sharegpt-position": (InstructionData, {"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q"}]}, {},
                          "field 'conversations[1].from': expected 'gpt' or 'function_call' at this position (sharegpt "
                          "alternates human/observation with gpt/function_call), got 'human'"),
    "sharegpt-index-after-system": (InstructionData, {"conversations": [{"from": "system", "value": "s"}, {"from": "gpt", "value": "a"}]}, {},
                                    "field 'conversations[1].from': expected 'human' or 'observation' at this position (sharegpt "
                                    "alternates human/observation with gpt/function_call), got 'gpt'"),
    "sharegpt-ends-with-user": (InstructionData, {"conversations": [{"from": "human", "value": "q"}]}, {},
                                "field 'conversations': must end with an assistant turn ('gpt' or 'function_call'); it has "
                                "1 turns after the system prompt"),
    "sharegpt-pair-ends-with-assistant": (PreferenceData, {"conversations": SHAREGPT_TURNS[:2], "chosen": {"from": "gpt", "value": "a"},
                                                           "rejected": {"from": "gpt", "value": "b"}}, {},
                                          "field 'conversations': must end with a user turn ('human' or 'observation') before "
                                          "'chosen' and 'rejected'; it has 2 turns after the system prompt"),
    "sharegpt-chosen-not-a-message": (PreferenceData, {"conversations": SHAREGPT_TURNS[:1], "chosen": "a",
                                                       "rejected": {"from": "gpt", "value": "b"}}, {},
                                      "field 'chosen': must be one message {'from': 'gpt', 'value': ...}"),
    "sharegpt-content": (InstructionData, {"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}]}, {},
                         "field 'conversations[0].value': missing or not a string"),
    "alpaca-history": (InstructionData, {"instruction": Q, "output": A5, "history": [["Hi"]]}, {},
                       "field 'history[0]': must be a [prompt, response] pair of strings"),
    "alpaca-missing-output": (InstructionData, {"instruction": Q, "system": "s"}, {}, "field 'output': missing"),
    "trl-completion-role": (InstructionData, {"prompt": [user(Q)], "completion": [user(A5)]}, {},
                            "field 'completion[0].role': roles must alternate user/assistant: expected 'assistant', got 'user'"),
    "trl-no-common-prefix": (PreferenceData, {"chosen": "yes", "rejected": "no"}, {},
                             "field 'chosen': no prompt: 'chosen' and 'rejected' share no leading text (give 'prompt')"),
}


@pytest.mark.parametrize("case", list(ROW_ERRORS))
def test_row_errors_name_file_line_and_field(backbone, tmp_path, case):
    cls, row, kwargs, message = ROW_ERRORS[case]
    good = PREFERENCE_FORMS["alpaca"][0] if cls is PreferenceData else {"instruction": "a", "output": "b"}
    if kwargs.get("format") == "sharegpt":
        good = {"conversations": SHAREGPT_TURNS}
    src = write(tmp_path / "d.jsonl", [good, row])
    assert one_error(cls, backbone, src, **kwargs) == f"{src}:2: {message}"


INFO_ERRORS = {
    "unknown-set": ({"other": {"file_name": "d.jsonl"}}, "missing", InstructionData,
                    "{info}: no data set 'missing' (it defines other)"),
    "no-file": ({"s": {"formatting": "alpaca"}}, "s", InstructionData, "{info}#s: field 'file_name': missing (give file_name or hf_hub_url)"),
    "script": ({"s": {"script_url": "x"}}, "s", InstructionData, "{info}#s: field 'script_url': not supported (ftbench reads file_name or hf_hub_url)"),
    "num-samples": ({"s": {"file_name": "d.jsonl", "num_samples": 10}}, "s", InstructionData,
                    "{info}#s: field 'num_samples': not supported (LLaMA-Factory samples rows at random; use data.max_train_rows)"),
    "images": ({"s": {"file_name": "d.jsonl", "columns": {"images": "img"}}}, "s", InstructionData,
               "{info}#s: field 'columns.images': images are not supported by this regime"),
    "formatting": ({"s": {"file_name": "d.jsonl", "formatting": "openai"}}, "s", InstructionData,
                   "{info}#s: field 'formatting': 'openai' is not alpaca or sharegpt"),
    "not-ranking": ({"s": {"file_name": "d.jsonl"}}, "s", PreferenceData,
                    "{info}#s: field 'ranking': the preference regime needs a ranking set (ranking: true)"),
    "ranking-in-sft": ({"s": {"file_name": "d.jsonl", "ranking": True}}, "s", InstructionData,
                       "{info}#s: field 'ranking': the instruction regime needs a set without ranking"),
    "ranking-without-columns": ({"s": {"file_name": "d.jsonl", "ranking": True, "columns": {"prompt": "instruction"}}}, "s", PreferenceData,
                                "{info}#s: field 'columns': a ranking set names its 'chosen' and 'rejected' columns"),
    "mapped-row": ({"s": {"file_name": "d.jsonl", "columns": {"prompt": "question", "response": "answer_text"}}}, "s", InstructionData,
                   "{data}:1: field 'question': missing"),
}


@pytest.mark.parametrize("case", list(INFO_ERRORS))
def test_dataset_info_errors(backbone, tmp_path, case):
    sets, name, cls, message = INFO_ERRORS[case]
    folder = dataset_info(tmp_path, sets)
    write(folder / "d.jsonl", [{"instruction": Q, "output": A5}])
    info = folder / "dataset_info.json"
    assert one_error(cls, backbone, f"dataset_info:{folder}#{name}") == message.format(info=info, data=folder / "d.jsonl")


def test_a_named_format_that_contradicts_dataset_info(backbone, tmp_path):
    folder = dataset_info(tmp_path, {"s": {"file_name": "d.jsonl"}})
    write(folder / "d.jsonl", [{"instruction": Q, "output": A5}])
    assert one_error(InstructionData, backbone, f"dataset_info:{folder}#s", format="sharegpt") == (
        f"data.format: 'sharegpt', but {folder / 'dataset_info.json'}#s has formatting 'alpaca' (use auto)")


def test_a_source_without_a_set_name(backbone, tmp_path):
    assert one_error(InstructionData, backbone, f"dataset_info:{tmp_path}") == (
        f"data.source: 'dataset_info:{tmp_path}': name the set after '#' (dataset_info:PATH#NAME)")


# ---------------------------------------------------------------------------- the CLI
def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "FTBENCH_TRACEBACK"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env


@pytest.mark.parametrize("data, objective, rows, expected", [
    ("instruction", "sft", [{"question": "q", "answer": "a"}], "{src}:1: a row in no known instruction form: it has the fields 'question', 'answer'"),
    ("preference", "dpo", [{"conversations": [{"from": "gpt", "value": "a"}], "chosen": {"from": "gpt", "value": "b"},
                            "rejected": {"from": "gpt", "value": "c"}}],
     "{src}:1: field 'conversations[0].from': expected 'human' or 'observation' at this position"),
], ids=["instruction", "preference"])
def test_a_row_in_no_known_form_ends_the_cli_in_one_line(data, objective, rows, expected, tiny_model_dir, tmp_path):
    src = write(tmp_path / "rows.jsonl", rows)
    argv = [sys.executable, "-m", "ftbench.cli", "fit", "--backbone.model", str(tiny_model_dir),
            "--tuner", "configs/tuner/lora.yaml", "--model", f"configs/objective/{objective}.yaml",
            "--data", f"configs/data/{data}.yaml", "--data.init_args.source", src,
            "--trainer", "configs/trainer/cpu.yaml", "--trainer.max_steps", "1", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--out", str(tmp_path / "out")]
    res = subprocess.run(argv, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr + res.stdout
    lines = [line for line in res.stderr.splitlines() if line.startswith("ftbench: ")]
    assert lines and lines[0].startswith("ftbench: error: " + expected.format(src=src)), res.stderr[-3000:]
    assert len(lines) == 1 or (len(lines) == 2 and lines[1].startswith("ftbench: hint: ")), res.stderr[-3000:]


@pytest.mark.parametrize("name, regime, form", [
    ("instruction_llamafactory", InstructionData, "sharegpt"), ("preference_llamafactory", PreferenceData, "alpaca"),
    ("instruction_trl", InstructionData, "trl"), ("preference_trl", PreferenceData, "trl"),
])
def test_the_shipped_format_examples_read_as_the_builtin_rows(backbone, name, regime, form, monkeypatch):
    """configs/data/*_{llamafactory,trl}.yaml: 60 arithmetic rows each, split 48/6/6, every training
    example the built-in one (the same pair, or the same question and answer) in its own form."""
    import yaml

    from ftbench.data.preference import builtin_pairs

    monkeypatch.chdir(ROOT)  # the configs name their files relative to the repository root
    config = yaml.safe_load((ROOT / "configs/data" / f"{name}.yaml").read_text())
    assert config["class_path"] == f"ftbench.data.{regime.__name__}"
    dm = regime(backbone=backbone, **config["init_args"])
    dm.setup("fit")
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 48, "val": 6, "test": 6}
    assert dm.describe()["forms"] == {form: 60}
    pairs = {p["prompt"]: p for p in builtin_pairs("arithmetic", 60, seed=0)}
    for e in dm.splits["train"]:
        question = e.prompt_text.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
        chosen = trained_text(backbone, e.chosen if regime is PreferenceData else e)
        assert chosen == pairs[question]["chosen"] + "<|im_end|>\n"
        if regime is PreferenceData:
            assert trained_text(backbone, e.rejected) == pairs[question]["rejected"] + "<|im_end|>\n"
