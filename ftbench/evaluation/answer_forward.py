"""One forward of an evaluation batch that serves both its answer loss and its greedy generation.

An evaluation batch carries each row twice: right-padded ``prompt + answer`` (``input_ids``, with
``labels`` -100 on the prompt) for the loss, and the left-padded prompt alone (``gen_input_ids``) for
generation. Scoring them apart computes the prompt twice and full-vocabulary logits at every position
although only the answer tokens (~6 of ~45 a row in the quickstart) count. Here the rows are laid out
as generation lays them out, the left-padded prompt (``P`` columns) followed by the right-padded answer
(``A`` columns, the last one dropped: it predicts nothing)::

    [pad pad p0 p1 p2 | a0 a1 a2 pad]      logits kept: the last A positions, from p2 on,
                                           so position j predicts a_j (no shift)

One forward of ``P + A - 1`` columns with ``logits_to_keep = A`` gives the logits of the answer tokens
only (the rollout's ``logits_to_keep`` trick, :func:`ftbench.objectives.rollout.completion_logps`), and
its KV cache cut back to the first ``P - 1`` columns is the prompt's cache: ``generate`` continues from
it and computes only the last prompt token again (it needs one uncached token to start from).

The loss equals the right-padded forward's mathematically: the same tokens at the same positions
(``position_ids`` from the attention mask, as ``generate`` makes them) attend to the same tokens. In
floating point the two differ by the reordering of the sums in differently shaped matrix products
(tests/test_evaluation_speed.py: the answer logits within 1e-10 in float64 and 1e-5 in float32; the
loss, computed in float32 as in training, within 1e-6 relative), and greedy answers are the same
unless two tokens' logits tie to that precision.

Used only where it is this exact: the labels of every row are its answer, i.e. -100 on its prompt
(``gen_input_ids``' tokens, first in ``input_ids``) and the input token on every other attended
position; no packed ``position_ids``; a model whose forward takes ``logits_to_keep``; a tuner whose
``generate`` continues a cache (:attr:`ftbench.tuners.base.Tuner.reuses_prompt_cache`: not prompt
learning, which puts virtual tokens in front). The cache is reused only when it is a plain
:class:`transformers.DynamicCache` of full-attention layers (a sliding-window or recurrent layer
cannot be cut back). Otherwise the caller computes the loss and generates as before.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Optional

import torch

IGNORE_INDEX = -100  # ftbench.data.base.IGNORE_INDEX (data sits beside evaluation; one value, checked in tests)


@dataclass
class AnswerForward:
    """The answer logits of an evaluation batch and, when kept, its prompts' KV cache."""

    logits: torch.Tensor  # (B, A, vocabulary): position j predicts answer token j
    targets: torch.Tensor  # (B, A): the answer tokens, -100 after each row's answer
    prompt_cache: Any = None  # the KV cache of gen_input_ids[:, :-1] (for generate), or None


def cache_argument() -> str:
    """The name ``generate`` and a model's output give the KV cache: ``cache`` since transformers 5.2x
    (``past_key_values`` still works there with a deprecation warning, until 5.40), before it
    ``past_key_values``."""
    from transformers.generation import utils

    return "cache" if "cache" in getattr(utils, "ALL_CACHE_NAMES", ()) else "past_key_values"


def takes_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the causal LM under ``model`` (a peft wrapper's base model) accepts ``logits_to_keep``."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def answer_layout(batch: dict[str, Any]) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(answer ids (B, A), answer mask (B, A), prompt lengths (B,))`` when every row's labels are
    exactly its tokens after its generation prompt (see the module doc); None otherwise."""
    if "gen_input_ids" not in batch or batch.get("position_ids") is not None:
        return None
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    gen_ids, gen_mask = batch["gen_input_ids"], batch["gen_attention_mask"]
    if ids.shape[0] != gen_ids.shape[0]:
        return None
    prompt_len, row_len = gen_mask.sum(1), mask.sum(1)
    if bool((prompt_len < 1).any()) or bool((row_len <= prompt_len).any()):
        return None
    col = torch.arange(ids.shape[1], device=ids.device)[None, :]
    in_answer = (col >= prompt_len[:, None]) & (col < row_len[:, None])
    in_prompt = col < prompt_len[:, None]
    if not bool(torch.where(in_answer, labels == ids, labels == IGNORE_INDEX).all()):
        return None  # labels somewhere else (a multi-turn row, a trained prompt) or none on the answer
    P = gen_ids.shape[1]  # the longest prompt: shorter than the longest row, which has an answer after it
    # the prompt tokens of input_ids (left-aligned) against gen_input_ids' (right-aligned)
    gen_col = (P - prompt_len)[:, None] + col[:, :P]
    gen_tokens = gen_ids.gather(1, gen_col.clamp(max=P - 1))
    if not bool(((gen_tokens == ids[:, :P]) | ~in_prompt[:, :P]).all()):
        return None
    answer_len = row_len - prompt_len
    A = int(answer_len.max())
    answer_col = prompt_len[:, None] + torch.arange(A, device=ids.device)[None, :]
    answer_mask = torch.arange(A, device=ids.device)[None, :] < answer_len[:, None]
    answer = ids.gather(1, answer_col.clamp(max=ids.shape[1] - 1)).masked_fill(~answer_mask, 0)
    return answer, answer_mask.long(), prompt_len


def reusable_cache(cache: Any) -> bool:
    """Whether ``cache`` can be cut back to the prompt: a DynamicCache of full-attention layers only."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    return isinstance(cache, DynamicCache) and all(type(layer) is DynamicLayer for layer in cache.layers)


def answer_forward(model: torch.nn.Module, batch: dict[str, Any], keep_cache: bool) -> Optional[AnswerForward]:
    """One forward of ``batch`` laid out as ``[left-padded prompt | answer]`` (see the module doc): the
    logits of its answer tokens, and, with ``keep_cache``, the KV cache of its prompts less their last
    token (None when the cache cannot be cut back). None when the batch's labels are not its answers or
    the model takes no ``logits_to_keep``."""
    layout = answer_layout(batch)
    if layout is None or not takes_logits_to_keep(model):
        return None
    answer, answer_mask, _ = layout
    gen_ids, gen_mask = batch["gen_input_ids"], batch["gen_attention_mask"]
    P, A = gen_ids.shape[1], answer.shape[1]
    input_ids = torch.cat([gen_ids, answer[:, :-1]], dim=1)
    attention_mask = torch.cat([gen_mask, answer_mask[:, :-1]], dim=1)
    # generate's positions: count the attended tokens (padding gets 0, and is masked)
    position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=keep_cache, logits_to_keep=A)
    cache = out.get(cache_argument()) if keep_cache else None
    if cache is not None:
        if reusable_cache(cache):
            cache.crop(-A)  # P + A - 1 columns -> the first P - 1: generate computes the last prompt token
            assert cache.get_seq_length() == P - 1
        else:
            cache = None
    return AnswerForward(out.logits[:, -A:], answer.masked_fill(answer_mask == 0, IGNORE_INDEX), cache)
