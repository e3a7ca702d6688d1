"""Multiple choice by log-likelihood, the lm-evaluation-harness way: each option is scored as a
continuation of the prompt (the sum of its tokens' log-probabilities), and the highest wins.

``mc_accuracy`` is lm-eval's ``acc`` (argmax of the sums); ``mc_accuracy_norm`` its ``acc_norm``
(argmax of each sum divided by the option's length; lm-eval 0.4 divides by ``len(choice)`` in
characters, which is its byte length for ASCII, and so does this). The model never has to produce the
answer in a format, so an untuned base model is compared fairly with a tuned one.

The prompt is the generation prompt of the row (the chat template's assistant turn, or the prompt
template), the continuation the option's tokens as the training answer is tokenised (without EOS).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

#: sequences per forward pass when scoring options
CHUNK = 32


def pick_choice(loglikelihoods: Sequence[float], choices: Sequence[str], normalised: bool = False) -> int:
    """The index of the best option: the highest log-likelihood, or with ``normalised`` the highest
    log-likelihood per character of the option (lm-eval's ``acc_norm``). Ties go to the first."""
    if normalised:
        scores = [ll / max(1, len(c)) for ll, c in zip(loglikelihoods, choices)]
    else:
        scores = list(loglikelihoods)
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


@torch.no_grad()
def continuation_loglikelihoods(
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    pad_id: int,
    device: Optional[torch.device] = None,
    chunk: int = CHUNK,
) -> list[float]:
    """For each ``(context_ids, continuation_ids)``: the summed log-probability of the continuation's
    tokens after the context, ``sum_t log p(cont_t | context, cont_<t)``, in float32.

    ``forward(input_ids, attention_mask)`` returns logits for exactly the input positions. Sequences
    are right-padded (real tokens keep positions 0..n-1) in chunks of ``chunk``."""
    out: list[float] = []
    for start in range(0, len(pairs), chunk):
        part = pairs[start : start + chunk]
        seqs = [list(ctx) + list(cont) for ctx, cont in part]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        if device is not None:
            ids, mask = ids.to(device), mask.to(device)
        logprobs = torch.log_softmax(forward(ids, mask).float(), dim=-1)
        for i, (ctx, cont) in enumerate(part):
            n, k = len(ctx), len(cont)
            if k == 0:
                out.append(0.0)
                continue
            # token at position p is predicted by the logits at p - 1
            positions = torch.arange(n - 1, n + k - 1, device=logprobs.device)
            targets = ids[i, n : n + k].to(logprobs.device)
            out.append(float(logprobs[i, positions, targets].sum()))
    return out


def score_choices(
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    prompts: Sequence[Sequence[int]],
    choice_ids: Sequence[Optional[Sequence[Sequence[int]]]],
    pad_id: int,
    device: Optional[torch.device] = None,
) -> list[Optional[list[float]]]:
    """Per row, the log-likelihood of each option after the row's prompt (None for a row without options)."""
    pairs, owner = [], []
    for row, (prompt, options) in enumerate(zip(prompts, choice_ids)):
        for opt in options or []:
            pairs.append((prompt, opt))
            owner.append(row)
    lls = continuation_loglikelihoods(forward, pairs, pad_id, device) if pairs else []
    out: list[Optional[list[float]]] = [None if not options else [] for options in choice_ids]
    for row, ll in zip(owner, lls):
        out[row].append(ll)
    return out
