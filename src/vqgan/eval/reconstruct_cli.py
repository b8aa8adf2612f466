"""`vqgan eval TOKENIZER DATA --out DIR`: the command line of `reconstruction.py`."""
from __future__ import annotations

import argparse

from .weights import LPIPS_NETS


def add_parser(sub) -> argparse.ArgumentParser:
    e = sub.add_parser("eval", help="reconstruction metrics of a tokenizer on a folder of images (PSNR, SSIM, "
                                    "MS-SSIM, LPIPS, rFID, codebook use), by the standard protocol")
    e.add_argument("model", help="tokenizer directory (a run, a checkpoint, or a converted model)")
    e.add_argument("images", help="image folder (recursive) or file, or builtin:scenes")
    e.add_argument("--out", required=True, help="output folder: summary.json, per_image.csv, report.html")
    add_protocol_arguments(e)
    e.add_argument("--save-stats", default=None, metavar="NPZ",
                   help="write the inputs' Inception statistics (mu, sigma) to this .npz")
    e.add_argument("--reference-stats", default=None, metavar="NPZ",
                   help="also report the FID of the reconstructions against these statistics (.npz with mu, sigma)")
    e.add_argument("--show", type=int, default=8, help="the k worst and k best reconstructions in the report")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=run)
    return e


def add_protocol_arguments(e: argparse.ArgumentParser) -> None:
    """The options of the protocol and its measuring networks (shared with `vqgan compare`)."""
    e.add_argument("--resolution", type=int, default=None,
                   help="evaluate at this size (a multiple of the tokenizer's grid factor; default: its training "
                        "resolution)")
    e.add_argument("--resize-filter", default="lanczos",
                   help="lanczos or bicubic (PIL's, antialiased): resizes the short side to the resolution before "
                        "the centre crop")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--num-workers", type=int, default=0, help="image-decoding worker processes")
    e.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when there is one)")
    e.add_argument("--lpips-net", default=None, choices=LPIPS_NETS,
                   help="LPIPS on AlexNet (the lpips package's default for measuring) or VGG16 (the training loss's "
                        "network); default alex, or vgg when --vgg-weights is given")
    e.add_argument("--alexnet-weights", default=None,
                   help="torchvision's alexnet-owt-7be5be79.pth for LPIPS (default: the torch hub cache)")
    e.add_argument("--vgg-weights", default=None,
                   help="torchvision's vgg16-397923af.pth for LPIPS on VGG16 (default: the torch hub cache)")
    e.add_argument("--lpips-heads", default=None,
                   help="LPIPS v0.1 alex.pth / vgg.pth (default: the lpips package's copy)")
    e.add_argument("--inception-weights", default=None,
                   help="the FID Inception weights file (default: found in the torch hub cache)")


def protocol_options(args) -> dict:
    """`EvalOptions` fields from the arguments of `add_protocol_arguments`, --show and --no-progress."""
    return dict(batch_size=args.batch_size, resolution=args.resolution, resize_filter=args.resize_filter,
                device=args.device, num_workers=args.num_workers,
                lpips_net=args.lpips_net,
                vgg_weights=args.vgg_weights, alexnet_weights=args.alexnet_weights, lpips_heads=args.lpips_heads, inception_weights=args.inception_weights, show=args.show,
                progress=not args.no_progress)


def run(args) -> dict:
    from ..parallel import is_first_process
    from .reconstruction import EvalOptions, evaluate_folder

    opts = EvalOptions(**protocol_options(args), save_stats=args.save_stats, reference_stats=args.reference_stats)
    summary = evaluate_folder(args.model, args.images, args.out, opts)
    if not is_first_process():  # under torchrun only rank 0 reports
        return {}
    m = summary["metrics"]
    return {"out": args.out, "images": summary["data"]["images"], "skipped": summary["data"]["skipped"],
            **{k: m[k] for k in ("psnr", "ssim", "ms_ssim", "lpips", "rfid")},
            "usage": m["codebook"]["usage"], "images_per_s": round(m["speed"]["images_per_s"], 2),
            "tokenizer_share": round(m["speed"]["tokenizer_share"], 3)}
