"""`vqgan compare MODEL [MODEL ...] --data DIR --out DIR`: the command line of `compare.py`."""
from __future__ import annotations

import argparse

from .reconstruct_cli import add_protocol_arguments, protocol_options


def add_parser(sub) -> argparse.ArgumentParser:
    c = sub.add_parser("compare", help="several tokenizers on the same images, side by side: a metrics table, "
                                       "their reconstructions, training curves and PSNR histograms (HTML)")
    c.add_argument("models", nargs="+", metavar="MODEL",
                   help="tokenizers: training run folders (their curves are drawn), checkpoints or model folders")
    c.add_argument("--data", required=True, help="image folder (recursive) or file, or builtin:scenes")
    c.add_argument("--out", required=True,
                   help="output folder: compare.html, summary.json, comparison.csv, each model's evaluation in eval/")
    c.add_argument("--names", default=None, help="comma-separated labels, one per model (default: folder names)")
    c.add_argument("--max-images", type=int, default=None, help="only the first N images by name (default: all)")
    add_protocol_arguments(c)
    c.add_argument("--show", type=int, default=8,
                   help="the same k images (evenly spaced in name order) reconstructed by every model")
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(func=run)
    return c


def run(args) -> dict:
    import os

    from ..parallel import is_first_process
    from .compare import CompareOptions, compare

    names = args.names.split(",") if args.names is not None else None
    summary = compare(args.models, args.data, args.out,
                      CompareOptions(**protocol_options(args), names=names, max_images=args.max_images))
    if not is_first_process():  # under torchrun only rank 0 reports
        return {}
    def short(v):  # "not computed: why" -> "not computed" (the report and summary.json say why)
        return v.split(":")[0] if isinstance(v, str) else v

    return {"out": args.out, "report": os.path.join(args.out, "compare.html"), "images": summary["data"]["images"],
            "models": {r["name"]: {k: short(r[k]) for k in ("psnr", "ssim", "lpips", "rfid", "usage")}
                       for r in summary["models"]}, "best": summary["best"]}
