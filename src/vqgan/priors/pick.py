"""Choosing a token from logits: temperature, top-k, top-p (nucleus), greedy.

One `torch.multinomial` per call on the given generator, so a sampler that calls it once per position draws
the same random numbers in the same order whether or not it uses a KV cache.
"""
from __future__ import annotations

import torch


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
