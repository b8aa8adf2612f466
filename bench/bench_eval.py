#!/usr/bin/env python
"""Speed of `vqgan eval` on 1,000 images at 64 px with the small tokenizer (preset small-cpu, untrained: speed
does not depend on training): images/s of the whole pipeline (decode the files, resize and crop, reconstruct,
measure) and the share of time spent in the tokenizer's own encode + decode.

The images are 80x72 crops of scikit-image's photographs (so the resize and the crop both run). LPIPS is timed
on a VGG16 of random weights written in torchvision's layout into a temporary TORCH_HOME: no ImageNet weights
can be had offline, and its values are not reported here (the cost of a VGG16 pass does not depend on its
weights). rFID runs only where the FID Inception weights are installed.

    python bench/bench_eval.py [--n 1000] [--batch-size 32] [--no-lpips] [--device cpu] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def make_images(folder: Path, n: int, seed: int = 0) -> None:
    from skimage import data

    photos = [Image.fromarray(getattr(data, name)()).convert("RGB")
              for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        img = photos[i % len(photos)]
        side = int(rng.integers(96, min(img.size)))
        left, top = (int(rng.integers(0, s - side + 1)) for s in img.size)
        img.crop((left, top, left + side, top + side)).resize((80, 72), Image.BICUBIC).save(folder / f"{i:04d}.png")


def save_small_tokenizer(folder: Path) -> None:
    from vqgan.checkpoint import save_model
    from vqgan.config import TokenizerTrainConfig, load_config
    from vqgan.presets import resolve_config_path
    from vqgan.tokenizers import VQModel

    cfg = load_config(TokenizerTrainConfig, resolve_config_path("small-cpu"))
    torch.manual_seed(0)
    save_model(VQModel(cfg.model), folder)


def save_random_vgg16(torch_home: Path) -> None:
    """A VGG16 `features.N.*` state dict of random weights at torchvision's file name (timing only)."""
    from vqgan.losses.lpips import VGG16_FILE, VGG16Features

    sd = {f"features.{k.split('.', 1)[1]}": v for k, v in VGG16Features().state_dict().items()}
    path = torch_home / "hub" / "checkpoints" / VGG16_FILE
    path.parent.mkdir(parents=True)
    torch.save(sd, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-lpips", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_images(tmp / "images", args.n)
        save_small_tokenizer(tmp / "tokenizer")
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TORCH_HOME": str(tmp / "torch")}
        if not args.no_lpips:
            save_random_vgg16(tmp / "torch")
        cmd = [sys.executable, "-m", "vqgan.cli", "eval", str(tmp / "tokenizer"), str(tmp / "images"), "--out",
               str(tmp / "out"), "--no-progress", "--batch-size", str(args.batch_size),
               *(["--device", args.device] if args.device else [])]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        command_s = time.perf_counter() - start
        summary = json.loads((tmp / "out" / "summary.json").read_text())
    speed = summary["metrics"]["speed"]
    s = speed["seconds"]
    result = {"images": summary["data"]["images"], "threads": torch.get_num_threads(),
              "command_seconds (with start-up and outputs)": round(command_s, 2),
              "pipeline images/s": round(speed["images_per_s"], 1),
              "encode images/s": round(speed["encode_images_per_s"], 1),
              "decode images/s": round(speed["decode_images_per_s"], 1),
              "tokenizer share": round(speed["tokenizer_share"], 3),
              **{f"{part} share": round(speed[f"{part}_share"], 3) for part in ("metrics", "lpips", "inception", "data")},
              "seconds": s,
              "metrics (PSNR, SSIM, histograms) / tokenizer": round(s["metrics"] / (s["encode"] + s["decode"]), 3),
              "all metrics incl. LPIPS, Inception / tokenizer": round(
                  (s["metrics"] + s["lpips"] + s["inception"]) / (s["encode"] + s["decode"]), 3),
              "lpips": "timed (random VGG16)" if not args.no_lpips else "off",
              "rfid": summary["metrics"]["rfid"] if isinstance(summary["metrics"]["rfid"], str) else "timed"}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
