#!/usr/bin/env python
"""The quantizer family side by side: each kind's `small-cpu` preset (equal ~10 bits per position) trained for
the same steps at the same batch on the same folder, one process per kind (clean timings), held-out = the last
64 files by name. Prints a markdown table: held-out PSNR, codebook usage (distinct codes in the held-out
tokens / vocabulary, per depth where a position holds several codes), perplexity, bits per position, seconds
per training step. Then `vqgan compare` of the runs on those held-out images: OUT/compare.html (the table, the
same images reconstructed by each kind, the training curves on shared axes, per-image PSNR histograms).

Usage is measured on held-out images, where it means something. The training log's `usage_window` counts the
codes that won on *training* batches in the last `restart_after` steps, codes kept alive by restarts onto
single encoder outputs included, so it overstates what the data uses; it is shown for comparison only.

    python bench/quality_family.py DATA_DIR [--kinds vq,ema,...] [--steps 300] [--batch 8] [--out runs/family]
    python bench/quality_family.py DATA_DIR --kinds vq,vit,vqvae,dvae,vqvae2 --minutes 5   # equal wall-clock
    python bench/quality_family.py DATA_DIR --kinds vqvae,vqvae2 --seeds 3   # + mean +- sd over seeds 0, 1, 2
    python bench/quality_family.py DATA_DIR --kinds dvae --variant "lr4:train.base_learning_rate=4e-4" \
        --variant "wide:model.encoder.hidden_channels=128;model.decoder.hidden_channels=128" --parallel 12
        # recipes side by side (KEY=VALUE;...), 12 runs at once on a GPU machine (one CPU core each: --threads 1)
    python bench/make_photo_crops.py /tmp/photos; python bench/make_emoji_dataset.py /tmp/emoji   # the data

Each run's output goes to OUT/NAME.log; the table is printed again as each run ends.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {"vq": "small-cpu-vq", "ema": "small-cpu-ema", "factorized": "small-cpu-factorized", "fsq": "small-cpu",
           "lfq": "small-cpu-lfq", "residual": "small-cpu-rq",
           # the architectures (each with its own quantizer; issue 15)
           "vit": "small-cpu-vit", "vqvae": "small-cpu-vqvae", "dvae": "small-cpu-dvae", "vqvae2": "small-cpu-vqvae2",
           # ... with the usage levers strong enough for 80% of the codes held out, at a PSNR cost
           "vit-spread": "small-cpu-vit-spread", "vqvae-spread": "small-cpu-vqvae-spread",
           # the ViT-VQGAN's networks with FSQ (entropy 0.15, decorrelated channels) in place of its codes
           "vit-fsq": "small-cpu-vit-fsq"}


def run_one(kind: str, data: str, steps: int, batch: int, out: Path, holdout: int, overrides: list[str] = (),
            threads: int = 2) -> dict:
    """Train one preset in this process; returns the held-out evaluation and timing."""
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from vqgan.config import TokenizerTrainConfig, load_config
    from vqgan.eval.report import tokenizer_report
    from vqgan.presets import resolve_config_path
    from vqgan.train.stage1 import train_tokenizer

    torch.set_num_threads(threads)
    cfg = load_config(TokenizerTrainConfig, resolve_config_path(PRESETS[kind]), [
        f"data.path={data}", f"data.holdout={holdout}", f"train.steps={steps}", f"train.batch_size={batch}",
        f"train.out_dir={out}", f"train.eval_every={steps}", f"train.ckpt_every={steps}",
        f"train.image_every={steps}", *overrides])
    t0 = time.perf_counter()
    result = train_tokenizer(cfg, progress=False)
    seconds = time.perf_counter() - t0
    tokenizer_report(out, result, title=f"quantizer family: {kind}")
    spec = cfg.model.code_spec
    side = cfg.model.resolution
    positions = [(side // level.factor) ** 2 for level in spec.levels]
    bits_per_image = sum(n * sum(math.log2(v) for v in level.vocab) for n, level in zip(positions, spec.levels))
    bits = bits_per_image / positions[0] if len(positions) == 1 else float("nan")
    speed = _throughput(out / "model", data, holdout, side)
    logs = _train_logs(out)
    rates = [r["it_per_s"] for r in logs[1:] if r.get("it_per_s")]  # the first window includes start-up
    per_step = sum(1 / r for r in rates) / len(rates) if rates else seconds / steps
    keep = ("psnr", "usage", "perplexity", "codes_used", "n_embed", "usage_per_stream", "perplexity_per_stream")
    recipe = [o for o in overrides if not o.startswith("train.max_minutes=")]  # the budget is in the title
    return {"kind": kind + "".join(f" {o}" for o in recipe), **{k: result[k] for k in keep if k in result}, "bits_per_position": bits,
            "depth": spec.levels[0].depth, "seconds_per_step": per_step, "seconds_total": seconds,
            "steps": result.get("step"), "tokens_per_image": sum(n * level.depth for n, level in zip(positions, spec.levels)),
            "bits_per_image": bits_per_image, **speed,
            "usage_window": logs[-1].get("usage_window") if logs else None}


def _throughput(model_dir: Path, data: str, holdout: int, side: int, batch: int = 16) -> dict:
    """Distinct codes per flat image (eval.usage.flat_image_codes), parameters, encode and decode images/s (batch
    16, the held-out images, after a warm-up batch) and the process's peak RSS (training included)."""
    import resource

    from vqgan.checkpoint import load_model
    from vqgan.data.images import ImageDataset, scan_images
    from vqgan.eval.usage import flat_image_codes

    model = load_model(model_dir).eval()
    paths = sorted(scan_images(data)[0])[-holdout:][:batch]
    x = ImageDataset.from_paths(paths, resolution=side, train=False).batch()
    model.decode(model.encode(x))  # warm-up
    t0 = time.perf_counter()
    tokens = model.encode(x)
    t1 = time.perf_counter()
    model.decode(tokens)
    t2 = time.perf_counter()
    return {"flat_image_codes": flat_image_codes(model)[0],
            "parameters": sum(p.numel() for p in model.parameters()), "encode_images_per_s": len(x) / (t1 - t0),
            "decode_images_per_s": len(x) / (t2 - t1),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _train_logs(out: Path) -> list[dict]:
    log = out / "logs" / "metrics.jsonl"
    if not log.is_file():
        return []
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("kind") == "train"]


def table(rows: list[dict], data: str, budget: str, batch: int) -> str:
    lines = [f"{budget}, batch {batch}, held-out = last 64 files of {data}", "",
             "| kind | held-out PSNR (dB) | usage (held-out) | perplexity | codes per flat image | bits/position | "
             "tokens/image | params (M) | steps | s/step | encode img/s | decode img/s | peak RSS (MB) | "
             "usage_window (train) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        usage = f"{r['usage']:.1%}"
        if r.get("usage_per_stream"):
            usage += " (" + " / ".join(f"{u:.0%}" for u in r["usage_per_stream"]) + ")"
        window = "-" if r.get("usage_window") is None else f"{r['usage_window']:.0%}"
        extra = " | ".join("-" if r.get(k) is None else fmt.format(r[k] / div) for k, fmt, div in [
            ("tokens_per_image", "{:.0f}", 1), ("parameters", "{:.1f}", 1e6), ("steps", "{:.0f}", 1)])
        speed = " | ".join("-" if r.get(k) is None else f"{r[k]:.0f}" for k in
                           ("encode_images_per_s", "decode_images_per_s", "peak_rss_mb"))
        bits = "-" if math.isnan(r["bits_per_position"]) else f"{r['bits_per_position']:.2f}"
        flat = "-" if r.get("flat_image_codes") is None else f"{r['flat_image_codes']:.1f}"
        lines.append(f"| {r['kind']} | {r['psnr']:.2f} | {usage} | {r['perplexity']:.1f} | {flat} | {bits} | {extra} | "
                     f"{r['seconds_per_step']:.2f} | {speed} | {window} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data")
    ap.add_argument("--kinds", default=",".join(PRESETS))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--minutes", type=float, default=0.0,
                    help="equal wall-clock instead of equal steps: train each kind this long (train.max_minutes)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads (1 when the machine is shared: two threads waiting on a busy core crawl)")
    ap.add_argument("--holdout", type=int, default=64)
    ap.add_argument("--out", default="runs/family")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every kind (recipe experiments), e.g. model.quantizer.entropy_weight=0.1")
    ap.add_argument("--seeds", type=int, default=1,
                    help="train each kind with seeds 0..N-1 and add mean +- sd: single short runs differ by ~1 dB")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE;...",
                    help="also train each kind with these overrides, as KIND-NAME (repeatable)")
    ap.add_argument("--parallel", type=int, default=1,
                    help="runs at once (a GPU machine with many cores; on a small CPU, 1 keeps the timings clean)")
    ap.add_argument("--no-compare", action="store_true", help="skip compare.html (many runs)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: train this kind
    ap.add_argument("--name", default=None, help=argparse.SUPPRESS)  # ... into OUT/NAME
    args = ap.parse_args()
    out = Path(args.out)
    if args.minutes:  # the schedules (warm-up, restarts) then run over 100,000 steps, as in a long run
        args.set = [f"train.max_minutes={args.minutes}", *args.set]
        args.steps = 100_000
    budget = f"{args.minutes:g} minutes of training" if args.minutes else f"{args.steps} steps"
    budget += f", {args.threads} thread{'s' if args.threads > 1 else ''}"
    if args.one:
        name = args.name or args.one
        result = run_one(args.one, args.data, args.steps, args.batch, out / name, args.holdout, args.set,
                         args.threads)
        (out / f"{name}.json").write_text(json.dumps(result, indent=1))
        return 0
    variants = [("", [])]
    for spec in args.variant:
        label, _, overrides = spec.partition(":")
        if not label or not overrides or "=" not in overrides:
            print(f"--variant {spec!r}: expected NAME:KEY=VALUE[;KEY=VALUE...]", file=sys.stderr)
            return 2
        variants.append((label, [o.strip() for o in overrides.split(";") if o.strip()]))
    jobs = []  # (name, command) in table order: kind, variant, seed
    for kind in args.kinds.split(","):
        if kind not in PRESETS:
            print(f"unknown kind {kind}; one of {', '.join(PRESETS)}", file=sys.stderr)
            return 2
        for label, overrides in variants:
            for seed in range(args.seeds):
                name = kind + (f"-{label}" if label else "") + ("" if args.seeds == 1 else f"-seed{seed}")
                seed_set = [] if args.seeds == 1 else [f"train.seed={seed}"]
                jobs.append((name, [sys.executable, __file__, args.data, "--one", kind, "--name", name, "--steps",
                                    str(args.steps), "--batch", str(args.batch), "--holdout", str(args.holdout),
                                    "--out", str(out), "--threads", str(args.threads),
                                    *(f"--set={o}" for o in [*args.set, *overrides, *seed_set])]))
    out.mkdir(parents=True, exist_ok=True)
    rows, names = _run_jobs(jobs, out, max(1, args.parallel), lambda rows: print(
        table(rows, args.data, budget, args.batch), flush=True))
    text = table(rows, args.data, budget, args.batch)
    if args.seeds > 1:
        text += "\n\n" + seed_table(rows)
        print(seed_table(rows), flush=True)
    (out / "table.md").write_text(text + "\n")
    if names and not args.no_compare:
        compare_runs(names, args.data, args.holdout, out)
    return 0 if len(rows) == len(jobs) else 1  # a failed run fails the whole


def _run_jobs(jobs: list[tuple[str, list[str]]], out: Path, parallel: int, show) -> tuple[list[dict], list[str]]:
    """Runs the child processes, `parallel` at once; returns the finished runs' rows and names in job order (a
    failed run is reported with its log's path and left out), calling show(rows) as runs finish."""
    pending, running, done = list(jobs), {}, {}
    while pending or running:
        while pending and len(running) < parallel:
            name, command = pending.pop(0)
            log = open(out / f"{name}.log", "w")
            running[name] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), log)
        time.sleep(0.5)
        for name, (proc, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            if proc.returncode:
                print(f"{name}: failed (exit {proc.returncode}), see {out / f'{name}.log'}", file=sys.stderr,
                      flush=True)
                continue
            done[name] = json.loads((out / f"{name}.json").read_text())
            show([done[n] for n, _ in jobs if n in done])
    names = [n for n, _ in jobs if n in done]
    return [done[n] for n in names], names


def mean_sd_cells(runs: list[dict]) -> tuple[str, str]:
    """The PSNR and usage cells of runs of one recipe over seeds: mean +- sample standard deviation."""
    import statistics

    psnr = [r["psnr"] for r in runs]
    usage = [100 * r["usage"] for r in runs]
    return (f"{statistics.mean(psnr):.2f} +- {statistics.stdev(psnr):.2f}",
            f"{statistics.mean(usage):.1f}% +- {statistics.stdev(usage):.1f}")


def seed_table(rows: list[dict]) -> str:
    """Mean +- sample standard deviation over each recipe's seeds (a recipe with one finished run: its values)."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(re.sub(r" train.seed=[0-9]+", "", row["kind"]), []).append(row)
    lines = ["| kind | seeds | held-out PSNR (dB) | usage (held-out) |", "|---|---|---|---|"]
    for recipe, group in groups.items():
        psnr, usage = mean_sd_cells(group) if len(group) > 1 else (f"{group[0]['psnr']:.2f}", f"{group[0]['usage']:.1%}")
        lines.append(f"| {recipe} | {len(group)} | {psnr} | {usage} |")
    return "\n".join(lines)


def compare_runs(kinds: list[str], data: str, holdout: int, out: Path) -> None:
    """OUT/compare.html (`vqgan compare`) of the runs just trained, on their held-out images (the last `holdout`
    files by name, linked into OUT/holdout so the comparison reads exactly those)."""
    sys.path.insert(0, str(ROOT / "src"))
    from vqgan.data.images import scan_images
    from vqgan.eval.compare import CompareOptions, compare

    folder = out / "holdout"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    for i, path in enumerate(sorted(scan_images(data)[0])[-holdout:]):  # the index keeps the name order
        (folder / f"{i:05d}_{path.name}").symlink_to(path.resolve())
    compare([str(out / kind) for kind in kinds], str(folder), str(out), CompareOptions(names=kinds, progress=False))
    print(f"comparison: {(out / 'compare.html').resolve()}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
