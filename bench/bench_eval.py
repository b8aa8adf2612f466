#!/usr/bin/env python
"""Speed of `vqgan eval` on 1,000 images at 64 px with the small tokenizer (preset small-cpu, untrained: speed
does not depend on training): images/s of the whole pipeline (decode the files, resize and crop, reconstruct,
measure) and the share of time spent in the tokenizer's own encode + decode.

The images are 80x72 crops of scikit-image's photographs (so the resize and the crop both run). LPIPS is timed
on AlexNet (`vqgan eval`'s default, the lpips package's) and on VGG16, one eval each, with random weights written
in torchvision's layout into a temporary TORCH_HOME: no ImageNet weights can be had offline, and their values are
not reported here (the cost of a pass does not depend on the weights). `--inception` times rFID the same way
with torch-fidelity's Inception.

    python bench/bench_eval.py [--n 1000] [--batch-size 32] [--lpips alex,vgg] [--inception] [--device cpu]
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


def make_images(folder: Path, n: int, seed: int = 0, size: tuple[int, int] = (80, 72)) -> None:
    from skimage import data

    photos = [Image.fromarray(getattr(data, name)()).convert("RGB")
              for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        img = photos[i % len(photos)]
        side = int(rng.integers(min(96 * size[0] // 80, min(img.size) - 1), min(img.size)))
        left, top = (int(rng.integers(0, s - side + 1)) for s in img.size)
        img.crop((left, top, left + side, top + side)).resize(size, Image.BICUBIC).save(folder / f"{i:04d}.png")


def save_small_tokenizer(folder: Path, preset: str = "small-cpu") -> None:
    from vqgan.checkpoint import save_model
    from vqgan.config import TokenizerTrainConfig, load_config
    from vqgan.presets import resolve_config_path
    from vqgan.tokenizers import VQModel

    cfg = load_config(TokenizerTrainConfig, resolve_config_path(preset))
    torch.manual_seed(0)
    save_model(VQModel(cfg.model), folder)


def save_random_backbone(torch_home: Path, net: str) -> None:
    """An LPIPS backbone (`vgg`: VGG16, `alex`: AlexNet) as a `features.N.*` state dict of random weights at
    torchvision's file name (timing only)."""
    from vqgan.losses.lpips import BACKBONES, SlicedFeatures

    sd = {f"features.{k.split('.', 1)[1]}": v for k, v in SlicedFeatures(BACKBONES[net]).state_dict().items()}
    path = torch_home / "hub" / "checkpoints" / BACKBONES[net].file
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)


def save_random_inception(torch_home: Path) -> None:
    """torch-fidelity's FID Inception with random weights at the real file name (timing only)."""
    from vqgan.eval.inception import FID_WEIGHTS_FILES, build_network

    path = torch_home / "hub" / "checkpoints" / FID_WEIGHTS_FILES[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(build_network().state_dict(), path)


def load_preset_resolution(preset: str) -> int:
    from vqgan.config import TokenizerTrainConfig, load_config
    from vqgan.presets import resolve_config_path

    return load_config(TokenizerTrainConfig, resolve_config_path(preset)).model.resolution


def run_eval(tmp: Path, net: str, args) -> dict:
    """One `vqgan eval` of the images with LPIPS on `net` (or none): its speed figures."""
    home = tmp / f"torch-{net}"
    if net != "none":
        save_random_backbone(home, net)
    if args.inception:
        save_random_inception(home)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TORCH_HOME": str(home)}
    out = tmp / f"out-{net}"
    cmd = [sys.executable, "-m", "vqgan.cli", "eval", str(tmp / "tokenizer"), str(tmp / "images"), "--out",
           str(out), "--no-progress", "--batch-size", str(args.batch_size),
           *(["--lpips-net", net] if net != "none" else []), *(["--device", args.device] if args.device else [])]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    command_s = time.perf_counter() - start
    summary = json.loads((out / "summary.json").read_text())
    speed = summary["metrics"]["speed"]
    s = speed["seconds"]
    tokenizer = s["encode"] + s["decode"]
    return {"lpips": f"{net} (random weights, timing only)" if net != "none" else "off",
            "images": summary["data"]["images"], "threads": torch.get_num_threads(),
            "command_seconds (with start-up and outputs)": round(command_s, 2),
            "pipeline images/s": round(speed["images_per_s"], 1),
            "encode images/s": round(speed["encode_images_per_s"], 1),
            "decode images/s": round(speed["decode_images_per_s"], 1),
            "tokenizer share": round(speed["tokenizer_share"], 3),
            **{f"{part} share": round(speed[f"{part}_share"], 3) for part in ("metrics", "lpips", "inception", "data")},
            "seconds": s,
            "metrics (PSNR, SSIM, histograms) / tokenizer": round(s["metrics"] / tokenizer, 3),
            "LPIPS / tokenizer": round(s["lpips"] / tokenizer, 3),
            "Inception / tokenizer": round(s["inception"] / tokenizer, 3),
            "per-image metrics (incl. LPIPS) / tokenizer": round((s["metrics"] + s["lpips"]) / tokenizer, 3),
            "rfid": "timed (random Inception)" if args.inception else summary["metrics"]["rfid"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lpips", default="alex,vgg", help="LPIPS networks to time, one eval each: alex, vgg, none")
    p.add_argument("--inception", action="store_true",
                   help="also time rFID (torch-fidelity's Inception with random weights)")
    p.add_argument("--preset", default="small-cpu", help="the tokenizer's preset (untrained), e.g. f16-1024 at 256 px")
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_small_tokenizer(tmp / "tokenizer", args.preset)
        side = load_preset_resolution(args.preset)
        make_images(tmp / "images", args.n, size=(side * 5 // 4, side * 9 // 8))  # resized and cropped, as 80x72 -> 64
        results = [run_eval(tmp, net, args) for net in args.lpips.split(",")]
    print(json.dumps(results, indent=1))
    keys = ("pipeline images/s", "tokenizer share", "metrics (PSNR, SSIM, histograms) / tokenizer",
            "LPIPS / tokenizer", "Inception / tokenizer", "per-image metrics (incl. LPIPS) / tokenizer")
    print("| LPIPS | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for r in results:
        print(f"| {r['lpips']} | " + " | ".join(str(r[k]) for k in keys) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
