"""Tiny, offline, deterministic backbones for tests and pinned-number scripts.

A byte-level BPE tokenizer is trained in-process on a fixed corpus (with ChatML special tokens and a
chat template) and a 2-layer Llama is built from a config with a fixed seed, then saved as a normal
Hugging Face folder (safetensors + tokenizer) so that tests exercise the real loading path.
"""

from __future__ import annotations

from pathlib import Path

from ftbench.data import tasks

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]


def corpus() -> list[str]:
    rows = tasks.generate("instruction", 400, seed=0)
    lines = [f"{r['instruction']} {r['input']} {r['output']}" for r in rows]
    lines += ["Below is an instruction that describes a task. ### Instruction: ### Input: ### Response:"] * 5
    lines += ["user assistant system What is the answer? The quick brown fox jumps over the lazy dog."] * 5
    return lines


def build_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<pad>", unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_llama(path: str | Path, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                     intermediate: int = 128, seed: int = 0, tie_word_embeddings: bool = False) -> Path:
    """Save a tiny random Llama + tokenizer at ``path`` and return it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tok = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path
