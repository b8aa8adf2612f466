#!/usr/bin/env python
"""What held-out codebook usage measures: the same tokenizer's usage on the held-out files, on random draws of
as many training files, and on as many files cut from two training sources at a time.

The family benchmark holds out the last 64 files by name; of the photo crops (bench/make_photo_crops.py) those
are 32 crops each of two photographs. Distinct codes among their 4,096 positions then depend on how varied two
photographs are, not only on how the tokenizer generalises: this prints the three figures side by side, so a
held-out figure can be read against what the tokenizer does on its own training images.

    python bench/usage_by_subset.py runs/family/fsq/model runs/family/vit/model --data /tmp/photos

Sources are the file names less a trailing `_NNN` (make_photo_crops.py names crops `PHOTO_NNN.png`).
"""
from __future__ import annotations

import argparse
import itertools
import random
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from vqgan.checkpoint import load_model  # noqa: E402
from vqgan.data.images import ImageDataset, scan_images  # noqa: E402
from vqgan.quantizers.base import codebook_stats  # noqa: E402


def usage_of(model, paths: list[Path], side: int) -> tuple[float, float]:
    """(distinct codes / vocabulary, perplexity) of the first level's tokens of `paths`, pooled over depths."""
    x = ImageDataset.from_paths(paths, resolution=side, train=False).batch()
    with torch.no_grad():
        tokens = model.encode(x)
    tokens = tokens if torch.is_tensor(tokens) else tokens[0]
    stats = codebook_stats(tokens, model.code_spec.levels[0].vocab[0])
    return float(stats["usage"]), float(stats["perplexity"])


def source_of(path: Path) -> str:
    stem = path.stem
    head, _, tail = stem.rpartition("_")
    return head if head and tail.isdigit() else stem


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="model folders (RUN/model)")
    ap.add_argument("--data", required=True)
    ap.add_argument("--holdout", type=int, default=64)
    ap.add_argument("--draws", type=int, default=5, help="random draws of training files")
    ap.add_argument("--pairs", type=int, default=6, help="pairs of training sources")
    args = ap.parse_args()
    torch.set_num_threads(1)
    paths = sorted(scan_images(args.data)[0])
    held, train = paths[-args.holdout:], paths[:-args.holdout]
    rng = random.Random(0)
    draws = [rng.sample(train, args.holdout) for _ in range(args.draws)]
    by_source = defaultdict(list)
    for p in train:
        by_source[source_of(p)].append(p)
    sources = sorted(s for s, files in by_source.items() if len(files) >= args.holdout // 2)
    pairs = rng.sample(list(itertools.combinations(sources, 2)), min(args.pairs, len(sources) * (len(sources) - 1) // 2))
    half = args.holdout // 2
    print(f"held-out: last {args.holdout} files of {args.data} (sources: {', '.join(sorted({source_of(p) for p in held}))});"
          f" {args.draws} random draws of {args.holdout} training files; {len(pairs)} pairs of training sources,"
          f" {half} files each\n")
    print("| model | held-out usage (perplexity) | random training files | two training sources (min - max) |")
    print("|---|---|---|---|")
    for folder in args.models:
        model = load_model(folder).eval()
        side = model.config.resolution
        h_use, h_ppl = usage_of(model, held, side)
        d = [usage_of(model, ps, side)[0] for ps in draws]
        s = [usage_of(model, by_source[a][:half] + by_source[b][:half], side)[0] for a, b in pairs]
        print(f"| {folder} | {h_use:.1%} ({h_ppl:.0f}) | {statistics.mean(d):.1%} +- {statistics.pstdev(d):.1%} | "
              f"{statistics.mean(s):.1%} ({min(s):.0%} - {max(s):.0%}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
