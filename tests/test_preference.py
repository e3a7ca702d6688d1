"""Preference pairs: exact collated tensors (plain and chat), every accepted row form, the built-in
pairs and the split that keeps each prompt in one split, the exact-match keys of evaluation batches,
prompt batches, the easy ``builtin:capitals`` set (learnt by a tiny reward model), identical pairs
(warn/drop/error), bad rows (one chat check shared with the instruction regime), the shipped YAML,
and a supervised method validating on the chosen responses."""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from ftbench.data.base import DataFormatError, Row, prompt_key
from ftbench.data.instruction import conversation
from ftbench.data.preference import (
    PreferenceCollator,
    PreferenceData,
    PreferenceDataWarning,
    PreferenceExample,
    builtin_pairs,
    parse_pair,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PROMPT = [289, 280, 276, 354, 279, 34]  # "What is 2 + 3?" with the tiny tokenizer
PROMPT_12_30 = [289, 280, 408, 354, 279, 19, 34]  # "What is 12 + 30?"
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


def test_builtin_preference_split_keeps_each_prompt_in_one_split(backbone):
    """The shipped preference.yaml (2000 built-in pairs, 2% val, 5% test, seed 42): a plain row split
    put 132 of its 1,860 training pairs on a prompt that val or test also holds; the shared rule: 0."""
    args = yaml.safe_load((CONFIGS / "data" / "preference.yaml").read_text())["init_args"]
    dm = PreferenceData(backbone=backbone, **args)
    parts = dm.split_rows()
    assert {k: len(v) for k, v in parts.items()} == {"train": 1860, "val": 40, "test": 100}
    keys = {k: [prompt_key(parse_pair(r).prompt) for r in v] for k, v in parts.items()}
    assert sum(k in set(keys["val"]) | set(keys["test"]) for k in keys["train"]) == 0
    assert not set(keys["val"]) & set(keys["test"])
    assert len(set().union(*map(set, keys.values()))) == 1651  # distinct prompts among the 2000 pairs
    # what the plain row split of the same rows (the earlier rule) shared
    rows = builtin_pairs("instruction", 2000, 42)
    order = list(range(2000))
    random.Random(42).shuffle(order)
    held = {prompt_key(rows[i]["prompt"]) for i in order[:140]}
    assert sum(prompt_key(rows[i]["prompt"]) in held for i in order[140:]) == 132


def test_explicit_val_source_leaves_its_prompts_out_of_training(backbone, tmp_path):
    rows = [GOOD, {"prompt": "What is 12 + 30?", "chosen": "42", "rejected": "41"}]
    val = _jsonl(tmp_path / "val.jsonl", [{"instruction": "What is 2 +  3?", "chosen": "5", "rejected": "6"}])
    dm = _data(backbone, tmp_path, rows, val_source=val, prompt_template="plain")
    # "What is 2 +  3?" is "What is 2 + 3?" once white space is normalised
    assert [e.prompt_text for e in dm.splits["train"]] == ["What is 12 + 30?"]
    assert [e.answer for e in dm.splits["val"]] == [None]
    assert dm.describe()["removed_as_held_out"] == 1


# ---------------------------------------------------------------------------- exact-match evaluation data
def test_evaluation_batches_carry_generation_prompts_and_answers(backbone, tmp_path):
    rows = [{**GOOD, "answer": "5"}, {"prompt": "What is 12 + 30?", "chosen": "42", "rejected": "41", "answer": "42"}]
    src = _jsonl(tmp_path / "pairs.jsonl", rows)
    dm = PreferenceData(backbone=backbone, source=src, val_source=src, test_source=src, val_fraction=0.0,
                        test_fraction=0.0, prompt_template="plain", eval_batch_size=2)
    dm.setup("validate")
    assert dm.splits["train"] == []  # every training pair's prompt is in val/test
    for batch in (next(iter(dm.val_dataloader())), next(iter(dm.test_dataloader()))):
        # as in the instruction regime: the prompt left-padded (pad 3), its mask, the reference answers
        assert batch["gen_input_ids"].tolist() == [[PAD] + PROMPT, PROMPT_12_30]
        assert batch["gen_attention_mask"].tolist() == [[0] + [1] * 6, [1] * 7]
        assert batch["answers"] == ["5", "42"]
        assert torch.equal(batch["gen_input_ids"], batch["prompt_input_ids"])
        assert torch.equal(batch["gen_attention_mask"], batch["prompt_attention_mask"])
    # greedy generation needs at most the longest answer + 4 tokens ("42": 2 tokens)
    assert dm.max_answer_tokens == len(backbone.tokenizer("42", add_special_tokens=False)["input_ids"]) + 4 == 6


def test_training_batches_and_rows_without_an_answer_have_no_generation_keys(backbone, tmp_path):
    dm = _data(backbone, tmp_path, [{**GOOD, "answer": "5"}], prompt_template="plain")
    train = next(iter(dm.train_dataloader()))
    assert not {"gen_input_ids", "gen_attention_mask", "answers"} & set(train)
    ex = dm.splits["train"][0]
    assert (ex.answer, ex.prompt_text) == ("5", "What is 2 + 3?")
    no_answer = PreferenceExample(ex.chosen, ex.rejected, ex.prompt_ids, answer=None)
    collate = PreferenceCollator(PAD)
    assert "answers" in collate([ex]) and "answers" not in collate([ex, no_answer])  # every row needs one


def test_answer_must_be_a_string(backbone, tmp_path):
    with pytest.raises(DataFormatError) as err:
        _data(backbone, tmp_path, [{**GOOD, "answer": 5}])
    assert str(err.value) == f"{tmp_path / 'pairs.jsonl'}:1: field 'answer': must be a string, got int"


# ---------------------------------------------------------------------------- prompt batches (online RL)
def test_prompt_batches_exact(backbone, tmp_path):
    rows = [{**GOOD, "task": "add"}, {"prompt": "What is 12 + 30?", "chosen": "42", "rejected": "41", "answer": "42"}]
    dm = _data(backbone, tmp_path, rows, prompt_template="plain", prompt_batches=True, batch_size=2)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"prompt_input_ids", "prompt_attention_mask", "prompts", "answers", "tasks"}
    order = [batch["prompts"].index(p) for p in ("What is 2 + 3?", "What is 12 + 30?")]
    assert [batch["answers"][i] for i in order] == [None, "42"]
    assert [batch["tasks"][i] for i in order] == ["add", "default"]
    assert [batch["prompt_input_ids"][i].tolist() for i in order] == [[PAD] + PROMPT, PROMPT_12_30]
    assert [batch["prompt_attention_mask"][i].tolist() for i in order] == [[0] + [1] * 6, [1] * 7]


def test_prompt_batches_chat(backbone, tmp_path):
    dm = _data(backbone, tmp_path, [GOOD], prompt_batches=True)
    batch = next(iter(dm.train_dataloader()))
    assert batch["prompt_input_ids"].tolist() == [CHAT_PROMPT]
    assert batch["prompts"] == ["<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"]
    val = dm.collator()(dm.splits["train"])  # evaluation batches stay preference batches
    assert "chosen_input_ids" in val and "prompts" not in val


# ---------------------------------------------------------------------------- builtin:capitals
def test_capitals_pairs_are_deterministic():
    rows = builtin_pairs("capitals", 300, seed=0)
    assert rows == builtin_pairs("capitals", 300, seed=0) and rows != builtin_pairs("capitals", 300, seed=1)
    assert rows[:2] == [
        {"prompt": "Repeat these words: silver candle engine dragon yellow", "chosen": "SILVER CANDLE ENGINE DRAGON YELLOW",
         "rejected": "silver candle engine dragon yellow", "answer": "SILVER CANDLE ENGINE DRAGON YELLOW", "task": "capitals"},
        {"prompt": "Repeat these words: yellow pillow market river", "chosen": "YELLOW PILLOW MARKET RIVER",
         "rejected": "yellow pillow market river", "answer": "YELLOW PILLOW MARKET RIVER", "task": "capitals"},
    ]
    for r in rows:
        words = r["prompt"].removeprefix("Repeat these words: ")
        assert r["rejected"] == words and r["chosen"] == r["answer"] == words.upper() and 3 <= len(words.split()) <= 5
    assert len({r["prompt"] for r in rows}) == 300


def test_unknown_builtin_preference_set(backbone):
    with pytest.raises(ValueError) as err:
        PreferenceData(backbone=backbone, source="builtin:capital").setup("fit")
    assert str(err.value) == ("unknown built-in preference set 'capital'; choose from capitals, arithmetic, last_word, "
                              "sort_numbers, uppercase, count_words, instruction")


def test_a_tiny_reward_model_learns_capitals_in_a_few_dozen_steps(backbone, tiny_model_dir):
    """Bradley-Terry on the 2-layer, 64-dim random Llama (a scalar head at the last real token):
    20 steps of 8 pairs take held-out pairwise accuracy from chance to 1."""
    from transformers import AutoModelForSequenceClassification

    dm = PreferenceData(backbone=backbone, source="builtin:capitals", builtin_size=400, val_fraction=0.1,
                        test_fraction=0.0, batch_size=8, eval_batch_size=40, seed=0)
    dm.setup("fit")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=1)

    def scores(batch, side):
        mask = batch[f"{side}_attention_mask"]
        hidden = model.model(input_ids=batch[f"{side}_input_ids"], attention_mask=mask).last_hidden_state
        return model.score(hidden[torch.arange(len(mask)), mask.sum(1) - 1]).squeeze(-1)

    def accuracy():
        batch = next(iter(dm.val_dataloader()))
        with torch.no_grad():
            return float((scores(batch, "chosen") > scores(batch, "rejected")).float().mean())

    before = accuracy()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _, batch in zip(range(20), dm.train_dataloader()):
        loss = -torch.nn.functional.logsigmoid(scores(batch, "chosen") - scores(batch, "rejected")).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert 0.3 < before < 0.7 and accuracy() == 1.0 and float(loss.detach()) < 0.1


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


U, A = {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}
BAD_CHATS = {
    "empty": ([], "field '{f}': must be a non-empty list of messages"),
    "not-an-object": (["hi", A], "field '{f}[0]': must be an object with 'role' and 'content'"),
    "unknown-role": ([{"role": "bot", "content": "q"}, A], "field '{f}[0].role': unknown role 'bot' (expected one of system, user, assistant)"),
    "content": ([{"role": "user", "content": 3}, A], "field '{f}[0].content': missing or not a string"),
    "not-alternating": ([U, U, A], "field '{f}[1].role': roles must alternate user/assistant: expected 'assistant', got 'user'"),
    "system-later": ([U, {"role": "system", "content": "s"}, A], "field '{f}[1].role': roles must alternate user/assistant: expected 'assistant', got 'system'"),
    "last-from-user": ([U, A, U], "field '{f}[2].role': the last message must be from the assistant"),
}


@pytest.mark.parametrize("case", list(BAD_CHATS))
def test_one_chat_check_for_instruction_and_preference_rows(case):
    """The same bad conversation gets the same message from both regimes (one check in base.py)."""
    msgs, message = BAD_CHATS[case]
    with pytest.raises(DataFormatError) as instruction:
        conversation(Row({"messages": msgs}, "f.jsonl", 3))
    with pytest.raises(DataFormatError) as preference:
        parse_pair(Row({"chosen": msgs, "rejected": [U, {"role": "assistant", "content": "b"}]}, "f.jsonl", 3))
    assert str(instruction.value) == "f.jsonl:3: " + message.format(f="messages")
    assert str(preference.value) == "f.jsonl:3: " + message.format(f="chosen")


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

    from ftbench.objectives import SFT
    from ftbench.tuners import NoTuning

    dm = PreferenceData(backbone=backbone, builtin_size=60, max_eval_rows=6, eval_batch_size=6)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = trainer.validate(SFT(backbone=backbone, tuner=NoTuning()), datamodule=dm, verbose=False)[0]
    # the built-in pairs carry exact answers (the chosen ones), so validation also scores exact match
    assert metrics["val/loss"] > 0 and 0.0 <= metrics["val/accuracy"] <= 1.0
    assert {k.split("/")[1] for k in metrics if k.count("/") == 2} <= {"arithmetic", "last_word", "sort_numbers", "uppercase", "count_words"}


def test_preference_yaml_parses():
    from ftbench.cli import cli_main

    with pytest.raises(SystemExit) as exit_:
        cli_main(["fit", "--data", str(CONFIGS / "data" / "preference.yaml"), "--print_config"])
    assert exit_.value.code in (0, None)
