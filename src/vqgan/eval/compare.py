"""`vqgan compare MODEL... --data DIR --out DIR`: several tokenizers measured on the same images, side by side.

Each model goes through the pieces of `vqgan eval` (`reconstruction.py`): the same protocol images, the same
measuring networks, the same per-image metrics, so its numbers are those `vqgan eval` gives it alone (the
inputs' Inception statistics, the same for every model, are computed once). Under torchrun each model's set is
sharded as in `vqgan eval`; process 0 writes. The comparison adds a table with the best value per column
marked, the same images reconstructed by every model, the training curves of the models that are runs, and the
per-image PSNR histograms (`compare_outputs.py`).

Models trained at different resolutions are refused unless `--resolution` names one size for all: "the same
images" must be the same pixels, and PSNR at 32 px and at 256 px are not numbers on one scale.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.tokens import check_output_dir, load_tokenizer
from ..errors import UserError
from ..train.common import cleanup_runtime, read_metrics, setup_runtime
from ..userinput import at_least
from .compare_outputs import write_comparison
from .reconstruction import (
    EvalOptions,
    Evaluation,
    check_model,
    check_options,
    eval_device,
    evaluate_model,
    load_networks,
    protocol_images,
)
from .report import describe_config

METRICS_LOG = Path("logs") / "metrics.jsonl"

# column -> the better direction (max or min); the other columns describe a model and are not ranked
BEST = {"psnr": max, "ssim": max, "ms_ssim": max, "lpips": min, "rfid": min, "usage": max, "perplexity": max,
        "encode_images_per_s": max, "decode_images_per_s": max}

# the training curves (drawn by `compare_outputs.CURVE_CHARTS`): name -> (log rows of kind, the first key present)
CURVES = {"psnr": ("eval", ("psnr",)), "total_loss": ("train", ("total",)), "rec_loss": ("train", ("rec", "l1")),
          "usage": ("eval", ("usage",))}


@dataclass
class CompareOptions(EvalOptions):
    names: list[str] | None = None  # labels, one per model (default: from the folder names)
    max_images: int | None = None  # the first N images by name (default: all)


@dataclass
class Entry:
    """One model of the comparison: its label, the path it was given as, and the run that trained it."""

    name: str
    path: str
    model: torch.nn.Module
    run: Path | None  # the training run whose logs hold its curves (None: not a run)
    step: int | None  # a checkpoint's step: its curves stop there


def training_run(path: str) -> tuple[Path | None, int | None]:
    """(the run folder whose logs/metrics.jsonl hold a model's curves, the step a checkpoint stops them at) for a
    run folder, its model/ folder or one of its checkpoints/step_N folders; (None, None) for anything else."""
    p = Path(path).expanduser()
    step = None
    if p.parent.name == "checkpoints" and p.name.startswith("step_") and p.name[5:].isdigit():
        run, step = p.parent.parent, int(p.name[5:])
    elif p.name == "model":
        run = p.parent
    else:
        run = p
    return (run, step) if (run / METRICS_LOG).is_file() else (None, None)


def default_name(path: str) -> str:
    """A run's folder name (for its model/ folder too), `run-step_N` for a checkpoint, else the file's stem."""
    p = Path(path).expanduser().resolve()
    if p.name == "model":
        return p.parent.name
    if p.parent.name == "checkpoints":
        return f"{p.parent.parent.name}-{p.name}"
    return p.stem if p.suffix in (".ckpt", ".pt", ".pth") else p.name


def model_names(paths: list[str], names: list[str] | None) -> list[str]:
    """One distinct label per model; labels also name the folders of each model's own evaluation."""
    if names is None:
        labels, seen = [], {}
        for path in paths:
            base = default_name(path) or "model"
            seen[base] = seen.get(base, 0) + 1
            labels.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
        return labels
    if len(names) != len(paths):
        raise UserError(f"--names gives {len(names)} labels for {len(paths)} models; give one per model, in order")
    bad = [n for n in names if not n or n.startswith(".") or "/" in n or "\\" in n]
    if bad:
        raise UserError(f"--names: label {bad[0]!r} cannot name a folder; use letters, digits, - and _")
    if len(set(names)) != len(names):
        raise UserError("--names: the labels repeat; give each model its own")
    return names


def common_resolution(entries: list[Entry], resolution: int | None) -> int:
    if resolution:
        return resolution
    sizes = {e.name: e.model.config.resolution for e in entries}
    if len(set(sizes.values())) > 1:
        listing = ", ".join(f"{n} {r} px" for n, r in sizes.items())
        raise UserError(f"the models were trained at different resolutions ({listing}); compare them on the same "
                        "pixels with --resolution N (a multiple of every model's grid factor)")
    return next(iter(sizes.values()))


@torch.no_grad()
def compare(models: list[str], data: str, out: str, opts: CompareOptions | None = None) -> dict:
    """Evaluate every model on the images under `data`; write compare.html, summary.json, comparison.csv and
    each model's own evaluation (eval/NAME/) to `out` (process 0); the summary (every process)."""
    opts = opts or CompareOptions()
    check_options(opts)
    if not models:
        raise UserError("give at least one model to compare")
    if opts.max_images is not None:
        at_least(opts.max_images, 1, "--max-images")
    names = model_names(models, opts.names)
    out_dir = check_output_dir(out, "--out")
    rt = setup_runtime()
    try:
        dev = eval_device(rt, opts.device)
        entries = [Entry(n, p, load_tokenizer(p, dev, "model"), *training_run(p)) for n, p in zip(names, models)]
        res = common_resolution(entries, opts.resolution)
        for e in entries:  # every refusal before the first model's work
            check_model(e.model, e.path, res)
        ds, unreadable = protocol_images(data, res, opts, opts.max_images, rt.is_main)
        nets = load_networks(opts, dev, res, rt.is_main)
        evals, inputs_stats = [], None
        for e in entries:
            if opts.progress and rt.is_main:
                print(f"compare: {e.name} ({e.path})", file=sys.stderr, flush=True)
            evals.append(evaluate_model(e.model, e.path, ds, data, unreadable, opts, rt, dev, nets, inputs_stats))
            inputs_stats = evals[0].measures.real  # the same inputs for every model: through Inception once
        summary = comparison_summary(entries, evals)
        if rt.is_main:
            write_comparison(out_dir, {e.name: e.model for e in entries}, evals, summary, opts.show, dev)
        return summary
    finally:
        cleanup_runtime(rt)


def model_row(e: Entry, ev: Evaluation) -> dict:
    """The table's row of one model: what it is, its cost in tokens and time, and its metrics."""
    m, tok = ev.summary["metrics"], ev.summary["tokenizer"]
    code, speed = m["codebook"], m["speed"]
    parts = [tok.get(f"{p}_kind") for p in ("encoder", "quantizer", "decoder")]
    return {"name": e.name, "model": f"{tok['kind']} ({', '.join(p for p in parts if p)})",
            "parameters": sum(p.numel() for p in e.model.parameters()),
            "tokens_per_image": code["tokens_per_image"], "bits_per_image": code["bits_per_image"],
            **{k: m[k] for k in ("psnr", "ssim", "ms_ssim", "lpips", "rfid")},
            "codes": " + ".join(map(str, e.model.code_spec.streams)), "usage": code["usage"],
            "perplexity": code["perplexity"],
            "encode_images_per_s": speed["encode_images_per_s"], "decode_images_per_s": speed["decode_images_per_s"],
            "description": describe_config(e.model.config_dict()), "path": tok["path"],
            "fingerprint": tok["fingerprint"], "run": str(e.run.resolve()) if e.run else None, "step": e.step}


# ranked only between models of the same vocabularies: 84% of 2 x 32 codes is not more than 53% of 1,000
PER_VOCABULARY = ("usage", "perplexity")


def best_values(rows: list[dict]) -> dict[str, list[str]]:
    """{column: the names of the models with its best value}, for the ranked columns that two or more models
    have a number in (codebook usage and perplexity only where their vocabularies agree)."""
    best = {}
    for key, pick in BEST.items():
        if key in PER_VOCABULARY and len({r.get("codes") for r in rows}) > 1:
            continue
        numbers = [(r[key], r["name"]) for r in rows if isinstance(r[key], (int, float))]
        if len(numbers) > 1:
            top = pick(v for v, _ in numbers)
            best[key] = [n for v, n in numbers if v == top]
    return best


def comparison_summary(entries: list[Entry], evals: list[Evaluation]) -> dict:
    first = evals[0].summary
    rows = [model_row(e, ev) for e, ev in zip(entries, evals)]
    return {"protocol": first["protocol"], "data": first["data"], "weights": first["weights"], "models": rows,
            "best": best_values(rows), "evaluations": {e.name: f"eval/{e.name}/summary.json" for e in entries},
            "curves": curves(entries)}


def curves(entries: list[Entry]) -> dict[str, dict[str, tuple[list, list]]]:
    """{curve name: {model name: (steps, values)}} from the training logs of the models that are runs (a
    checkpoint's curves stop at its step); curves no run logged are left out."""
    logs = {e.name: [r for r in read_metrics(e.run / METRICS_LOG) if e.step is None or r.get("step", 0) <= e.step]
            for e in entries if e.run is not None}
    out = {}
    for name, (kind, keys) in CURVES.items():
        series = {}
        for model, rows in logs.items():
            rows = [r for r in rows if r.get("kind") == kind]
            key = next((k for k in keys if any(k in r for r in rows)), None)
            if key is not None:
                series[model] = ([r["step"] for r in rows if key in r], [r[key] for r in rows if key in r])
        if series:
            out[name] = series
    return out
