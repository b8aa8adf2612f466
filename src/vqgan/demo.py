"""`vqgan demo`: both stages on the built-in scenes, end to end, then one HTML report.

1. the image tokenizer (preset `demo`), 2. a tokenizer of the scenes' segmentation maps (`demo-seg`),
3. a token store of all scenes with class labels and segmentation tokens, 4. a class-conditional prior and
5. a segmentation-conditioned prior (`demo-prior`), 6. class samples, completions, segmentation-to-image
samples and sliding-window images larger than the training size. Each stage whose model exists already is
skipped, so an interrupted demo continues where it stopped.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from .config import TokenizerTrainConfig, load_config
from .presets import resolve_config_path

log = logging.getLogger("vqgan.demo")
SAMPLING = dict(temperature=1.0, top_k=100)


def _stage(name: str, done: Path, timings: dict, fn: Callable[[], Any]) -> Any:
    if done.is_file():
        log.info("demo: %s is done already (%s)", name, done.parent)
        timings[name] = "done before"
        return None
    print(f"== demo: {name}", flush=True)
    t0 = time.perf_counter()
    result = fn()
    timings[name] = round(time.perf_counter() - t0, 1)
    return result


def run_demo(out: str = "runs/demo", tokenizer_steps: int = 0, progress: bool = True,
             overrides: list[str] = (), quick: bool = False) -> dict[str, Any]:
    """`quick`: a few steps per stage on 96 scenes (a smoke test of the whole pipeline, not a result)."""
    from .data.tokens import tokenize_folder
    from .eval.report import tokenizer_report
    from .train.stage1 import train_tokenizer
    from .train.stage2 import PriorTrainer, TransformerTrainConfig

    root = Path(out)
    timings: dict[str, Any] = {}
    results: dict[str, Any] = {}

    count = 96 if quick else 2048
    fast = ["train.steps=2", "data.holdout=8", f"data.builtin_count={count}"] if quick else []

    def tokenizer(preset: str, sub: str, extra: list[str]):
        cfg = load_config(TokenizerTrainConfig, resolve_config_path(preset),
                          [f"train.out_dir={root / sub}", *fast, *extra])
        result = train_tokenizer(cfg, resume="auto", progress=progress)
        tokenizer_report(root / sub, result, title=f"demo: {sub}")
        return result

    steps = [f"train.steps={tokenizer_steps}"] if tokenizer_steps else []
    results["tokenizer"] = _stage("image tokenizer", root / "tokenizer" / "model" / "config.yaml", timings,
                                  lambda: tokenizer("demo", "tokenizer", [*steps, *overrides]))
    results["seg_tokenizer"] = _stage("segmentation tokenizer", root / "seg_tokenizer" / "model" / "config.yaml",
                                      timings, lambda: tokenizer("demo-seg", "seg_tokenizer", []))
    _stage("token store", root / "tokens" / "meta.json", timings, lambda: tokenize_folder(
        str(root / "tokenizer" / "model"), "builtin:scenes", str(root / "tokens"), builtin_count=count,
        cond_maps="builtin:scenes-seg", cond_tokenizer=str(root / "seg_tokenizer" / "model"), progress=progress))
    for kind in ("class", "seg"):
        cfg = load_config(TransformerTrainConfig, resolve_config_path("demo-prior"), [
            f"data.tokens={root / 'tokens'}", f"train.out_dir={root / ('prior_' + kind)}",
            f"data.conditioning={'class' if kind == 'class' else 'spatial'}",
            # sequences of 64 map + 64 image tokens cost twice the class prior's per step
            *(["train.steps=300"] if kind == "seg" else []),
            *(["train.steps=2", "data.holdout=8"] if quick else [])])
        results[f"prior_{kind}"] = _stage(f"{kind}-conditioned prior", root / f"prior_{kind}" / "model" / "config.yaml",
                                          timings, lambda cfg=cfg: PriorTrainer(cfg, resume="auto", progress=progress).fit())
    print("== demo: samples", flush=True)
    t0 = time.perf_counter()
    pictures = generate_pictures(root, progress)
    timings["samples"] = round(time.perf_counter() - t0, 1)
    report = demo_report(root, timings, pictures)
    return {"report": str(report), "timings": timings}


@torch.no_grad()
def generate_pictures(root: Path, progress: bool = True) -> dict[str, Any]:
    """PNG grids under root/samples: class samples, completions, segmentation-to-image, large images."""
    from .data.images import to_tensor
    from .data.maps import one_hot, to_display
    from .data.scenes import SCENE_CLASSES, render_scene
    from .data.tokens import TokenStore
    from .generate import complete_images, write_grid
    from .priors.load import load_prior

    out = root / "samples"
    store = TokenStore(root / "tokens")
    held_out = list(range(len(store) - 6, len(store)))  # the priors' held-out rows (the last ones)
    class_prior = load_prior(str(root / "prior_class"))
    seg_prior = load_prior(str(root / "prior_seg"))
    decode = class_prior.tokenizer.decode
    g = torch.Generator().manual_seed(0)
    made: dict[str, Any] = {}

    rows = [decode(class_prior.sample(8, labels=torch.full((8,), c), generator=g, guidance_scale=2.0, **SAMPLING))
            for c in range(len(SCENE_CLASSES))]
    made["classes"] = write_grid(rows, out / "class_samples.png", scale=2)

    images = torch.stack([to_tensor(render_scene(i, 64)[0]) for i in held_out])
    labels = [SCENE_CLASSES[i % len(SCENE_CLASSES)] for i in held_out]
    rows = []
    for img, label in zip(images, labels):
        masked, outs = complete_images(class_prior, img[None], n=5, keep_rows=0.5, label=label, **SAMPLING)
        rows.append(torch.cat([img[None], masked, outs[0]]))
    made["completions"] = write_grid(rows, out / "completions.png", scale=2,
                                     headers=["image", "kept", *(f"sample {j + 1}" for j in range(5))])

    rows = []
    for r in held_out:
        item = store[r]
        cond_codes = store.cond_rows_to_codes(item["cond"][None])  # (1, h, w, depth)
        cond = cond_codes.expand(5, -1, -1, -1)
        shown = to_display(seg_prior.cond_tokenizer.decode(cond_codes), "segmentation")
        samples = decode(seg_prior.sample(5, cond=cond, generator=g, **SAMPLING))
        rows.append(torch.cat([shown, decode(store.rows_to_codes(item["tokens"][None])), samples]))
    made["seg_to_image"] = write_grid(rows, out / "seg_to_image.png", scale=2)

    # larger than the 64x64 training size: 64x256-pixel panoramas (8x32 tokens) through the 8x8 window. (The
    # scenes are not scale-free, sky above and ground below within 64 pixels, so they grow sideways.)
    big_class = decode(class_prior.sample(2, (8, 32), labels=torch.full((2,), SCENE_CLASSES.index("mountains")),
                                          generator=g, progress=progress, **SAMPLING))
    made["large_class"] = write_grid([big_class], out / "large_mountains.png", scale=2)
    seg = render_scene(len(store) - 3, 64)[1].resize((256, 64), Image.NEAREST)  # a scene's labels, stretched
    seg_input = one_hot(torch.from_numpy(np.asarray(seg, dtype=np.int64)), 8)[None]
    cond = seg_prior.encode_maps(seg_input)
    big_seg = decode(seg_prior.sample(1, tuple(cond.shape[1:3]), cond=cond, generator=g, progress=progress, **SAMPLING))
    made["large_seg"] = write_grid([to_display(seg_input, "segmentation"), big_seg], out / "large_from_seg.png",
                                   scale=2)
    made["class_names"] = list(SCENE_CLASSES)
    made["completion_labels"] = labels
    return made


def demo_report(root: Path, timings: dict, pictures: dict) -> Path:
    import html

    from .eval.report import table, write_report
    from .train.common import read_metrics

    def last_eval(run: str, key: str):
        rows = [r for r in read_metrics(root / run / "logs" / "metrics.jsonl") if r.get("kind") == "eval" and key in r]
        return round(rows[-1][key], 4) if rows else "n/a"

    def img(key: str) -> str:
        return f"<img src='{Path(pictures[key]).relative_to(root)}'>"

    summary = [{"stage": "image tokenizer", "held-out": f"PSNR {last_eval('tokenizer', 'psnr')} dB",
                "report": "<a href='tokenizer/report.html'>tokenizer/report.html</a>"},
               {"stage": "segmentation tokenizer", "held-out": f"pixel accuracy {last_eval('seg_tokenizer', 'accuracy')}"
                f", mIoU {last_eval('seg_tokenizer', 'miou')}",
                "report": "<a href='seg_tokenizer/report.html'>seg_tokenizer/report.html</a>"},
               {"stage": "class-conditional prior", "held-out": f"NLL {last_eval('prior_class', 'nll')} nats/token",
                "report": "prior_class/logs/train.log"},
               {"stage": "segmentation-conditioned prior",
                "held-out": f"NLL {last_eval('prior_seg', 'nll')} nats/token", "report": "prior_seg/logs/train.log"}]
    rows = "".join(f"<tr><td>{html.escape(r['stage'])}</td><td>{html.escape(r['held-out'])}</td><td>{r['report']}</td>"
                   "</tr>" for r in summary)
    classes = ", ".join(pictures["class_names"])
    sections = [
        ("Stages", f"<table><tr><th>stage</th><th>held-out</th><th>details</th></tr>{rows}</table>"
                   + table([{"stage": k, "seconds": v} for k, v in timings.items()])
                   + "<p class=note>Sampling: temperature 1, top-k 100. Perceptual network: none (the demo trains "
                     "without LPIPS: no ImageNet VGG16 can be had offline).</p>"),
        ("Class-conditional samples", f"<p class=note>One row per class: {html.escape(classes)} (guidance scale "
                                      f"2).</p>{img('classes')}"),
        ("Completions", "<p class=note>Each row: a held-out scene, its top half kept (the rest grey), five "
                        "completions by the class-conditional prior (told the scene's class: "
                        f"{html.escape(', '.join(pictures['completion_labels']))}).</p>{img('completions')}"),
        ("Segmentation to image", "<p class=note>Each row: a held-out segmentation map (as its tokenizer decodes "
                                  "it), the real scene, five samples of the segmentation-conditioned prior."
                                  f"</p>{img('seg_to_image')}"),
        ("Larger than the training size (sliding window)",
         "<p class=note>The priors were trained on 64x64 images (8x8 tokens). These are 64x256 (8x32 tokens), "
         "each token sampled from the 8x8 window around it: two class-conditional 'mountains' panoramas, then a "
         "wide segmentation map and the image sampled on it.</p>"
         f"{img('large_class')}{img('large_seg')}"),
    ]
    return write_report(root / "report.html", "vqgan demo: both stages on the built-in scenes", sections)
