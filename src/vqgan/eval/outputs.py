"""What `vqgan eval` writes: summary.json (the protocol, the metrics, the weights and data they came from),
per_image.csv (one row per image) and report.html (summary, the worst and best reconstructions, the per-image
PSNR histogram)."""
from __future__ import annotations

import csv
import html
import json
from pathlib import Path

import torch

from ..errors import UserError
from ..losses.lpips import BACKBONES
from . import similarity
from .plots import histogram_plot
from .protocol import RESIZE_FILTERS, to_signed
from .report import image_grid, table, write_report
from .weights import NOT_COMPUTED

PER_IMAGE = ("psnr", "ssim", "ms_ssim", "lpips")


def protocol(resolution: int, resize_filter: str, filter_name: str, n_images: int, lpips_net: str) -> dict:
    """The protocol in words: how each number was made."""
    return {
        "resolution": resolution, "resize_filter": resize_filter,
        "resize": f"short side to {resolution} px by {filter_name}, then the centre {resolution}x{resolution} crop",
        "round_trip": "inputs are uint8 after the resize and enter the tokenizer as x / 127.5 - 1; reconstructions "
                      "are clamped to [-1, 1] and rounded to uint8 ((x + 1) * 127.5, to nearest); both are "
                      "measured as uint8",
        "psnr": "per image: 10 log10(255^2 / MSE), the MSE over all pixels and channels (floored at 1e-10); "
                "then the mean over images",
        "ssim": f"per image: Gaussian window of {similarity.WINDOW} taps, sigma {similarity.SIGMA}, K1 "
                f"{similarity.K1}, K2 {similarity.K2}, data range 255 on uint8, population statistics, valid "
                "window positions, mean over channels (scikit-image structural_similarity(gaussian_weights=True, "
                "sigma=1.5, use_sample_covariance=False, data_range=255)); then the mean over images",
        "ms_ssim": f"per image: {len(similarity.MS_SSIM_WEIGHTS)} scales weighted {list(similarity.MS_SSIM_WEIGHTS)}, "
                   "2x2 average pooling between scales, the SSIM window above (pytorch-msssim ms_ssim("
                   f"data_range=255)); needs {similarity.MS_SSIM_MIN_SIDE} px a side; then the mean over images",
        "lpips": f"per image: LPIPS v0.1 on {BACKBONES[lpips_net].title} (--lpips-net {lpips_net}), both images "
                 "scaled to [-1, 1]; then the mean over images",
        "lpips_net": lpips_net,
        "rfid": f"FID between the Inception-v3 pool features (2048) of the {n_images} inputs and of their "
                "reconstructions; FID is biased upwards on small sets: compare numbers at the same count",
        "codebook": "token histograms over the whole set, one per code stream (level, depth): usage is the share "
                    "of codes used at least once, perplexity 2^entropy, entropy in bits; bits per position and "
                    "per image: nominal (log2 of the vocabularies) and by the histograms' entropy",
    }


def _mean_or(rows: list[dict], key: str, reason: str) -> float | str:
    values = [r[key] for r in rows if r[key] is not None]
    return sum(values) / len(values) if values else reason


def _fids(m, reference_stats: str | None) -> dict:
    """rFID (inputs vs reconstructions) and, with reference statistics, FID of each against those; "not computed"
    below two images (a covariance needs two)."""
    from .fid import frechet_distance, load_stats

    if m.fake.count < 2:
        reason = f"{NOT_COMPUTED}: FID needs at least 2 images, {m.fake.count} measured"
        return {"rfid": reason, "inception_images": int(m.fake.count),
                **({"fid_vs_reference": reason, "inputs_fid_vs_reference": reason,
                    "reference_stats": str(reference_stats)} if reference_stats else {})}
    real, fake = m.real.mean_cov(), m.fake.mean_cov()
    out = {"rfid": frechet_distance(*real, *fake), "inception_images": int(m.real.count)}
    if reference_stats:
        ref = load_stats(reference_stats)
        out.update(fid_vs_reference=frechet_distance(*fake, *ref),
                   inputs_fid_vs_reference=frechet_distance(*real, *ref), reference_stats=str(reference_stats))
    return out


def summarize(m, names: list[str], resolution: int, opts, unreadable: list[str], tokenizer: dict, data: dict,
              weights: dict, world_size: int) -> dict:
    """The summary of a finished run (every process holds the same gathered measures)."""

    rows = m.rows
    if not rows:
        raise UserError(f"none of the {data['files']} images under {data['folder']} could be read; nothing measured")
    too_small = (f"{NOT_COMPUTED}: images smaller than {similarity.MS_SSIM_MIN_SIDE} px a side (the 5 scales of an "
                 f"{similarity.WINDOW}-tap window); evaluate at --resolution {similarity.MS_SSIM_MIN_SIDE} or more (a "
                 "multiple of the grid factor) for it")
    psnrs = torch.tensor([r["psnr"] for r in rows], dtype=torch.float64)
    metrics = {"psnr": float(psnrs.mean()), "psnr_std": float(psnrs.std()) if len(rows) > 1 else 0.0,
               "ssim": _mean_or(rows, "ssim", NOT_COMPUTED), "ms_ssim": _mean_or(rows, "ms_ssim", too_small),
               "lpips": _mean_or(rows, "lpips", str(weights["lpips"]))}
    metrics.update(_fids(m, opts.reference_stats) if m.real is not None else {"rfid": weights["inception"]})
    n = len(rows)
    s = m.seconds
    tokenizer_s = s["encode"] + s["decode"]
    speed = {"images_per_s": n / s["wall"], "encode_images_per_s": n / s["encode"],
             "decode_images_per_s": n / s["decode"], "tokenizer_share": tokenizer_s / s["process_seconds"],
             **{f"{part}_share": s[part] / s["process_seconds"] for part in ("metrics", "lpips", "inception", "data")},
             "seconds": {k: round(v, 4) for k, v in s.items()}, "processes": world_size,
             "note": "seconds are summed over processes except wall (the slowest); encode/decode images/s are per "
                     "process; metrics_share is PSNR, SSIM, MS-SSIM and the code histograms, LPIPS and Inception "
                     "have their own shares"}
    return {"protocol": protocol(resolution, opts.resize_filter, RESIZE_FILTERS[opts.resize_filter][1], n,
                                 opts.lpips_choice()[0]),
            "metrics": {**metrics, "codebook": m.usage.summary(resolution, resolution), "speed": speed},
            "weights": weights, "tokenizer": tokenizer,
            "data": {**data, "images": n, "skipped": len(unreadable) + m.skipped,
                     "skipped_files": sorted(unreadable + [names[i] for i in m.skipped_files])}}


def _network_records(weights: dict) -> list[dict]:
    """The file records of the measuring networks (LPIPS backbone, Inception) among `weights`' entries."""
    found = []
    for record in weights.values():
        if isinstance(record, dict):
            found += [record] if "sha256" in record else [r for r in record.values() if isinstance(r, dict)]
    return found


def _csv_value(v) -> str:
    return "" if v is None else f"{v:.6f}"


def write_files(folder: Path, summary: dict, rows: list[dict], names: list[str], shown: dict) -> None:
    """The outputs into `folder` (made if missing); callers write into a temporary folder (`replace_files`)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    with open(folder / "per_image.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", *PER_IMAGE])
        w.writerows([names[r["index"]], *(_csv_value(r[k]) for k in PER_IMAGE)] for r in rows)
    _write_report(folder, summary, rows, names, shown)


def _write_report(folder: Path, summary: dict, rows: list[dict], names: list[str], shown: dict) -> None:

    m, data = summary["metrics"], summary["data"]
    code = m["codebook"]
    quality = {"images": data["images"], "skipped": data["skipped"], "PSNR (dB)": m["psnr"], "SSIM": m["ssim"],
               "MS-SSIM": m["ms_ssim"], f"LPIPS ({summary['protocol']['lpips_net']})": m["lpips"],
               "rFID": m["rfid"],
               **({"FID vs reference": m["fid_vs_reference"],
                   "inputs' FID vs reference": m["inputs_fid_vs_reference"]} if "fid_vs_reference" in m else {})}
    codes = {"codebook usage": code["usage"], "perplexity": code["perplexity"], "entropy (bits)": code["entropy_bits"],
             "bits / image": code["bits_per_image"], "images/s": m["speed"]["images_per_s"],
             "time in tokenizer": f"{100 * m['speed']['tokenizer_share']:.0f}%"}
    head = {**quality, **codes}
    short = {k: (NOT_COMPUTED if isinstance(v, str) and v.startswith(NOT_COMPUTED) else v) for k, v in head.items()}
    notes = "".join(f"<li>{html.escape(k)}: {html.escape(v)}</li>" for k, v in head.items()
                    if isinstance(v, str) and v.startswith(NOT_COMPUTED))
    notes += "".join(f"<li>{html.escape(r['file'])} (sha256 {r['sha256'][:12]}...) does not hash to the name it carries: "
                     "not the published weights, so these numbers do not compare with published ones</li>"
                     for r in _network_records(summary["weights"]) if r.get("matches_name") is False)
    tok = summary["tokenizer"]
    sections = [("Summary", table([{k: short[k] for k in quality}]) + table([{k: short[k] for k in codes}])
                 + (f"<ul class=note>{notes}</ul>" if notes else "")
                 + f"<p class=note>Tokenizer {html.escape(tok['path'])} ({html.escape(str(tok['kind']))}, "
                   f"{html.escape(tok['codes'])}, fingerprint {tok['fingerprint']}); data "
                   f"{html.escape(data['folder'])}</p>"),
                ("Protocol", table([{"step": k, "how": v} for k, v in summary["protocol"].items()]))]
    scale = max(1, 128 // summary["protocol"]["resolution"])
    for name, (chosen, x, rec) in shown.items():
        image_grid([to_signed(x), to_signed(rec)], scale=scale).save(folder / f"{name}.png")
        listing = [{"#": i + 1, "path": names[r["index"]], **{k: r[k] for k in PER_IMAGE}}
                   for i, r in enumerate(chosen)]
        sections.append((f"The {len(chosen)} {name} reconstructions (by PSNR)",
                         "<p class=note>Inputs above, reconstructions below, left to right as listed.</p>"
                         f"<img src='{name}.png'>" + table(listing)))
    histogram_plot([r["psnr"] for r in rows], f"per-image PSNR ({len(rows)} images)", "PSNR (dB)").save(
        folder / "psnr_histogram.png")
    sections.append(("Per-image PSNR", "<img src='psnr_histogram.png'>"))
    sections.append(("Codebook use per stream", table(code["streams"])))
    write_report(folder / "report.html", "Reconstruction evaluation", sections)
