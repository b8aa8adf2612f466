"""The one sampling loop of a GPT prior: KV cache, classifier-free guidance, completion, temperature / top-k /
top-p, and a window policy (windows.py) that chooses what the prior sees before each position.

Cached and uncached sampling draw the same random numbers in the same order (one `pick` per sampled
position on the given generator) and see the same tokens, so under one seed they yield the same tokens.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm import tqdm

from .gpt import GPT
from .guidance import Guidance
from .layout import TokenLayout
from .pick import pick
from .windows import LevelWindows, SlidingWindow, WholeSequence, Window, Windows


@torch.inference_mode()
def sample_tokens(gpt: GPT, tokens: torch.Tensor, windows: Windows, condition: Callable[[Window], torch.Tensor],
                  choose: Callable[[torch.Tensor, int], torch.Tensor], keep: torch.Tensor | None = None,
                  guidance: Guidance | None = None, use_cache: bool = True, progress: bool = False,
                  desc: str = "sampling") -> torch.Tensor:
    """Fill `tokens` (B, N) in place, position by position in raster order, and return it.

    `windows(pos)` says which earlier positions the prior sees; `condition(window)` gives the condition
    tokens (B, P) that precede them; `choose(logits, pos)` maps the (guided) logits (B, vocab) to the tokens
    (B,) of that position. Completion:
    where `keep` (B, N) is True the token already in `tokens` stays (positions kept in every row are not
    sampled at all: they only feed the context). Without a cache the whole context is recomputed each step.
    """
    skip = keep.all(0).tolist() if keep is not None else None
    cache, key, fed = None, None, -1  # the cached sequence: its window's key, and how many of its tokens it holds
    bar = tqdm(total=tokens.shape[1], desc=desc, disable=not progress)
    for pos in range(tokens.shape[1]):
        bar.update(1)
        if skip is not None and skip[pos]:
            continue
        win = windows(pos)
        local = tokens[:, win.positions]  # (B, L) the window's tokens in reading order
        if cache is not None and win.key == key and win.place > fed:
            new = local[:, fed:win.place]  # placed since the last step in this window: (B, 1) or more
            logits = gpt(new if guidance is None else guidance.pair(new), cache)[:, -1]
        else:  # a new window (or no cache): the condition and every token before the place, at once
            context, seen = condition(win), local[:, :win.place]
            if guidance is not None:
                context, seen = guidance.context(context), guidance.pair(seen)
            cache = gpt.new_cache() if use_cache else None
            logits = gpt(torch.cat([context, seen], 1), cache)[:, -1]  # (B or 2B, vocab)
        key, fed = win.key, win.place
        token = choose(logits if guidance is None else guidance.mix(logits), pos)
        if keep is not None:
            token = torch.where(keep[:, pos], tokens[:, pos], token)
        tokens[:, pos] = token
    bar.close()
    return tokens


def chooser(n_codes: int | None = None, temperature: float = 1.0, top_k: int | None = None,
            top_p: float | None = None, greedy: bool = False, generator: torch.Generator | None = None,
            slots: tuple[torch.Tensor, torch.Tensor] | None = None) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """(logits (B, vocab), position) -> tokens (B,) among the first `n_codes` ids (the image codes; None: any
    token), or, with `slots` = (offset, vocab) per position, among that position's stream of ids."""
    if slots is None:
        if n_codes is None:
            return lambda logits, pos: pick(logits, temperature, top_k, top_p, greedy, generator)
        return lambda logits, pos: pick(logits[:, :n_codes], temperature, top_k, top_p, greedy, generator)
    starts, ends = slots[0].tolist(), (slots[0] + slots[1]).tolist()
    return lambda logits, pos: starts[pos] + pick(logits[:, starts[pos]:ends[pos]], temperature, top_k, top_p,
                                                  greedy, generator)


def sample(gpt: GPT, prefix: torch.Tensor, steps: int, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, greedy: bool = False, generator: torch.Generator | None = None,
           use_cache: bool = True) -> torch.Tensor:
    """Continue `prefix` (B, P >= 1: condition tokens, then any given image tokens) by `steps` tokens, each
    chosen among the whole vocabulary. Returns the new tokens (B, steps)."""
    if prefix.shape[1] < 1:
        raise ValueError("the prefix needs at least one token (a start or condition token)")
    if prefix.shape[1] + steps - 1 > gpt.config.block_size:
        raise ValueError(f"prefix {prefix.shape[1]} + {steps} steps exceeds block_size {gpt.config.block_size} + 1")
    tokens = prefix.new_zeros(prefix.shape[0], steps)
    return sample_tokens(gpt, tokens, WholeSequence(steps), lambda window: prefix,
                         chooser(None, temperature, top_k, top_p, greedy, generator), use_cache=use_cache)


def sample_grid(gpt: GPT, layout: TokenLayout, grid: tuple[int, int], batch: int,
                window: tuple[int, int] | None = None, labels: torch.Tensor | None = None,
                cond: torch.Tensor | None = None, known: torch.Tensor | None = None, keep: torch.Tensor | None = None,
                guidance_scale: float = 1.0, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, greedy: bool = False, generator: torch.Generator | None = None,
                use_cache: bool = True, progress: bool = False) -> torch.Tensor:
    """Image codes (B, H, W, depth) on `grid` after their condition tokens (one level of codes).

    `window`: the grid the prior was trained on; a larger `grid` is sampled through a sliding window of that
    size (None or the grid itself: every position sees all earlier ones). `labels` (B,) class ids (< 0: "no
    class"); `cond` (B, H, W, depth) the condition codes of a spatial prior on the same grid. Completion:
    `known` (B, H, W, depth) codes and `keep` ((H, W) or (B, H, W) bool, per position; default all) say which
    positions are given; the rest are sampled, each seeing every earlier position of its window, given or
    sampled. With a guidance scale != 1 and labels, each step mixes the class and "no class" logits."""
    H, W = grid
    if layout.codes is not None and len(layout.codes.levels) > 1:
        raise ValueError("sample_grid samples one level of codes; a prior over several levels samples whole rows "
                         "(sample_images_tokens with the grids of its levels)")
    depth = layout.codes.levels[0].depth if layout.codes is not None else 1
    device = next(gpt.parameters()).device
    sliding = window is not None and tuple(window) != (H, W)
    if sliding:
        h, w = window
        if layout.spatial and (cond is None or tuple(cond.shape[1:3]) != (H, W)):
            raise ValueError(f"a spatial prior needs condition tokens on the {H}x{W} grid, got "
                             f"{None if cond is None else tuple(cond.shape)}")
        if layout.prefix_len + h * w * depth - 1 > gpt.config.block_size:
            raise ValueError(f"window {h}x{w} with {layout.prefix_len} condition tokens exceeds block_size "
                             f"{gpt.config.block_size} + 1")
    n = H * W * depth
    if keep is not None:  # per position -> per code
        keep = keep.reshape(-1, H * W).repeat_interleave(depth, dim=1)
    tokens = sample_images_tokens(gpt, layout, n, batch, labels, cond,
                                  None if known is None else known.reshape(batch, n), keep, guidance_scale,
                                  temperature, top_k, top_p, greedy, generator, use_cache,
                                  windows=SlidingWindow(grid, window, device, depth) if sliding else None,
                                  progress=progress)
    return tokens.reshape(batch, H, W, depth)


def sample_images_tokens(gpt: GPT, layout: TokenLayout, n_tokens: int, batch: int,
                         labels: torch.Tensor | None = None, cond: torch.Tensor | None = None,
                         known: torch.Tensor | None = None, keep: torch.Tensor | None = None,
                         guidance_scale: float = 1.0, temperature: float = 1.0, top_k: int | None = None,
                         top_p: float | None = None, greedy: bool = False, generator: torch.Generator | None = None,
                         use_cache: bool = True, windows: Windows | None = None,
                         progress: bool = False, grids: list[tuple[int, int]] | None = None) -> torch.Tensor:
    """Sample a row of `n_tokens` image codes (B, n_tokens) in the code spec's row order after the condition
    tokens (see `sample_grid`; here `known` is (B, n_tokens) codes and `keep` (n_tokens,) or (B, n_tokens)).
    `windows`: the window policy (default: every earlier position; its windows crop `cond` to their region).
    `grids`: the grid of each level, for a prior over several levels of codes."""
    device = next(gpt.parameters()).device
    slots = layout.code_slots(n_tokens, grids, device)
    if windows is None:
        windows = WholeSequence(n_tokens)
        if layout.prefix_len + n_tokens - 1 > gpt.config.block_size:
            raise ValueError(f"{layout.prefix_len} condition + {n_tokens} image tokens exceed block_size "
                             f"{gpt.config.block_size} + 1")
    tokens = torch.zeros(batch, n_tokens, dtype=torch.long, device=device)
    keep_mask = None
    if known is not None:
        tokens.copy_(layout.codes_to_tokens(known.to(device).long().reshape(batch, n_tokens), grids))
        keep_mask = torch.ones(n_tokens, dtype=torch.bool) if keep is None else keep.bool()
        keep_mask = keep_mask.reshape(-1, n_tokens).expand(batch, n_tokens).to(device)

    def condition(window: Window) -> torch.Tensor:
        crop = cond if cond is None or window.region is None else cond[(slice(None), *window.region)]
        return layout.condition_tokens(labels, batch, device, crop)

    tokens = sample_tokens(gpt, tokens, windows, condition,
                           chooser(layout.n_embed, temperature, top_k, top_p, greedy, generator, slots), keep_mask,
                           Guidance.of(layout, labels, guidance_scale), use_cache, progress,
                           "sliding window" if isinstance(windows, (SlidingWindow, LevelWindows)) else "sampling")
    return tokens if slots is None else tokens - slots[0]


def sample_levels(gpt: GPT, layout: TokenLayout, grids: list[tuple[int, int]], batch: int,
                  windows: list[tuple[int, int]] | None = None, labels: torch.Tensor | None = None,
                  cond: torch.Tensor | None = None, known: list[torch.Tensor] | None = None,
                  keep: list[torch.Tensor] | None = None, progress: bool = False, **sampling) -> list[torch.Tensor]:
    """The codes of a prior over several levels (VQ-VAE-2): one (B, h, w, depth) tensor per level on `grids`,
    sampled as one row [level 0 | level 1 | ...] (a later level sees every earlier one: p(top) p(bottom | top)).

    `windows`: the grids the prior was trained on; larger `grids` are sampled through a window across the levels
    (LevelWindows). Completion: `known` codes (one tensor per level) and `keep` (one (h, w) or (B, h, w) bool
    mask per level; default all) say which positions are given. `sampling`: guidance and token choice
    (`sample_images_tokens`)."""
    spec = layout.codes
    if spec is None or len(spec.levels) != len(grids):
        raise ValueError(f"a prior over {1 if spec is None else len(spec.levels)} level(s) of codes, given "
                         f"{len(grids)} grids")
    grids = [tuple(g) for g in grids]
    depths = [level.depth for level in spec.levels]
    n = spec.length_on(grids)
    policy = None
    if windows is not None and [tuple(w) for w in windows] != grids:
        if layout.spatial:
            raise ValueError("a map-conditioned prior over several levels samples at its training size only")
        if layout.prefix_len + spec.length_on(windows) - 1 > gpt.config.block_size:
            raise ValueError(f"windows {windows} with {layout.prefix_len} condition tokens exceed block_size "
                             f"{gpt.config.block_size} + 1")
        policy = LevelWindows(grids, windows, depths, next(gpt.parameters()).device)
    row_known = None if known is None else spec.flatten(list(known))
    row_keep = None
    if keep is not None:
        row_keep = torch.cat([k.reshape(-1, h * w).expand(batch, h * w).repeat_interleave(d, dim=1)
                              for k, (h, w), d in zip(keep, grids, depths)], 1)
    tokens = sample_images_tokens(gpt, layout, n, batch, labels, cond, row_known, row_keep, windows=policy,
                                  progress=progress, grids=grids, **sampling)
    return spec.unflatten(tokens, grids)
