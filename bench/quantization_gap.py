#!/usr/bin/env python
"""Is a tokenizer's error the codebook's or the autoencoder's? On held-out and on training images: PSNR through
the tokens against PSNR of the encoder's output decoded without quantizing, the mean distance from each latent
to its nearest code, and per source photo (files named SOURCE_NNN.png, as bench/make_photo_crops.py writes
them) the mean error of each colour channel (a colour cast) and the brightest value the reconstructions reach.

Used to explain why `small-cpu-ema`'s held-out PSNR spread over seeds (README, "Where EMA's spread over seeds
comes from"): one seed's tokens lost nothing to quantization, its decoder had not yet learnt the held-out photos'
saturated colours.

    python bench/quantization_gap.py runs/family/ema/model /tmp/photos [--holdout 64] [--train 64]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from vqgan.data.images import ImageDataset  # noqa: E402
from vqgan.data.tokens import load_tokenizer  # noqa: E402
from vqgan.eval.metrics import psnr_per_image  # noqa: E402


def as_uint8_grid(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images rounded to the 256 levels a saved PNG keeps, back in [-1, 1] (the eval protocol)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


@torch.no_grad()
def measure(model, paths: list[Path]) -> dict:
    images = ImageDataset.from_paths(paths, resolution=model.config.resolution, train=False).batch()
    latents = model.encode_to_prequant(images)
    codes = model.quantize(latents).quantized
    through_tokens = as_uint8_grid(model.decode_latents(codes))
    unquantized = as_uint8_grid(model.decode_latents(latents))
    flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    return {"images": images, "rec": through_tokens,
            "psnr tokens": psnr_per_image(images, through_tokens).mean().item(),
            "psnr unquantized": psnr_per_image(images, unquantized).mean().item(),
            "latent to its code": (flat - codes.permute(0, 2, 3, 1).reshape_as(flat)).norm(dim=1).mean().item()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tokenizer")
    ap.add_argument("data")
    ap.add_argument("--holdout", type=int, default=64, help="the last N files by name (the trainer's held-out set)")
    ap.add_argument("--train", type=int, default=64, help="training files, evenly spaced")
    args = ap.parse_args()
    model = load_tokenizer(args.tokenizer, torch.device("cpu")).eval()
    if not hasattr(model, "encode_to_prequant"):
        print(f"quantization_gap: {args.tokenizer} has more than one level of codes; give a one-level tokenizer",
              file=sys.stderr)
        return 2
    files = sorted(Path(args.data).glob("*.png"))
    held, rest = files[-args.holdout:], files[:-args.holdout]
    train = rest[::max(1, len(rest) // args.train)][:args.train]
    print("| images | PSNR through the tokens | PSNR unquantized | mean distance latent -> code |")
    print("|---|---|---|---|")
    results = {}
    for name, paths in (("held out", held), ("training", train)):
        r = results[name] = measure(model, paths)
        print(f"| {name} ({len(paths)}) | {r['psnr tokens']:.2f} | {r['psnr unquantized']:.2f} "
              f"| {r['latent to its code']:.3f} |")
    r = results["held out"]
    print("\n| held-out source | images | PSNR | mean error R / G / B (of 255) | brightest output |")
    print("|---|---|---|---|---|")
    for source in sorted({p.stem.rsplit("_", 1)[0] for p in held}):
        idx = [i for i, p in enumerate(held) if p.stem.rsplit("_", 1)[0] == source]
        x, rec = r["images"][idx], r["rec"][idx]
        bias = ((rec - x).mean((0, 2, 3)) * 127.5).tolist()
        print(f"| {source} | {len(idx)} | {psnr_per_image(x, rec).mean():.2f} | "
              f"{' / '.join(f'{b:+.0f}' for b in bias)} | {rec.max():.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
