#!/usr/bin/env python
"""`vqgan imagine` speed on this CPU: time per optimisation step and where it goes.

128x128 image, 16 cutouts, ViT-B-32 (random weights: speed does not depend on them), with the `demo` and the
`f16-1024` tokenizer configs (untrained: speed does not depend on the weights either). One step is split into
stages with detached hand-offs, so each stage's forward and backward are timed on their own:
decoder (snap + decode), cutouts + augmentation, CLIP image tower, and each one's backward.

    python bench/bench_imagine.py [--configs demo,f16-1024] [--steps 2] [--threads 2] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def stage_times(opt, prompt) -> dict[str, float]:
    """One step in six timed pieces; returns seconds per piece."""
    from vqgan.imagine.losses import ClampWithGrad, prompt_loss

    t = {}
    clip = opt.clips[0]
    opt.optimizer.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    image = ClampWithGrad.apply(opt.steer.decode(opt.steer.snap(opt.latents)).float().add(1).div(2), 0.0, 1.0)
    t["decoder fwd"] = time.perf_counter() - t0
    image_in = image.detach().requires_grad_(True)
    t0 = time.perf_counter()
    views = opt.cutouts[clip.input_size](image_in)
    t["cutouts+aug fwd"] = time.perf_counter() - t0
    views_in = views.detach().requires_grad_(True)
    t0 = time.perf_counter()
    loss = prompt_loss(clip.encode_image(views_in), opt.targets.by_prompt[prompt][0], prompt)
    t["CLIP fwd"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    loss.backward()
    t["CLIP bwd"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    views.backward(views_in.grad)
    t["cutouts+aug bwd"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    image.backward(image_in.grad)
    opt.optimizer.step()
    opt.steer.clamp_(opt.latents)
    t["decoder bwd + Adam"] = time.perf_counter() - t0
    return t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="demo,f16-1024")
    ap.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--cutn", type=int, default=16)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import open_clip

    from vqgan.config import TokenizerTrainConfig, load_config
    from vqgan.imagine.clip_models import ClipModel, ClipSpec
    from vqgan.imagine.latents import Steerable
    from vqgan.imagine.optimise import OptimiseConfig, Optimiser, Targets
    from vqgan.imagine.prompts import Prompt
    from vqgan.presets import resolve_config_path
    from vqgan.registry import TOKENIZERS

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None).eval().requires_grad_(False)
    clip = ClipModel(model, open_clip.get_tokenizer("ViT-B-32"), ClipSpec(), Path("random"), "")
    prompt = Prompt("a red house")
    targets = Targets([clip], [prompt], None)
    rows = []
    for name in args.configs.split(","):
        cfg = load_config(TokenizerTrainConfig, resolve_config_path(name)).model
        tokenizer = TOKENIZERS.build(cfg.kind, cfg).eval()
        steer = Steerable(tokenizer)
        g = torch.Generator().manual_seed(0)
        opt = Optimiser(steer, [clip], targets, OptimiseConfig(cutn=args.cutn), steer.noise(args.size, args.size, g),
                        None, g)
        stage_times(opt, prompt)  # warm-up
        runs = [stage_times(opt, prompt) for _ in range(args.steps)]
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        total = sum(med.values())
        rows.append({"config": name, "step_s": total, **med})
        print(f"\n{name}: {total:.2f} s per step ({args.size}x{args.size}, {args.cutn} cutouts, ViT-B-32, "
              f"{args.threads} threads)")
        for k, v in med.items():
            print(f"  {k:<20} {v:7.3f} s  {100 * v / total:5.1f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
