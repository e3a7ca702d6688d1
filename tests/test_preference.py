"""Preference pairs: exact collated tensors (plain and chat), every accepted row form, the built-in
pairs, identical pairs (warn/drop/error), bad rows, the shipped YAML, and a supervised method
validating on the chosen responses."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from ftbench.data.base import DataFormatError, Row
from ftbench.data.preference import (
    PreferenceData,
    PreferenceDataWarning,
    builtin_pairs,
    parse_pair,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PROMPT = [289, 280, 276, 354, 279, 34]  # "What is 2 + 3?" with the tiny tokenizer
FIVE, SIXTEEN = [24], [20, 25]
EOS, PAD = 2, 3
CHAT_PROMPT = [1, 88, 86, 265, 202, *PROMPT, 2, 202, 1, 387, 86, 288, 273, 87, 202]  # <|im_start|>user\n...assistant\n
NL = 202


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _data(backbone, tmp_path, rows, **kwargs) -> PreferenceData:
    """Every row trained on (no held-out share)."""
    src = _jsonl(tmp_path / "pairs.jsonl", rows)
    kwargs.setdefault("val_fraction", 0.0)
    kwargs.setdefault("test_fraction", 0.0)
    dm = PreferenceData(backbone=backbone, source=src, **kwargs)
    dm.setup("fit")
    return dm


def test_collation_exact_tensors_plain(backbone, tmp_path):
    dm = _data(backbone, tmp_path, [{"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "16"}], prompt_template="plain")
    batch = next(iter(dm.train_dataloader()))
    # chosen: prompt + "5" + EOS (8 tokens), padded to the rejected's 9; rejected: prompt + "16" + EOS
    assert batch["chosen_input_ids"].tolist() == [PROMPT + FIVE + [EOS, PAD]]
    assert batch["chosen_attention_mask"].tolist() == [[1] * 8 + [0]]
    assert batch["chosen_labels"].tolist() == [[-100] * 6 + FIVE + [EOS, -100]]
    assert batch["rejected_input_ids"].tolist() == [PROMPT + SIXTEEN + [EOS]]
    assert batch["rejected_attention_mask"].tolist() == [[1] * 9]
    assert batch["rejected_labels"].tolist() == [[-100] * 6 + SIXTEEN + [EOS]]
    assert batch["prompt_input_ids"].tolist() == [PROMPT]
    assert batch["prompt_attention_mask"].tolist() == [[1] * 6]
    assert batch["input_ids"] is batch["chosen_input_ids"] and batch["labels"] is batch["chosen_labels"]
    assert all(v.dtype == torch.long for k, v in batch.items())
    assert "tasks" not in batch


def test_collation_exact_tensors_chat(backbone, tmp_path):
    row = {"prompt": [{"role": "user", "content": "What is 2 + 3?"}],
           "chosen": [{"role": "assistant", "content": "5"}],
           "rejected": [{"role": "assistant", "content": "16"}]}
    dm = _data(backbone, tmp_path, [row])
    assert dm.describe()["prompt_template"] == "chat"
    batch = next(iter(dm.train_dataloader()))
    n = len(CHAT_PROMPT)
    assert batch["chosen_input_ids"].tolist() == [CHAT_PROMPT + FIVE + [EOS, NL, PAD]]
    assert batch["chosen_labels"].tolist() == [[-100] * n + FIVE + [EOS, NL, -100]]
    assert batch["rejected_input_ids"].tolist() == [CHAT_PROMPT + SIXTEEN + [EOS, NL]]
    assert batch["rejected_labels"].tolist() == [[-100] * n + SIXTEEN + [EOS, NL]]
    assert batch["chosen_attention_mask"].tolist() == [[1] * (n + 3) + [0]]
    assert batch["prompt_input_ids"].tolist() == [CHAT_PROMPT]


@pytest.mark.parametrize("row", [
    # TRL standard (strings, wrapped as one user/assistant turn by the chat template)
    {"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "16"},
    # TRL conversational, implicit prompt
    {"chosen": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}],
     "rejected": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "16"}]},
    # LLaMA-Factory Alpaca
    {"instruction": "What is 2 + 3?", "input": "", "chosen": "5", "rejected": "16"},
    # LLaMA-Factory ShareGPT
    {"conversations": [{"from": "human", "value": "What is 2 + 3?"}],
     "chosen": {"from": "gpt", "value": "5"}, "rejected": {"from": "gpt", "value": "16"}},
], ids=["trl-standard", "trl-implicit", "llamafactory-alpaca", "llamafactory-sharegpt"])
def test_every_row_form_gives_the_same_tensors(backbone, tmp_path, row):
    batch = next(iter(_data(backbone, tmp_path, [row]).train_dataloader()))
    assert batch["chosen_input_ids"].tolist() == [CHAT_PROMPT + FIVE + [EOS, NL, PAD]]
    assert batch["rejected_input_ids"].tolist() == [CHAT_PROMPT + SIXTEEN + [EOS, NL]]


def test_builtin_pairs_are_deterministic_and_wrong_in_a_plausible_way():
    rows = builtin_pairs("instruction", 200, seed=5)
    assert rows == builtin_pairs("instruction", 200, seed=5)
    assert rows != builtin_pairs("instruction", 200, seed=6)
    assert all(r["chosen"] != r["rejected"] for r in rows)
    for r in rows:
        if r["task"] in ("arithmetic", "count_words"):
            assert 1 <= abs(int(r["chosen"]) - int(r["rejected"])) <= 10
        elif r["task"] == "sort_numbers":
            assert sorted(r["rejected"].split()) == sorted(r["chosen"].split())
        elif r["task"] == "last_word":
            assert r["rejected"] in r["prompt"].split()
        elif r["task"] == "uppercase":
            assert r["rejected"].upper() == r["chosen"]
    assert {r["task"] for r in rows} == {"arithmetic", "last_word", "sort_numbers", "uppercase", "count_words"}
    assert rows[:2] == [
        {"prompt": "What is 96 - 50?", "chosen": "46", "rejected": "38", "answer": "46", "task": "arithmetic"},
        {"prompt": "What is the last word of this list?\n\nmarket shadow wagon ribbon mirror rabbit",
         "chosen": "rabbit", "rejected": "market", "answer": "rabbit", "task": "last_word"},
    ]


def test_builtin_preference_set(backbone):
    dm = PreferenceData(backbone=backbone, builtin_size=100, max_eval_rows=4, eval_batch_size=4)
    dm.setup("fit")
    assert dm.describe()["rows"] == {"train": 90, "val": 4, "test": 4}
    batch = next(iter(dm.val_dataloader()))
    assert len(batch["tasks"]) == 4
    # the prompt is the same in both sequences, the responses differ
    for i in range(4):
        lab_c, lab_r = batch["chosen_labels"][i], batch["rejected_labels"][i]
        first = int((lab_c != -100).nonzero()[0])
        assert torch.equal(batch["chosen_input_ids"][i, :first], batch["rejected_input_ids"][i, :first])
        assert torch.equal(batch["prompt_input_ids"][i][batch["prompt_attention_mask"][i] == 1], batch["chosen_input_ids"][i, :first])
        assert not torch.equal(lab_c, lab_r)


# ---------------------------------------------------------------------------- bad input
SAME = {"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "5"}
GOOD = {"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "16"}


def test_identical_pair_warns_and_counts(backbone, tmp_path):
    src = tmp_path / "pairs.jsonl"
    with pytest.warns(PreferenceDataWarning) as record:
        dm = _data(backbone, tmp_path, [GOOD, SAME])
    assert [str(w.message) for w in record] == [
        f"{src}:2: field 'rejected': equals 'chosen' (the pair teaches no preference) (kept; data.identical: drop leaves such pairs out)"
    ]
    assert dm.describe()["identical_pairs"] == {"policy": "warn", "seen": 1, "dropped": 0}
    assert dm.describe()["rows"]["train"] == 2


def test_identical_pair_dropped(backbone, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", PreferenceDataWarning)
        dm = _data(backbone, tmp_path, [GOOD, SAME], identical="drop")
    assert dm.describe()["identical_pairs"] == {"policy": "drop", "seen": 1, "dropped": 1}
    assert dm.describe()["rows"]["train"] == 1


def test_identical_pair_error(backbone, tmp_path):
    with pytest.raises(DataFormatError) as err:
        _data(backbone, tmp_path, [GOOD, SAME], identical="error")
    assert str(err.value) == f"{tmp_path / 'pairs.jsonl'}:2: field 'rejected': equals 'chosen' (the pair teaches no preference)"


def test_chat_roles_that_do_not_alternate(backbone, tmp_path):
    row = {"prompt": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "What is 2 + 3?"}],
           "chosen": [{"role": "assistant", "content": "5"}], "rejected": [{"role": "assistant", "content": "16"}]}
    with pytest.raises(DataFormatError) as err:
        _data(backbone, tmp_path, [GOOD, row])
    assert str(err.value) == (
        f"{tmp_path / 'pairs.jsonl'}:2: field 'prompt[1].role': roles must alternate user/assistant: expected 'assistant', got 'user'"
    )


def test_chat_completion_from_the_wrong_role(backbone, tmp_path):
    row = {"prompt": [{"role": "user", "content": "What is 2 + 3?"}],
           "chosen": [{"role": "assistant", "content": "5"}], "rejected": [{"role": "user", "content": "16"}]}
    with pytest.raises(DataFormatError) as err:
        _data(backbone, tmp_path, [row])
    assert str(err.value) == (
        f"{tmp_path / 'pairs.jsonl'}:1: field 'rejected[0].role': roles must alternate user/assistant: expected 'assistant', got 'user'"
    )


def test_missing_rejected(backbone, tmp_path):
    with pytest.raises(DataFormatError) as err:
        _data(backbone, tmp_path, [{"prompt": "What is 2 + 3?", "chosen": "5"}])
    assert str(err.value) == f"{tmp_path / 'pairs.jsonl'}:1: field 'rejected': missing"


def test_chat_rows_need_a_chat_template(backbone, tmp_path):
    row = {"prompt": [{"role": "user", "content": "What is 2 + 3?"}],
           "chosen": [{"role": "assistant", "content": "5"}], "rejected": [{"role": "assistant", "content": "16"}]}
    with pytest.raises(DataFormatError) as err:
        _data(backbone, tmp_path, [row], prompt_template="plain")
    assert str(err.value) == f"{tmp_path / 'pairs.jsonl'}:1: field 'prompt': chat messages need prompt_template 'chat' (a tokenizer with a chat template)"


def test_implicit_prompt_without_a_shared_user_turn():
    row = Row({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "5"}],
               "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "6"}]}, "f.jsonl", 4)
    with pytest.raises(DataFormatError) as err:
        parse_pair(row)
    assert str(err.value) == "f.jsonl:4: field 'chosen': no prompt: give 'prompt', or start 'chosen' and 'rejected' with the same user turn"


def test_preference_file_that_is_not_utf8(backbone, tmp_path):
    f = tmp_path / "pairs.jsonl"
    f.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataFormatError) as err:
        PreferenceData(backbone=backbone, source=str(f)).setup("fit")
    assert str(err.value) == f"{f}:2: not UTF-8 (byte 0xe9)"


def test_truncation_counts_pairs(backbone, tmp_path):
    rows = [GOOD, {"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "16 16 16 16 16 16"}]
    dm = _data(backbone, tmp_path, rows, prompt_template="plain", max_length=9)
    assert dm.describe()["truncation"] == {"policy": "truncate", "seen": 2, "truncated": 1, "dropped": 0}
    assert [len(e.rejected.input_ids) for e in dm.splits["train"]] == [9, 9]


# ---------------------------------------------------------------------------- with a method and the CLI
def test_a_supervised_method_validates_on_the_chosen_responses(backbone):
    import lightning as L

    from ftbench.methods import Baseline

    dm = PreferenceData(backbone=backbone, builtin_size=60, max_eval_rows=6, eval_batch_size=6)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = trainer.validate(Baseline(backbone=backbone), datamodule=dm, verbose=False)[0]
    # the built-in pairs carry exact answers (the chosen ones), so validation also scores exact match
    assert metrics["val/loss"] > 0 and 0.0 <= metrics["val/accuracy"] <= 1.0
    assert {k.split("/")[1] for k in metrics if k.count("/") == 2} <= {"arithmetic", "last_word", "sort_numbers", "uppercase", "count_words"}


def test_preference_yaml_parses():
    from ftbench.cli import cli_main

    with pytest.raises(SystemExit) as exit_:
        cli_main(["fit", "--data", str(CONFIGS / "data" / "preference.yaml"), "--print_config"])
    assert exit_.value.code in (0, None)
