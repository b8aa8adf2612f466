#!/usr/bin/env python
"""Crops of scikit-image's bundled photographs: a small real photo set that needs no download.

Random square crops (64 to 256 px of the source, so several scales) resized to `--size`. The held-out photos
are never cropped for training: their crops are named `zz_heldout_*`, so that "the last 64 files by name"
(the benchmarks' held-out rule) are 32 crops each of two photos the tokenizer never saw.

    python bench/make_photo_crops.py OUT_DIR [--size 64] [--per-photo 96] [--seed 0]
"""
import argparse
from pathlib import Path

import numpy as np
from PIL import Image

TRAIN = ["astronaut", "brick", "camera", "chelsea", "coins", "colorwheel", "grass", "gravel", "hubble_deep_field",
         "immunohistochemistry", "moon", "retina", "stereo_motorcycle"]
HELD_OUT = ["coffee", "rocket"]  # unseen in training: 32 crops each


def photo(name: str) -> Image.Image:
    import skimage.data

    array = getattr(skimage.data, name)()
    array = array[0] if isinstance(array, tuple) else array  # stereo_motorcycle: (left, right, disparity)
    return Image.fromarray(array).convert("RGB")


def crops(image: Image.Image, n: int, size: int, rng: np.random.Generator) -> list[Image.Image]:
    out = []
    for _ in range(n):
        side = int(rng.integers(64, min(256, *image.size) + 1))
        x, y = (int(rng.integers(0, d - side + 1)) for d in image.size)
        out.append(image.crop((x, y, x + side, y + side)).resize((size, size), Image.LANCZOS))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--per-photo", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    count = 0
    for names, n, prefix in ((TRAIN, args.per_photo, ""), (HELD_OUT, 32, "zz_heldout_")):
        for name in names:
            for i, im in enumerate(crops(photo(name), n, args.size, rng)):
                im.save(out / f"{prefix}{name}_{i:03d}.png")
                count += 1
    print(f"{count} crops in {out} ({len(TRAIN)} training photos, held out: {', '.join(HELD_OUT)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
