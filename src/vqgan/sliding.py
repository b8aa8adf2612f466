"""Sliding-window sampling: token grids larger than the prior was trained on (Esser et al. 2021, sec. 3.2).

The prior saw `window` = (h, w) grids. For each position (i, j) of a larger (H, W) grid, in raster order,
take the h x w window centred on it as far as the borders allow, lay its tokens out in the window's own
raster order after the condition tokens (for a spatial prior: the condition map's tokens over the same
window), and predict the token at the position's place in that window. Everything before that place in
the window is already sampled, so each position sees its neighbourhood above and to the left.

Consecutive positions that share a window origin (near the borders, or when the grid is only as wide as
the window) extend the same sequence, so the KV cache carries over; elsewhere the window is recomputed.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from .prior import TokenLayout, guided_context, next_token
from .transformer import GPT


def window_origin(i: int, j: int, grid: tuple[int, int], window: tuple[int, int]) -> tuple[int, int]:
    """Top-left corner of the window around (i, j), clamped inside the grid."""
    (H, W), (h, w) = grid, window
    return min(max(i - h // 2, 0), H - h), min(max(j - w // 2, 0), W - w)


@torch.inference_mode()
def sample_sliding_window(gpt: GPT, layout: TokenLayout, grid: tuple[int, int], window: tuple[int, int],
                          batch: int, labels: torch.Tensor | None = None, cond: torch.Tensor | None = None,
                          known: torch.Tensor | None = None, keep: torch.Tensor | None = None,
                          guidance_scale: float = 1.0, temperature: float = 1.0, top_k: int | None = None,
                          top_p: float | None = None, greedy: bool = False,
                          generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
    """(B, H, W) tokens. `cond`: (B, H, W) condition tokens of a spatial prior, on the same grid as the
    image tokens. `known`/`keep` ((B, H, W) tokens, (H, W) or (B, H, W) bool): positions to keep."""
    (H, W), (h, w) = grid, window
    if H < h or W < w:
        raise ValueError(f"grid {H}x{W} is smaller than the window {h}x{w}; sample it directly")
    if layout.spatial and (cond is None or tuple(cond.shape[1:]) != (H, W)):
        raise ValueError(f"a spatial prior needs condition tokens on the {H}x{W} grid, got "
                         f"{None if cond is None else tuple(cond.shape)}")
    if layout.prefix_len + h * w - 1 > gpt.config.block_size:
        raise ValueError(f"window {h}x{w} with {layout.prefix_len} condition tokens exceeds block_size "
                         f"{gpt.config.block_size} + 1")
    device = next(gpt.parameters()).device
    tokens = torch.zeros(batch, H, W, dtype=torch.long, device=device)
    keep_mask = None
    if known is not None:
        tokens.copy_(known.to(device).long().reshape(batch, H, W))
        keep_mask = (torch.ones(H, W, dtype=torch.bool) if keep is None else keep.bool()).reshape(-1, H, W)
        keep_mask = keep_mask.expand(batch, H, W).to(device)
    picks = dict(temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy, generator=generator)
    cache, cached_origin, cached_len, guided = None, None, -1, False  # `guided` is set with the first window
    bar = tqdm(total=H * W, desc="sliding window", disable=not progress)
    for i in range(H):
        for j in range(W):
            bar.update(1)
            if keep_mask is not None and bool(keep_mask[:, i, j].all()):
                continue  # given everywhere in the batch: nothing to sample here
            i0, j0 = window_origin(i, j, grid, window)
            k = (i - i0) * w + (j - j0)  # the position's place in the window's raster order
            local = tokens[:, i0:i0 + h, j0:j0 + w].reshape(batch, -1)
            if cache is not None and cached_origin == (i0, j0) and k > cached_len:
                step = local[:, cached_len:k]  # the tokens sampled since, in this same window
                step = torch.cat([step, step]) if guided else step
                logits = gpt(step, cache)[:, -1]
            else:
                prefix = layout.condition_tokens(labels, batch, device,
                                                 cond[:, i0:i0 + h, j0:j0 + w] if layout.spatial else None)
                context, guided = guided_context(layout, prefix, labels, guidance_scale)
                local_in = torch.cat([local[:, :k], local[:, :k]]) if guided else local[:, :k]
                cache = gpt.new_cache()
                logits = gpt(torch.cat([context, local_in], 1), cache)[:, -1]
            cached_origin, cached_len = (i0, j0), k
            token = next_token(logits, layout, guided, guidance_scale, **picks)
            if keep_mask is not None:
                token = torch.where(keep_mask[:, i, j], tokens[:, i, j], token)
            tokens[:, i, j] = token
    bar.close()
    return tokens
