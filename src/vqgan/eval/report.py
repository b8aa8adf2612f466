"""PNG grids, plots and an HTML report a person can read (the charts are matplotlib's, see plots.py)."""
from __future__ import annotations

import html
import math
import numbers
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..checkpoint import atomic_file
from .metrics import to_unit
from .plots import bar_plot, histogram_plot, line_plot  # noqa: F401 - re-exported for the reports


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    return (to_unit(images.detach().float().cpu()) * 255.0).round().byte().permute(0, 2, 3, 1).numpy()


def image_grid(rows: Sequence[torch.Tensor], pad: int = 2, scale: int = 1, fill: int = 255) -> Image.Image:
    """Rows of image batches (each (B, 3, H, W) in [-1, 1]) -> one picture, row by row."""
    arrays = [to_uint8(r) for r in rows]
    h, w = arrays[0].shape[1:3]
    cols = max(a.shape[0] for a in arrays)
    grid = Image.new("RGB", (cols * (w + pad) + pad, len(arrays) * (h + pad) + pad), (fill,) * 3)
    for r, a in enumerate(arrays):
        for c in range(a.shape[0]):
            grid.paste(Image.fromarray(a[c]), (pad + c * (w + pad), pad + r * (h + pad)))
    if scale != 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    return grid


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def headed_grid(headers: Sequence[str], rows: Sequence[torch.Tensor], scale: int = 1, pad: int = 2) -> Image.Image:
    """`image_grid` of `rows` with a heading over each column (the text is not scaled up)."""
    from PIL import ImageDraw

    grid = image_grid(rows, pad=pad, scale=scale)
    font = _font(11)
    w = rows[0].shape[-1]
    height = int(max(ImageDraw.Draw(grid).textbbox((0, 0), h, font=font)[3] for h in headers)) + 6
    out = Image.new("RGB", (grid.width, grid.height + height), (255, 255, 255))
    out.paste(grid, (0, height))
    draw = ImageDraw.Draw(out)
    for c, head in enumerate(headers):
        centre = (pad + c * (w + pad) + w / 2) * scale
        draw.text((centre - draw.textlength(head, font=font) / 2, 3), head, fill=(0, 0, 0), font=font)
    return out


def labelled_grid(labels: Sequence[str], rows: Sequence[torch.Tensor], scale: int = 1, pad: int = 2) -> Image.Image:
    """`image_grid` of `rows` with each row's label written to its left (the text is not scaled up)."""
    from PIL import ImageDraw

    grid = image_grid(rows, pad=pad, scale=scale)
    font = _font(14)
    draw = ImageDraw.Draw(grid)
    margin = int(max(draw.textlength(label, font=font) for label in labels)) + 12
    out = Image.new("RGB", (grid.width + margin, grid.height), (255, 255, 255))
    out.paste(grid, (margin, 0))
    draw = ImageDraw.Draw(out)
    h = rows[0].shape[-2]
    for r, label in enumerate(labels):
        top, bottom = draw.textbbox((0, 0), label, font=font)[1::2]
        draw.text((6, (pad + r * (h + pad) + h / 2) * scale - (top + bottom) / 2), label, fill=(0, 0, 0), font=font)
    return out


def pairs_grid(inputs: torch.Tensor, recs: torch.Tensor, per_row: int = 8, scale: int = 2) -> Image.Image:
    """Input row above its reconstruction row, `per_row` images wide."""
    rows = []
    for i in range(0, inputs.shape[0], per_row):
        rows += [inputs[i:i + per_row], recs[i:i + per_row]]
    return image_grid(rows, scale=scale)


def write_report(path: Path, title: str, sections: list[tuple[str, str]]) -> Path:
    """A self-contained HTML page: sections of (heading, html body); images referenced by relative path.
    Written to a temporary file and renamed, so a reader never sees half a page."""
    body = "\n".join(f"<h2>{html.escape(h)}</h2>\n{content}" for h, content in sections)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}
img{{image-rendering:pixelated;max-width:100%;border:1px solid #ddd}}
table{{border-collapse:collapse;display:block;overflow-x:auto;max-width:100%}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}td.text{{text-align:left}}
th{{background:#f4f4f4}} .note{{color:#555}}</style></head>
<body><h1>{html.escape(title)}</h1>
{body}
</body></html>
"""
    return atomic_file(path, lambda tmp: tmp.write_text(page))


def table(rows: list[dict], columns: Sequence[str] | None = None, bold: set[tuple[int, str]] = frozenset()) -> str:
    """An HTML table of `rows`; the cells at (row index, column) in `bold` are set in bold (e.g. the best)."""
    if not rows:
        return "<p class=note>none</p>"
    columns = list(columns or rows[0].keys())
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)

    def cell(i: int, c: str) -> str:
        value = rows[i].get(c)
        text = html.escape(_cell(value))
        text = f"<b>{text}</b>" if (i, c) in bold else text
        numeric = isinstance(value, numbers.Number) or (isinstance(value, str) and value.rstrip("%x").replace(
            ".", "", 1).isdigit())  # numbers (and "37%", "1.2x") right-aligned, text left
        return f"<td>{text}</td>" if numeric else f"<td class=text>{text}</td>"

    body = "".join("<tr>" + "".join(cell(i, c) for c in columns) + "</tr>" for i in range(len(rows)))
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _series(rows: list[dict], *keys: str) -> dict[str, tuple[list, list]]:
    """{key: (steps, values)} of the logged rows, for the keys that some row has."""
    return {k: ([r["step"] for r in rows if k in r], [r[k] for r in rows if k in r]) for k in keys
            if any(k in r for r in rows)}


def _loss_charts(train: list[dict], loss_cfg: dict, out: Path) -> str:
    """losses.png (the generator's terms) and gan.png, or a note where no discriminator has trained; their html."""
    losses = _series(train, "total", "rec", "l1", "l2", "logit_laplace", "ce", "lpips", "codebook", "gan")
    if loss_cfg.get("pixel_weight", 1.0) == 0 and "l1" in losses:  # logged for reading, not trained on
        losses["l1 (not in the loss)"] = losses.pop("l1")
    line_plot(losses, "generator losses", log_y=True, ylabel="loss").save(out / "losses.png")
    html_ = ("<p class=note>rec: the weighted reconstruction terms the model is trained on; codebook: the quantizer's "
             "own loss, below 0 where an entropy bonus outweighs it. Where a loss goes below 0 the scale is "
             "logarithmic on both sides of a linear band around 0.</p><img src='report/losses.png'>")
    gan = _series(train, "disc", "logits_real", "logits_fake", "adaptive_weight")
    if "disc" in gan:
        line_plot(gan, "discriminator: loss, mean logits, adaptive weight").save(out / "gan.png")
        return html_ + "<img src='report/gan.png'>"
    (out / "gan.png").unlink(missing_ok=True)
    if loss_cfg.get("disc_factor", 1.0) == 0:
        return html_ + "<p class=note>No discriminator in this run (loss.disc_factor 0).</p>"
    return html_ + (f"<p class=note>The discriminator had not started: it trains from step "
                    f"{loss_cfg.get('disc_train_start', '?')} (loss.disc_train_start).</p>")


def _code_histograms(result: dict, out: Path) -> str:
    """One sorted histogram of held-out codes per code stream (level, depth: separate vocabularies); their html."""
    images = []
    for i, (counts, label) in enumerate(zip(result.get("stream_counts", [result["counts"]]),
                                            result.get("stream_labels", [""]))):
        name = "codebook_histogram.png" if i == 0 else f"codebook_histogram_{i + 1}.png"
        used = f"{int((counts > 0).sum())} of {len(counts)} codes used"
        bar_plot(sorted(counts.tolist(), reverse=True),
                 f"held-out code histogram{', ' + label if label else ''}, sorted: {used}",
                 xlabel="code (most used first)", ylabel="positions").save(out / name)
        images.append(f"<img src='report/{name}'>")
    return "".join(images)


def tokenizer_report(run_dir: Path, result: dict, title: str = "VQGAN tokenizer") -> Path:
    """report.html + PNGs for a stage-1 run: reconstructions, loss curves, codebook usage, PSNR."""
    from ..train.common import read_metrics

    run_dir = Path(run_dir)
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = read_metrics(run_dir / "logs" / "metrics.jsonl")
    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    labels = "accuracy" in result  # a segmentation-map tokenizer
    quality = ("accuracy", "miou") if labels else ("psnr",)
    losses_html = _loss_charts(train, _run_config(run_dir).get("loss", {}), out)
    line_plot(_series(train, "usage_window", "usage_batch"), "codebook usage",
              ylabel="fraction of codes used").save(out / "usage.png")
    line_plot(_series(evals, *quality), "held-out pixel accuracy / mIoU" if labels else "held-out PSNR",
              ylabel="fraction" if labels else "PSNR (dB)").save(out / "psnr.png")
    x, rec = result["examples"]
    pairs_grid(x, rec, scale=3).save(out / "reconstructions.png")
    head = ({"pixel accuracy": round(result["accuracy"], 4), "mIoU": round(result["miou"], 4)} if labels else
            {"PSNR (dB)": round(result["psnr"], 3), "L1 [0,1]": round(result["l1"], 5)})
    epoch_usage = result.get("epoch_usage")
    streams = result.get("stream_counts", [result["counts"]])
    summary = [{"held-out images": result["n_images"], **head,
                "codes used (held-out)": " + ".join(f"{int((c > 0).sum())}/{len(c)}" for c in streams),
                "usage (held-out)": round(result["usage"], 4),
                "usage (last epoch)": (round(epoch_usage, 4) if isinstance(epoch_usage, numbers.Real)
                                       and math.isfinite(epoch_usage) else "n/a"),
                "perplexity": round(result["perplexity"], 1), "steps": result.get("step"),
                "skipped files": result.get("skipped_files", 0)}]
    model = describe_model(run_dir / "model" / "config.yaml")
    sections = [
        ("Summary", table(summary) + f"<p class=note>Model: {html.escape(model)}</p>"
                    f"<p class=note>Perceptual network: {html.escape(str(result.get('perceptual')))}</p>"),
        ("Held-out reconstructions", "<p class=note>Each input row is followed by its reconstruction.</p>"
                                     "<img src='report/reconstructions.png'>"),
        ("Losses", losses_html),
        ("Codebook", "<img src='report/usage.png'>" + _code_histograms(result, out)),
        ("Quality over training", "<img src='report/psnr.png'>" + table(
            [{k: r.get(k) for k in ("step", *quality, "l1", "usage", "codes_used", "perplexity")} for r in evals])),
    ]
    return write_report(run_dir / "report.html", title, sections)


def _read_yaml(path: Path) -> dict | None:
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None


def _run_config(run_dir: Path) -> dict:
    """A run's training config (its config.yaml), or {} when it cannot be read."""
    return _read_yaml(Path(run_dir) / "config.yaml") or {}


def describe_model(config_path: Path) -> str:
    """One line naming a saved tokenizer's architecture, quantizer and codes, from its config.yaml."""
    cfg = _read_yaml(config_path)
    return "(no model config)" if cfg is None else describe_config(cfg)


def describe_config(cfg: dict) -> str:
    """One line naming a tokenizer's architecture, quantizer(s) and codes, from its config (`config_dict()`)."""
    skip = {"kind", "legacy_beta", "remap_codes", "unknown_index"}

    def quantizer(q: dict) -> str:
        unread = {"embed_dim"} if q.get("kind") in ("fsq", "lfq") else set()  # their width: levels / bits
        settings = ", ".join(f"{k} {v}" for k, v in q.items()
                             if k not in skip | unread and v not in (0, False, None))
        return f"{q.get('kind', '?')} ({settings})"

    sections = [("quantizer", "quantizer")] if "quantizer" in cfg else [
        (key, key.replace("_", " ")) for key in ("top_quantizer", "bottom_quantizer") if key in cfg]
    quantizers = ", ".join(f"{label} {quantizer(cfg[key])}" for key, label in sections) or "quantizer ?"
    levels = cfg.get("codes", {}).get("levels", [])
    side = cfg.get("resolution", 0)
    grids = " + ".join(f"{side // lv['factor']}x{side // lv['factor']} x {len(lv['vocab'])}" for lv in levels
                       if lv.get("factor"))
    return (f"{cfg.get('kind', 'vqgan')} at {side} px: encoder {cfg.get('encoder', {}).get('kind', 'conv')}, "
            f"decoder {cfg.get('decoder', {}).get('kind', 'conv')}, {quantizers}; "
            f"tokens per image: {grids or '?'} (grid x codes per position)")


def prior_report(run_dir: Path, result: dict, title: str = "Transformer prior") -> Path:
    """report.html + PNGs for a stage-2 run: the loss curves, the last samples and what was trained."""
    import shutil

    from ..train.common import read_metrics

    run_dir = Path(run_dir)
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = read_metrics(run_dir / "logs" / "metrics.jsonl")
    curves = {"training batches": ([r["step"] for r in rows if r.get("kind") == "train" and "loss" in r],
                                   [r["loss"] for r in rows if r.get("kind") == "train" and "loss" in r]),
              "held out": ([r["step"] for r in rows if r.get("kind") == "eval" and "nll" in r],
                           [r["nll"] for r in rows if r.get("kind") == "eval" and "nll" in r])}
    line_plot(curves, "negative log-likelihood", ylabel="nats per token").save(out / "nll.png")
    cfg = _run_config(run_dir)
    data, train = cfg.get("data", {}), cfg.get("train", {})
    saved = _read_yaml(run_dir / "model" / "config.yaml") or {}
    conditioning = (saved.get("conditioning") or {}).get("kind", data.get("conditioning"))  # auto, resolved
    summary = [{"held-out NLL (nats/token)": round(result["nll"], 4), "steps": train.get("steps"),
                "batch": train.get("batch_size"), "conditioning": conditioning,
                "window": data.get("window") or "whole grid", "token store": data.get("tokens")}]
    model = cfg.get("model", {})
    arch = ", ".join(f"{k} {v}" for k, v in model.items() if not isinstance(v, dict))
    samples = ("<p class=note>No samples: the tokenizer the store records is missing or changed since.</p>")
    if result.get("samples"):
        shutil.copyfile(result["samples"], out / "samples.png")
        samples = ("<p class=note>At the last step; a row per class (class priors), or condition maps, samples on "
                   "them and the real images (map priors).</p><img src='report/samples.png'>")
    sections = [("Summary", table(summary) + f"<p class=note>Transformer: {html.escape(arch)}</p>"),
                ("Samples", samples),
                ("Loss", "<img src='report/nll.png'>")]
    return write_report(run_dir / "report.html", title, sections)
