"""GGUF backbones: a tiny llama-architecture GGUF written in the test (F32 tensors + the byte-level BPE
tokenizer in its metadata, q/k permuted as llama.cpp's converter does) loads through ``Backbone``,
is cached once as a safetensors folder, is reused from the cache, and a broken cache is rebuilt."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ftbench import gguf_cache
from ftbench.backbone import Backbone

PROMPT = "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n"

# Hugging Face Llama names -> GGUF names (llama.cpp's tensor map for the llama architecture)
TOP = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight",
       "model.norm.weight": "output_norm.weight"}
PER_LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def permute(w: np.ndarray, n_head: int, n_kv: int) -> np.ndarray:
    """llama.cpp's ``convert_hf_to_gguf.py`` permutation of q/k rows (transformers undoes it on load)."""
    n = n_kv if n_kv != n_head else n_head
    return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model_dir: Path, out: Path) -> Path:
    """Write the Hugging Face folder ``model_dir`` (the tiny Llama) as an F32 llama GGUF at ``out``."""
    import gguf
    from safetensors.torch import load_file

    cfg = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    nh, nkv, hidden = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_embedding_length(hidden)
    w.add_rope_dimension_count(hidden // nh)
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    w.add_rope_freq_base(float(theta))
    w.add_vocab_size(cfg["vocab_size"])
    # tokenizer: the byte-level vocabulary as spelled in tokenizer.json, special tokens typed CONTROL (3)
    added = {t["id"]: t["content"] for t in tok["added_tokens"]}
    tokens = [""] * cfg["vocab_size"]
    for t, i in tok["model"]["vocab"].items():
        tokens[i] = t
    for i, t in added.items():
        tokens[i] = t
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in added else 1 for i in range(len(tokens))])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_pad_token_id(cfg["pad_token_id"])
    w.add_chat_template((model_dir / "chat_template.jinja").read_text())
    for name, t in load_file(model_dir / "model.safetensors").items():
        a = t.float().numpy()
        if name in TOP:
            gname = TOP[name]
        else:
            _, _, layer, *rest = name.split(".")
            module = ".".join(rest[:-1])
            gname = f"blk.{layer}.{PER_LAYER[module]}.weight"
            if module == "self_attn.q_proj":
                a = permute(a, nh, nh)
            elif module == "self_attn.k_proj":
                a = permute(a, nh, nkv)
        w.add_tensor(gname, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir, tmp_path_factory) -> Path:
    return write_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture
def count_converts(monkeypatch):
    calls: list[Path] = []
    real = gguf_cache.convert

    def counting(gguf: Path, out: Path) -> None:
        calls.append(gguf)
        real(gguf, out)

    monkeypatch.setattr(gguf_cache, "convert", counting)
    return calls


def forbid_convert(monkeypatch):
    def no(gguf, out):
        raise AssertionError("converted again instead of using the cache")

    monkeypatch.setattr(gguf_cache, "convert", no)


def _entries(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "models").iterdir())


def test_gguf_loads_and_matches_the_original(tiny_model_dir, tiny_gguf, tmp_path, count_converts):
    b = Backbone(model=str(tiny_gguf), cache_dir=str(tmp_path))
    folder = Path(b.resolve())
    assert count_converts == [tiny_gguf.resolve()]
    assert folder.parent == tmp_path / "models" and folder.name.startswith("tiny-")
    manifest = json.loads((folder / "ftbench-cache.json").read_text())
    assert manifest["source"] == str(tiny_gguf.resolve())
    assert "model.safetensors" in manifest["files"] and "config.json" in manifest["files"]
    for name, size in manifest["files"].items():
        assert (folder / name).stat().st_size == size
    assert _entries(tmp_path) == [folder.name]  # no temporary build folder left behind

    # the tokenizer came through the GGUF metadata: same ids, specials and chat template
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref_tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert b.tokenizer(PROMPT)["input_ids"] == ref_tok(PROMPT)["input_ids"]
    assert (b.tokenizer.bos_token, b.tokenizer.eos_token, b.tokenizer.pad_token) == ("<|endoftext|>", "<|im_end|>", "<pad>")
    assert b.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == (
        "<|im_start|>user\nhi<|im_end|>\n")
    # the weights: q/k un-permuted on load, so the logits are the original model's
    model = b.load_model()
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = torch.tensor([ref_tok(PROMPT)["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-5)
    assert b.describe()["resolved"] == str(folder)


def test_second_load_uses_the_cache(tiny_gguf, tmp_path, monkeypatch):
    first = Backbone(model=str(tiny_gguf), cache_dir=str(tmp_path)).resolve()
    forbid_convert(monkeypatch)
    b = Backbone(model=str(tiny_gguf), cache_dir=str(tmp_path))
    assert b.resolve() == first
    assert b.load_model().config.num_hidden_layers == 2
    # a folder + gguf_file names the same file, so the same cache entry
    assert Backbone(model=str(tiny_gguf.parent), gguf_file=tiny_gguf.name, cache_dir=str(tmp_path)).resolve() == first


def test_cache_dir_defaults_to_ftbench_cache(tiny_gguf, tmp_path, monkeypatch, count_converts):
    monkeypatch.setenv("FTBENCH_CACHE", str(tmp_path / "env-cache"))
    folder = Path(Backbone(model=str(tiny_gguf)).resolve())
    assert folder.parent == tmp_path / "env-cache" / "models"


@pytest.mark.parametrize("damage", ["truncate-weights", "delete-manifest", "delete-weights"])
def test_corrupt_cache_is_rebuilt(tiny_gguf, tmp_path, count_converts, damage):
    folder = Path(gguf_cache.cached_folder(tiny_gguf, tmp_path))
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    if damage == "truncate-weights":
        with weights.open("r+b") as f:
            f.truncate(size // 2)
    elif damage == "delete-manifest":
        (folder / "ftbench-cache.json").unlink()
    else:
        weights.unlink()
    again = Path(gguf_cache.cached_folder(tiny_gguf, tmp_path))
    assert again == folder and len(count_converts) == 2  # rebuilt, in the same place
    assert weights.stat().st_size == size
    assert (folder / "ftbench-cache.json").is_file()
    assert _entries(tmp_path) == [folder.name]
    Backbone(model=str(tiny_gguf), cache_dir=str(tmp_path)).load_model()  # and it loads


def test_a_build_finished_by_another_process_meanwhile_is_kept(tiny_gguf, tmp_path, monkeypatch):
    """The entry appears (another process's rename) between the first validity check and the
    clean-up of a broken entry: it must be used, not deleted and rebuilt."""
    folder = Path(gguf_cache.cached_folder(tiny_gguf, tmp_path))
    real_valid = gguf_cache._valid
    calls = []

    def valid(f):  # the first check ran just before the other process's rename
        calls.append(f)
        return False if len(calls) == 1 else real_valid(f)

    monkeypatch.setattr(gguf_cache, "_valid", valid)
    forbid_convert(monkeypatch)
    assert gguf_cache.cached_folder(tiny_gguf, tmp_path) == folder
    assert (folder / "model.safetensors").is_file()


def test_interrupted_build_leaves_nothing_behind(tiny_gguf, tmp_path, monkeypatch):
    def half(gguf, out):
        (out / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt  # e.g. Ctrl-C during the conversion

    monkeypatch.setattr(gguf_cache, "convert", half)
    with pytest.raises(KeyboardInterrupt):
        gguf_cache.cached_folder(tiny_gguf, tmp_path)
    assert _entries(tmp_path) == []


def test_a_changed_gguf_gets_a_new_entry(tiny_model_dir, tiny_gguf, tmp_path, count_converts):
    copy = tmp_path / "src" / "tiny.gguf"
    copy.parent.mkdir()
    copy.write_bytes(tiny_gguf.read_bytes())
    a = gguf_cache.cached_folder(copy, tmp_path / "c")
    data = bytearray(copy.read_bytes())
    data[-4:] = b"\x00\x00\x00\x40"  # the last float of the last tensor (a norm weight, 1.0) becomes 2.0
    copy.write_bytes(bytes(data))
    b = gguf_cache.cached_folder(copy, tmp_path / "c")
    assert a != b and len(count_converts) == 2


def test_a_same_size_rewrite_in_the_middle_is_noticed(tmp_path):
    """A big GGUF rewritten in place (same name, same size) with a change outside its first and last
    MiB is a different model: it must not be served the old cache entry."""
    f = tmp_path / "big.gguf"
    f.write_bytes(b"\x01" * (3 << 20))
    before = gguf_cache._fingerprint(f)
    with f.open("r+b") as fh:
        fh.seek(3 << 19)  # 1.5 MiB: neither the first nor the last MiB
        fh.write(b"\x02")
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 1_000_000))  # a later write
    assert gguf_cache._fingerprint(f) != before


def test_unreadable_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ValueError) as e:
        Backbone(model=str(bad), cache_dir=str(tmp_path / "c")).resolve()
    assert str(e.value).startswith(f"backbone.model: cannot read GGUF file {str(bad)!r}: ")
    assert not any((tmp_path / "c" / "models").iterdir())


def test_missing_gguf_in_a_folder(tmp_path):
    from ftbench.errors import BackboneError

    with pytest.raises(BackboneError) as e:
        Backbone(model=str(tmp_path), gguf_file="nope.gguf", cache_dir=str(tmp_path)).resolve()
    assert str(e.value) == f"backbone.gguf_file: GGUF file {str(tmp_path / 'nope.gguf')!r} does not exist"
