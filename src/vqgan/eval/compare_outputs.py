"""What `vqgan compare` writes into its --out folder: compare.html (the table with the best values in bold, the
same images reconstructed by every model, the training curves of the runs, the per-image PSNR histograms, the
protocol), summary.json (the table's rows, the best per column, the protocol), comparison.csv (a row per
model), the pictures under compare/, and each model's own `vqgan eval` outputs under eval/NAME/."""
from __future__ import annotations

import csv
import html
import json
from pathlib import Path

import torch

from ..checkpoint import replace_files
from ..losses.lpips import BACKBONES
from .plots import histogram_plot, line_plot
from .protocol import to_signed
from .reconstruction import Evaluation, reconstruct, write_evaluation
from .report import labelled_grid, table, write_report
from .weights import NOT_COMPUTED

# row key -> the table's heading
COLUMNS = {"name": "name", "model": "model", "parameters": "params (M)", "tokens_per_image": "tokens / image",
           "bits_per_image": "bits / image", "psnr": "PSNR (dB)", "ssim": "SSIM", "ms_ssim": "MS-SSIM",
           "lpips": "LPIPS", "rfid": "rFID", "codes": "codes per stream", "usage": "usage", "perplexity": "perplexity",
           "encode_images_per_s": "encode img/s", "decode_images_per_s": "decode img/s"}
CSV_COLUMNS = (*COLUMNS, "description", "path", "fingerprint", "run", "step")
# the training curves (`compare.CURVES`): name -> (title, log scale, y label)
CURVE_CHARTS = {"psnr": ("held-out PSNR", False, "PSNR (dB)"),
                "total_loss": ("generator total loss (training batches)", True, "loss"),
                "rec_loss": ("generator reconstruction loss (training batches)", True, "loss"),
                "usage": ("held-out codebook usage", False, "fraction of codes used")}


def spaced(indices: list[int], k: int) -> list[int]:
    """k of `indices` evenly spaced from the first to the last (all of them when there are k or fewer)."""
    if k >= len(indices):
        return list(indices)
    if k == 1:
        return [indices[len(indices) // 2]]
    return [indices[round(i * (len(indices) - 1) / (k - 1))] for i in range(k)]


def write_comparison(out_dir: Path, models: dict[str, torch.nn.Module], evals: list[Evaluation], summary: dict,
                     show: int, dev: torch.device) -> None:
    """Everything into `out_dir` at once (`replace_files`); `models` by name, in the order of `evals`."""
    with replace_files(out_dir) as tmp:
        for name, ev in zip(models, evals):
            write_evaluation(tmp / "eval" / name, ev, show, dev)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        _write_csv(tmp / "comparison.csv", summary["models"])
        pictures = tmp / "compare"
        pictures.mkdir()
        sections = [_metrics_section(summary), _models_section(summary),
                    _images_section(pictures, models, evals, show, dev), _curves_section(pictures, summary),
                    _histogram_section(pictures, list(models), evals),
                    ("Protocol", table([{"step": k, "how": v} for k, v in summary["protocol"].items()]))]
        write_report(tmp / "compare.html", "Tokenizers side by side", sections)


def _short(v):
    return NOT_COMPUTED if isinstance(v, str) and v.startswith(NOT_COMPUTED) else v


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        w.writerows([("" if r[k] is None else f"{r[k]:.6f}" if isinstance(r[k], float) else _short(r[k]))
                     for k in CSV_COLUMNS] for r in rows)


def _metrics_section(summary: dict) -> tuple[str, str]:
    rows, data = summary["models"], summary["data"]
    shown, reasons = [], {}
    for r in rows:
        cells = {}
        for key, head in COLUMNS.items():
            v = r[key]
            if _short(v) != v:
                reasons.setdefault(head, v)
            cells[head] = (v / 1e6 if key == "parameters" else round(v) if key.endswith("images_per_s")
                           else _short(v))
        shown.append(cells)
    bold = {(i, COLUMNS[k]) for k, names in summary["best"].items() for i, r in enumerate(rows) if r["name"] in names}
    notes = "".join(f"<li>{html.escape(k)}: {html.escape(v)}</li>" for k, v in reasons.items())
    return ("Metrics on the same images", (
        f"<p class=note>{data['images']} images of {html.escape(data['folder'])} ({data['skipped']} unreadable, "
        f"skipped) at {summary['protocol']['resolution']} px, the protocol of <code>vqgan eval</code> (below); "
        f"LPIPS on {BACKBONES[summary['protocol']['lpips_net']].title}. The "
        "best value of each ranked column is in bold (higher is better except LPIPS and rFID; usage and "
        "perplexity only between models of the same codes); encode and decode "
        "images/s were measured during the evaluation, one model after another on the same device, each with its "
        "first batch (one-time costs) included.</p>"
        + table(shown, bold=bold) + (f"<ul class=note>{notes}</ul>" if notes else "")))


def _models_section(summary: dict) -> tuple[str, str]:
    items = []
    for r in summary["models"]:
        name = html.escape(r["name"])
        trained = ("not a training run (no curves)" if r["run"] is None else f"trained by {html.escape(r['run'])}"
                   + (f" (its checkpoint at step {r['step']})" if r["step"] is not None else ""))
        items.append(f"<li><b>{name}</b>: {html.escape(r['description'])}<br><span class=note>"
                     f"{html.escape(r['path'])}, fingerprint {r['fingerprint']}; {trained}; "
                     f"<a href='eval/{name}/report.html'>its own evaluation</a></span></li>")
    return "Models", f"<ul>{''.join(items)}</ul>"


@torch.no_grad()
def _images_section(folder: Path, models: dict[str, torch.nn.Module], evals: list[Evaluation], k: int,
                    dev: torch.device) -> tuple[str, str]:
    """The same k images (evenly spaced in name order) and each model's reconstructions: one labelled grid."""
    ds, names = evals[0].images, evals[0].names
    chosen = spaced([r["index"] for r in evals[0].measures.rows], k)
    if not chosen:
        return "Reconstructions", "<p class=note>--show 0: no images shown.</p>"
    x = torch.stack([ds.read(i) for i in chosen]).to(dev)
    rows = [to_signed(x.cpu())] + [to_signed(reconstruct(model, x)[0].cpu()) for model in models.values()]
    labelled_grid(["inputs", *models], rows, scale=max(1, 128 // ds.resolution)).save(
        folder / "grid.png")
    psnr = []
    for name, ev in zip(models, evals):
        by_index = {r["index"]: r["psnr"] for r in ev.measures.rows}
        psnr.append({"model": name, **{f"#{j + 1}": by_index[i] for j, i in enumerate(chosen)}})
    listing = "".join(f"<li>{html.escape(names[i])}</li>" for i in chosen)
    return (f"The same {len(chosen)} images reconstructed by each model", (
        "<p class=note>Inputs on the first row, then a row per model; the images are evenly spaced in name order. "
        "Their PSNR (dB), left to right:</p>" + table(psnr) + "<img src='compare/grid.png'>"
        f"<ol class=note>{listing}</ol>"))


def _curves_section(folder: Path, summary: dict) -> tuple[str, str]:
    data = summary["curves"]
    if not data:
        return "Training curves", ("<p class=note>None of the models is a training run (a run folder with "
                                   "logs/metrics.jsonl, its model/ folder or one of its checkpoints): no curves.</p>")
    body = ""
    for name, (title, log_y, ylabel) in CURVE_CHARTS.items():
        if name in data:
            line_plot(data[name], title, size=(760, 360), log_y=log_y, ylabel=ylabel).save(folder / f"{name}.png")
            body += f"<img src='compare/{name}.png'>"
    others = [r["name"] for r in summary["models"] if r["run"] is None]
    note = ("From each run's logs/metrics.jsonl, on shared axes; a checkpoint's curves stop at its step. Losses are "
            "on training batches (log scale); PSNR and usage on the run's own held-out images, not the images above."
            + (f" Not training runs (no curves): {', '.join(others)}." if others else ""))
    return "Training curves", f"<p class=note>{html.escape(note)}</p>{body}"


def _histogram_section(folder: Path, names: list[str], evals: list[Evaluation]) -> tuple[str, str]:
    n = len(evals[0].measures.rows)
    histogram_plot({name: [r["psnr"] for r in ev.measures.rows] for name, ev in zip(names, evals)},
                   f"per-image PSNR ({n} images, each model)", "PSNR (dB)", size=(760, 340)).save(
        folder / "psnr_histogram.png")
    return "Per-image PSNR", "<img src='compare/psnr_histogram.png'>"
