"""Sampling token sequences from a GPT prior: temperature, top-k, top-p, greedy; with or without a KV cache.

Both paths draw the same random numbers in the same order (one `torch.multinomial` per step on a given
generator), so under one seed the cached sampler yields exactly the tokens of the uncached one.
"""
from __future__ import annotations

import torch

from .transformer import GPT


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set logits outside the top k, or outside the smallest set of probability mass >= top_p, to -inf.

    (..., V) -> (..., V). The most likely token always survives.
    """
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) >= top_p  # mass before this token already reaches top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def pick(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
         greedy: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids. `greedy` takes the most likely token; otherwise `temperature` must be
    > 0 (clamping it would turn a negative one into greedy sampling without a word)."""
    if greedy:
        return logits.argmax(-1)
    if not temperature > 0:
        raise ValueError(f"temperature {temperature}: must be > 0 (greedy=True takes the most likely token)")
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1] and not top_p:
        # draw among the k best directly: the same distribution as masking the rest, on k entries, not V
        values, ids = torch.topk(logits, top_k, dim=-1)
        choice = torch.multinomial(values.softmax(-1), 1, generator=generator)
        return ids.gather(-1, choice).squeeze(-1)
    probs = filter_logits(logits, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def sample(gpt: GPT, prefix: torch.Tensor, steps: int, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, greedy: bool = False, generator: torch.Generator | None = None,
           use_cache: bool = True) -> torch.Tensor:
    """Continue `prefix` (B, P >= 1: condition tokens, then any given image tokens) by `steps` tokens.

    Returns the new tokens (B, steps).
    """
    if prefix.shape[1] < 1:
        raise ValueError("the prefix needs at least one token (a start or condition token)")
    if prefix.shape[1] + steps - 1 > gpt.config.block_size:
        raise ValueError(f"prefix {prefix.shape[1]} + {steps} steps exceeds block_size {gpt.config.block_size} + 1")
    seq = prefix
    out = []
    cache = gpt.new_cache() if use_cache else None
    step_input = prefix
    for _ in range(steps):
        logits = gpt(step_input, cache)[:, -1] if use_cache else gpt(seq)[:, -1]
        token = pick(logits, temperature, top_k, top_p, greedy, generator)
        out.append(token)
        step_input = token[:, None]
        if not use_cache:
            seq = torch.cat([seq, step_input], dim=1)
    return torch.stack(out, dim=1)
