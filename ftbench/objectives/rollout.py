"""What the online-RL objectives (GRPO/RLOO, PPO) share in a rollout: sampling through the tuner,
decoding, the reward functions' scores and their weighted sum, the per-token log-probs of sampled
completions, and greedy answers for evaluation. Functions of what they are given (model, tuner,
tokenizer), so each objective calls them with its own."""

from __future__ import annotations

from typing import Any, Optional

import torch

from ftbench.objectives.losses import token_logps
from ftbench.objectives.rewards import RewardFunction, finite_or_nan


def completion_masks(completion_ids: torch.Tensor, eos_token_id: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask, ended)`` for sampled completions ``(B, T)``: ``mask`` (long) is 1 on the tokens up to
    and including each row's first EOS (every token of a row without EOS), 0 after; ``ended`` (bool,
    ``(B,)``) says whether the row has an EOS. Whatever follows the first EOS (padding, which is the
    EOS itself when pad = EOS) is masked, as TRL's completion mask."""
    B, T = completion_ids.shape
    if eos_token_id is None:
        return torch.ones_like(completion_ids), torch.zeros(B, dtype=torch.bool, device=completion_ids.device)
    is_eos = completion_ids == eos_token_id
    ended = is_eos.any(dim=1)
    first = torch.full((B,), T, dtype=torch.long, device=completion_ids.device)
    first[ended] = is_eos.int().argmax(dim=1)[ended]
    positions = torch.arange(T, device=completion_ids.device).expand(B, -1)
    return (positions <= first.unsqueeze(1)).long(), ended


@torch.no_grad()
def sample_completions(model: torch.nn.Module, tuner: Any, tokenizer: Any, prompt_ids: torch.Tensor,
                       prompt_mask: torch.Tensor, max_new_tokens: int, **sampling: Any) -> torch.Tensor:
    """New tokens after left-padded prompts (``tuner.generate``), the model in eval mode (no dropout)
    for generation and back in its previous mode after."""
    was_training = model.training
    model.eval()
    try:
        return tuner.generate(model, tokenizer, prompt_ids, prompt_mask, max_new_tokens, **sampling)
    finally:
        model.train(was_training)


def decode_completions(tokenizer: Any, completion_ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    """The completions' texts up to the mask's end, special tokens left out (as the evaluator decodes)."""
    rows = [ids[: int(n)].tolist() for ids, n in zip(completion_ids, mask.sum(1))]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


def reward_inputs(batch: dict[str, Any], completion_ids: torch.Tensor, completion_mask: torch.Tensor, tokenizer: Any,
                  repeat: int = 1) -> tuple[list[str], list[str], dict[str, Any]]:
    """``(prompts, completion texts, columns)`` for the reward functions (TRL's ``f(prompts,
    completions, **columns)``): each prompt row of ``batch`` repeated ``repeat`` times (one per
    completion), its ``answers``/``tasks``, and the unpadded ``prompt_ids``/``completion_ids``."""
    expand = lambda values: [v for v in values for _ in range(repeat)]  # noqa: E731
    unpadded = [ids[m.bool()].tolist() for ids, m in zip(batch["prompt_input_ids"], batch["prompt_attention_mask"])]
    columns = {
        "answers": expand(batch.get("answers") or [None] * len(unpadded)),
        "tasks": expand(batch.get("tasks") or ["default"] * len(unpadded)),
        "prompt_ids": expand(unpadded),
        "completion_ids": [ids[: int(n)].tolist() for ids, n in zip(completion_ids, completion_mask.sum(1))],
    }
    prompts = expand(batch.get("prompts") or tokenizer.batch_decode(unpadded, skip_special_tokens=False))
    return prompts, decode_completions(tokenizer, completion_ids, completion_mask), columns


def score_completions(funcs: list[RewardFunction], objective: Any, prompts: list[str], completions: list[str],
                      **columns: Any) -> torch.Tensor:
    """``(N, F)`` float32 rewards of each function on ``objective.device`` (NaN where one returned None);
    each function is bound to ``objective`` first (a reward model loads there)."""
    out = []
    for func in funcs:
        func.bind(objective)
        values = func(prompts=prompts, completions=completions, **columns)
        out.append(finite_or_nan(values, func.name, len(completions)))
    return torch.tensor(out, dtype=torch.float32, device=objective.device).T.reshape(len(completions), len(out))


def weighted_reward(per_func: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """The weighted sum over functions, NaN (``None``) entries left out (TRL's ``nansum``)."""
    w = torch.tensor(weights, dtype=per_func.dtype, device=per_func.device)
    return (per_func * w).nansum(dim=1)


def completion_logps(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     position_ids: torch.Tensor, completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                     temperature: float = 1.0, entropy: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-token log-probs ``(N, T)`` of the completion tokens (the last ``T`` of ``input_ids``) under
    ``model`` at the sampling temperature (``logits / temperature``, the distribution that was
    sampled; 0 on masked positions), and, with ``entropy``, the per-token entropy (no grad)."""
    T = completion_ids.shape[1]
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=False, logits_to_keep=T + 1)
    logits = out.logits[:, -(T + 1):]  # the last prompt position predicts the first completion token
    if temperature != 1.0:
        logits = logits / temperature
    labels = torch.cat([completion_ids[:, :1], completion_ids.masked_fill(completion_mask == 0, -100)], dim=1)
    logps, _ = token_logps(logits, labels)
    ent = None
    if entropy:
        with torch.no_grad():
            ent = torch.stack([-(lp.exp() * lp).sum(-1) for lp in
                               (torch.log_softmax(row[:-1].float(), dim=-1) for row in logits)])
    return logps, ent


@torch.no_grad()
def greedy_completions(model: torch.nn.Module, tuner: Any, tokenizer: Any, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor, max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Greedy continuations of left-padded prompts: ``(new ids, their mask up to the first EOS,
    texts)``, decoded as the evaluator decodes its own (special tokens left out)."""
    new = tuner.generate(model, tokenizer, input_ids, attention_mask, max_new_tokens, do_sample=False)
    mask, _ = completion_masks(new, tokenizer.eos_token_id)
    return new, mask, decode_completions(tokenizer, new, mask)
