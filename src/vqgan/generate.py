"""Generating images with a prior: samples (any size, any conditioning) and completions, written as PNGs.

The command layer behind `vqgan sample` and `vqgan complete` (its errors name their flags); the demo uses the
same functions.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .errors import UserError
from .eval.report import headed_grid, image_grid, to_uint8
from .priors.bundle import ArgNames, Prior
from .priors.load import load_prior

CLI_NAMES = ArgNames(tokenizer="--tokenizer", force="--force", label="--label")


def open_prior(path: str, tokenizer: str | None = None, device: str | torch.device = "cpu",
               force: bool = False) -> Prior:
    """`load_prior` with errors that name the command's flags."""
    return load_prior(path, tokenizer, device, force, CLI_NAMES)


def parse_size(text: str | None, factor: int) -> tuple[int, int] | None:
    """'HxW' (or one number for a square) in pixels -> a token grid; each side a multiple of `factor`."""
    if not text:
        return None
    try:
        parts = [int(v) for v in text.lower().split("x")]
        h, w = (parts * 2)[:2] if len(parts) == 1 else parts
    except ValueError:
        raise UserError(f"--size {text!r}: expected HEIGHTxWIDTH in pixels, e.g. 128x256") from None
    if h <= 0 or w <= 0 or h % factor or w % factor:
        raise UserError(f"--size {text}: both sides must be positive multiples of the tokenizer's factor {factor}")
    return h // factor, w // factor


def load_cond_map(prior: Prior, path: str, size: tuple[int, int] | None = None) -> torch.Tensor:
    """A segmentation / depth map file -> the condition tokenizer's input (1, C, H, W), resized to `size`
    (pixels) when given, else kept at its own size cropped to multiples of the factor."""
    from .data.maps import map_to_tensor, resample_for
    from .data.sources import LOADERS

    ct = prior.cond_tokenizer
    if ct is None:
        raise UserError("this prior is not conditioned on maps; leave out --cond-map")
    kind = ct.config.input_kind
    try:
        im = LOADERS[kind](path)
    except FileNotFoundError:
        raise UserError(f"--cond-map {path}: no such file") from None
    except (OSError, ValueError) as e:
        raise UserError(f"--cond-map {path}: {e}") from None
    f = ct.downsample_factor
    if size is not None:
        im = im.resize((size[1], size[0]), resample_for(kind))
    else:
        im = im.crop((0, 0, im.width // f * f, im.height // f * f))
    if im.width < f or im.height < f:
        raise UserError(f"--cond-map {path}: smaller than one token ({f} px)")
    try:
        return map_to_tensor(im, kind, ct.config.in_channels)[None]
    except ValueError as e:
        raise UserError(f"--cond-map {path}: {e}") from None


def check_condition(prior: Prior, label: str | None, guidance_scale: float) -> None:
    """A label where the prior needs one, and guidance only where it means something: classifier-free
    guidance mixes the asked class's predictions with the "no class" token's, so it needs both."""
    layout = prior.layout
    if layout.n_classes and layout.taming and label is None:
        raise UserError("this class-conditional prior needs --label")
    if guidance_scale == 1.0:
        return
    if not layout.n_classes:
        raise UserError(f"--guidance {guidance_scale}: classifier-free guidance needs a class-conditional prior; "
                        "this one is not (leave out --guidance)")
    if layout.taming:
        raise UserError(f"--guidance {guidance_scale}: this converted taming transformer has no 'no class' token, "
                        "so it cannot be guided (leave out --guidance)")
    if label is None:
        raise UserError(f"--guidance {guidance_scale} needs --label: without a class the samples come from the "
                        "'no class' token and guidance changes nothing")


def sample_images(prior: Prior, n: int, label: str | None = None, size: str | None = None,
                  cond_map: str | None = None, seed: int = 0, progress: bool = True, batch_size: int = 16,
                  **sampling) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images (n, 3, H, W), the condition map shown as RGB or None), sampled `batch_size` at a time."""
    from .data.maps import to_display

    device = next(prior.gpt.parameters()).device
    f = prior.tokenizer.downsample_factor
    check_condition(prior, label, sampling.get("guidance_scale", 1.0))
    labels = torch.full((n,), prior.label_id(label, CLI_NAMES), device=device) if label is not None else None
    cond, shown = None, None
    if prior.layout.spatial:
        if not cond_map:
            raise UserError(f"this prior is conditioned on {prior.cond_tokenizer.config.input_kind} maps: pass "
                            "--cond-map FILE")
        grid_px = tuple(side * f for side in parse_size(size, f)) if size else None
        maps = load_cond_map(prior, cond_map, grid_px)
        cond = prior.encode_maps(maps).expand(n, -1, -1, -1)
        shown = to_display(maps, prior.cond_tokenizer.config.input_kind)
        grid = tuple(cond.shape[1:3])
    else:
        if cond_map:
            raise UserError("this prior is not conditioned on maps; leave out --cond-map")
        grid = parse_size(size, f) or prior.grid
    if grid[0] < prior.grid[0] or grid[1] < prior.grid[1]:
        raise UserError(f"--size: the output must be at least the training size {prior.grid[0] * f}x{prior.grid[1] * f}")
    g = torch.Generator(device=device).manual_seed(seed)
    images = []
    for start in range(0, n, max(1, batch_size)):
        b = min(batch_size, n - start)
        tokens = prior.sample(b, grid, None if labels is None else labels[:b], None if cond is None else cond[:b],
                              generator=g, progress=progress, **sampling)
        images.append(prior.tokenizer.decode(tokens))
    return torch.cat(images), shown


def complete_images(prior: Prior, images: torch.Tensor, n: int = 4, keep_rows: float = 0.5,
                    box: tuple[float, float, float, float] | None = None, label: str | None = None, seed: int = 0,
                    maps: torch.Tensor | None = None, on_image: Callable[[], Any] | None = None,
                    **sampling) -> tuple[torch.Tensor, torch.Tensor]:
    """Completions of each image: keep the top `keep_rows` fraction of its token rows (or everything outside
    `box` = top, left, bottom, right as fractions) and sample the rest; a map-conditioned prior needs each
    image's condition map in `maps` (the condition tokenizer's input, B, C, H, W); `on_image` is called as
    each image is done (a progress bar). Returns (masked views (B, 3, H, W), completions (B, n, 3, H, W))."""
    device = next(prior.gpt.parameters()).device
    check_condition(prior, label, sampling.get("guidance_scale", 1.0))
    if prior.layout.spatial and maps is None:
        raise UserError("this prior is conditioned on maps: completion needs each image's condition map")
    cond = prior.encode_maps(maps) if maps is not None and prior.layout.spatial else None
    tokens = prior.tokenizer.encode(images.to(device))
    spec = prior.tokenizer.code_spec
    levels = spec.to_levels(tokens)  # one (B, h, w, depth) per level (VQ-VAE-2: top, bottom)
    keeps = [kept_positions(c.shape[1], c.shape[2], keep_rows, box) for c in levels]
    labels = torch.full((n,), prior.label_id(label, CLI_NAMES), device=device) if label is not None else None
    g = torch.Generator(device=device).manual_seed(seed)
    outs = []
    for i in range(levels[0].shape[0]):
        known = [c[i:i + 1].expand(n, *c.shape[1:]) for c in levels]
        cond_i = None if cond is None else cond[i:i + 1].expand(n, *cond.shape[1:])
        one = len(levels) == 1
        outs.append(prior.tokenizer.decode(prior.sample(n, tuple(levels[0].shape[1:3]), labels, cond_i,
                                                        known=known[0] if one else known,
                                                        keep=keeps[0] if one else keeps, generator=g, **sampling)))
        if on_image is not None:
            on_image()
    finest = min(range(len(levels)), key=lambda k: spec.levels[k].factor)  # shown at the finest level's mask
    f = spec.levels[finest].factor
    pixel_keep = keeps[finest].repeat_interleave(f, 0).repeat_interleave(f, 1).to(device)
    masked = torch.where(pixel_keep, prior.tokenizer.decode(tokens), torch.full_like(images.to(device), 0.6))
    return masked, torch.stack(outs)


def kept_positions(h: int, w: int, keep_rows: float = 0.5, box: tuple[float, float, float, float] | None = None
                   ) -> torch.Tensor:
    """(h, w) bool: the positions a completion keeps: the top `keep_rows` fraction of the rows, or everything
    outside `box` (top, left, bottom, right as fractions)."""
    keep = torch.ones(h, w, dtype=torch.bool)
    if box is not None:
        top, left, bottom, right = box
        rows = slice(round(top * h), max(round(bottom * h), round(top * h) + 1))
        keep[rows, round(left * w):max(round(right * w), round(left * w) + 1)] = False
    else:
        keep[max(0, min(h - 1, round(keep_rows * h))):] = False
    return keep


def write_images(images: torch.Tensor, out: Path, stem: str = "sample") -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for i, img in enumerate(to_uint8(images)):
        Image.fromarray(img).save(out / f"{stem}_{i:03d}.png")
        names.append(f"{stem}_{i:03d}.png")
    return names


def write_grid(rows: list[torch.Tensor], path: Path, scale: int = 1, headers: list[str] | None = None) -> Path:
    """Rows of images as one PNG; `headers`: a heading over each column."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [r.detach().cpu() for r in rows]
    (headed_grid(headers, rows, scale=scale) if headers else image_grid(rows, scale=scale)).save(path)
    return path
