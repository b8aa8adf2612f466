#!/usr/bin/env python
"""Where in the image a tokenizer fails: the mean reconstruction error (L1, [-1, 1] scale) of each token cell over
a set of images, and the worst cell's error over the median cell's. PSNR averages a one-cell artefact away;
this ratio does not. A tokenizer whose decoder paints the same blob at the same place in every image (the demo's,
with FSQ's entropy penalty: the README, "The demo") shows one cell far above the rest.

    python bench/positional_artifacts.py TOKENIZER... --data builtin:scenes [--last 256] [--png OUT.png]
    python bench/positional_artifacts.py runs/a/model runs/b/model --data /tmp/photos --last 64   # held-out crops

Prints one row per tokenizer: worst cell (row, column), its error, the median cell's, and their ratio; and how
many distinct codes it gives the positions of a flat single-colour image (16 colours, mean). The content is the
same at every position there, so a tokenizer that codes content needs few; many mean the codes also say where
they are (a conv encoder sees the zero padding): what an entropy penalty's batch term can buy its usage with.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def cell_errors(model, images: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> (h, w) mean L1 error of each token cell."""
    f = model.downsample_factor
    total = None
    with torch.no_grad():
        for start in range(0, len(images), batch):
            x = images[start:start + batch]
            err = (model.decode(model.encode(x)) - x).abs().mean(1)  # (B, H, W)
            b, hh, ww = err.shape
            cells = err.reshape(b, hh // f, f, ww // f, f).mean((2, 4)).sum(0)
            total = cells if total is None else total + cells
    return total / len(images)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tokenizers", nargs="+")
    ap.add_argument("--data", required=True, help="a folder of images or builtin:scenes")
    ap.add_argument("--last", type=int, default=256, help="the last N images by name (a run's held-out set)")
    ap.add_argument("--png", default=None, help="write the error maps side by side here")
    args = ap.parse_args()

    from vqgan.checkpoint import load_model
    from vqgan.data.images import ImageDataset
    from vqgan.data.sources import image_sources
    from vqgan.eval.usage import flat_image_codes

    print("| tokenizer | worst cell (row, col) | its error | median cell | worst / median | codes per flat image |")
    print("|---|---|---|---|---|---|")
    maps = []
    for path in args.tokenizers:
        model = load_model(path).eval()
        res = model.config.resolution
        sources, _ = image_sources(args.data, builtin_count=max(args.last, 256), builtin_size=res)
        data = ImageDataset(sources[-args.last:], res, crop="center", flip=False, train=False)
        errors = cell_errors(model, data.batch())
        worst = divmod(int(errors.argmax()), errors.shape[1])
        median = float(errors.median())
        flat, positions = flat_image_codes(model)
        print(f"| {path} | {worst} | {float(errors.max()):.3f} | {median:.3f} | {float(errors.max()) / median:.1f} "
              f"| {flat:.1f} of {positions} |")
        maps.append(errors / errors.max())
    if args.png:
        import numpy as np
        from PIL import Image

        tiles = [np.kron(m.numpy(), np.ones((16, 16))) for m in maps]
        gap = np.ones((tiles[0].shape[0], 4))
        row = np.concatenate([t if i == 0 else np.concatenate([gap, t], 1) for i, t in enumerate(tiles)], 1)
        Image.fromarray((row * 255).astype(np.uint8)).save(args.png)
        print(f"error maps (each scaled to its worst cell): {args.png}")


if __name__ == "__main__":
    main()
