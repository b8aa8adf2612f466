#!/usr/bin/env python
"""How many of K codes the held-out images' content alone fills: k-means with K centres on the training images'
f x f pixel patches (the token cells of a factor-f tokenizer), then the held-out patches' nearest centres. A
reference for the family table's held-out usage: a code per patch of pixels, fitted on the training files, no
position and no context. A tokenizer far above it spends codes on something else (context, or position: the
README, "Codes that say where, not what"); one near it codes what the patches hold.

    python bench/content_codes.py /tmp/photos /tmp/emoji [--codes 1024] [--size 64] [--factor 8] [--holdout 64]

Same split as bench/quality_family.py: the files sorted by name, the last `--holdout` held out; each image resized
to `--size` square (the crops already are).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def patches(files: list[Path], size: int, factor: int) -> torch.Tensor:
    """Each image's (size / factor)^2 non-overlapping patches as rows of factor * factor * 3 values in [-1, 1]."""
    n = size // factor
    rows = []
    for f in files:
        a = np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32)
        a = a / 127.5 - 1
        rows.append(a.reshape(n, factor, n, factor, 3).transpose(0, 2, 1, 3, 4).reshape(n * n, -1))
    return torch.from_numpy(np.concatenate(rows))


def kmeans(x: torch.Tensor, k: int, iterations: int, generator: torch.Generator) -> torch.Tensor:
    """Lloyd's k-means from k random rows; an empty centre restarts on a random row."""
    centres = x[torch.randperm(len(x), generator=generator)[:k]].clone()
    for _ in range(iterations):
        owner = torch.cdist(x, centres).argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, owner, x)
        counts = torch.bincount(owner, minlength=k)
        alive = counts > 0
        centres[alive] = sums[alive] / counts[alive, None]
        dead = (~alive).nonzero().flatten()
        centres[dead] = x[torch.randint(len(x), (len(dead),), generator=generator)]
    return centres


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--codes", type=int, default=1024)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--factor", type=int, default=8)
    ap.add_argument("--holdout", type=int, default=64)
    ap.add_argument("--iterations", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("| data | training patches | held-out patches | held-out usage | held-out perplexity |")
    print("|---|---|---|---|---|")
    for folder in args.folders:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        train = patches(files[:-args.holdout], args.size, args.factor)
        held = patches(files[-args.holdout:], args.size, args.factor)
        centres = kmeans(train, args.codes, args.iterations, torch.Generator().manual_seed(args.seed))
        counts = torch.bincount(torch.cdist(held, centres).argmin(1), minlength=args.codes).double()
        p = counts[counts > 0] / counts.sum()
        print(f"| {folder.name} | {len(train)} | {len(held)} | {(counts > 0).double().mean():.1%} | "
              f"{torch.exp(-(p * p.log()).sum()):.0f} |")


if __name__ == "__main__":
    main()
