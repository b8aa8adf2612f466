#!/usr/bin/env python
"""Stage-1 benchmark: our VQGAN tokenizer against the reference taming-transformers, same config, same run.

For each config (the small CPU config at 64 px, the paper's f16 config at 256 px) it measures
- training iterations/s: one full iteration, autoencoder step + discriminator step, GAN active from step 0,
  LPIPS active (on a randomly initialised VGG16 on both sides: no ImageNet weights can be had offline);
- encode and decode images/s (eval mode, no_grad);
- peak memory (max RSS) of the process that ran each benchmark (each in a fresh process);
and the same figures for the reference, timed by ../shared/reference/taming_bench.py in its own
environment (REF_PYTHON, default /tmp/ref-venv/bin/python; see that folder's README for its setup).

Our side runs in OUR_PYTHON (default .venv-bench/bin/python, made by `make bench`: the same CPU build of
torch as the reference's environment, so that speed and memory compare like with like; the CUDA build in
.venv alone costs ~290 MiB more resident memory at import). This machine's speed drifts by tens of percent
over minutes, so the two sides alternate for --rounds rounds and each reports its best round's median.

    python bench/bench_stage1.py [--configs small,f16] [--rounds 3] [--quick] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REF_DIR = Path(os.environ.get("TAMING_BENCH_DIR", ROOT.parent / "shared" / "reference"))
REF_PYTHON = os.environ.get("REF_PYTHON", "/tmp/ref-venv/bin/python")
OUR_PYTHON = os.environ.get("OUR_PYTHON", str(ROOT / ".venv-bench" / "bin" / "python"))

# the reference harness's config schema ({"vq": {...}}); both sides are built from the same dict
CONFIGS = {
    "small": {"vq": {"embed_dim": 64, "n_embed": 1024,
                     "ddconfig": {"double_z": False, "z_channels": 64, "resolution": 64, "in_channels": 3, "out_ch": 3,
                                  "ch": 64, "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [16],
                                  "dropout": 0.0},
                     "loss": {"disc_start": 0, "disc_weight": 0.8, "codebook_weight": 1.0, "perceptual_weight": 1.0,
                              "disc_num_layers": 3}},
              "batch": {"train": 8, "codec": 16}, "iters": {"train": 10, "codec": 20}},
    "f16": {"vq": {"embed_dim": 256, "n_embed": 1024,
                   "ddconfig": {"double_z": False, "z_channels": 256, "resolution": 256, "in_channels": 3, "out_ch": 3,
                                "ch": 128, "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "attn_resolutions": [16],
                                "dropout": 0.0},
                   "loss": {"disc_start": 0, "disc_weight": 0.8, "codebook_weight": 1.0, "perceptual_weight": 1.0,
                            "disc_num_layers": 3}},
            "batch": {"train": 2, "codec": 4}, "iters": {"train": 3, "codec": 4}},
}


def our_config(vq: dict, batch: int):
    from vqgan.config import TokenizerTrainConfig, load_config

    dd = vq["ddconfig"]
    loss = vq["loss"]
    return load_config(TokenizerTrainConfig, {
        "model": {k: dd[k] for k in ("resolution", "in_channels", "out_ch", "ch", "ch_mult", "num_res_blocks",
                                     "attn_resolutions", "dropout", "z_channels")}
        | {"quantizer": {"n_embed": vq["n_embed"], "embed_dim": vq["embed_dim"]}},
        "loss": {"disc_start": loss["disc_start"], "disc_train_start": loss["disc_start"],
                 "disc_weight": loss["disc_weight"], "codebook_weight": loss["codebook_weight"],
                 "perceptual_weight": loss["perceptual_weight"], "disc_layers": loss["disc_num_layers"],
                 "allow_random_perceptual": True},
        "data": {"path": "builtin:scenes", "builtin_count": max(64, 2 * batch), "holdout": 8, "num_workers": 0},
        "train": {"out_dir": tempfile.mkdtemp(prefix="vqgan-bench-"), "batch_size": batch, "steps": 1000},
    })


def smooth_images(n: int, res: int, seed: int):
    """The reference harness's inputs: 8x8 uniform noise, bilinearly upsampled, in [-1, 1]."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g) * 2 - 1
    return F.interpolate(low, size=(res, res), mode="bilinear", align_corners=False).clamp(-1, 1)


def child(kind: str, name: str, warmup: int, iters: int) -> dict:
    """One benchmark in this (fresh) process; prints JSON."""
    import torch

    from vqgan.native.malloc import keep_freed_memory

    keep_freed_memory()  # as the vqgan command does at start
    torch.set_num_threads(os.cpu_count() or 1)
    spec = CONFIGS[name]
    batch = spec["batch"]["train" if kind == "train" else "codec"]
    cfg = our_config(spec["vq"], batch)
    times: dict[str, list[float]] = {}
    if kind == "train":
        from vqgan.train.stage1 import TokenizerTrainer

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = TokenizerTrainer(cfg, progress=False)
        trainer._initialize_codebook()
        trainer.model.train()
        x = smooth_images(batch, cfg.model.resolution, 0)
        batch_dict = {"image": x, "skipped": torch.zeros(batch, dtype=torch.long)}
        for i in range(warmup + iters):
            t0 = time.perf_counter()
            trainer.train_step([batch_dict])
            trainer.step += 1
            if i >= warmup:
                times.setdefault("iter", []).append(time.perf_counter() - t0)
    else:
        from vqgan.tokenizers import VQModel

        torch.manual_seed(0)
        model = VQModel(cfg.model).eval()
        x = smooth_images(batch, cfg.model.resolution, 0)
        with torch.no_grad():
            for i in range(warmup + iters):
                t0 = time.perf_counter()
                tokens = model.encode(x)
                t1 = time.perf_counter()
                model.decode(tokens)
                t2 = time.perf_counter()
                if i >= warmup:
                    times.setdefault("encode", []).append(t1 - t0)
                    times.setdefault("decode", []).append(t2 - t1)
    out = {k: statistics.median(v) for k, v in times.items()}
    out["all"] = {k: [round(t, 4) for t in v] for k, v in times.items()}
    out["batch"] = batch
    out["torch"] = torch.__version__
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return out


def run_ours(kind: str, name: str, warmup: int, iters: int) -> dict:
    python = OUR_PYTHON if Path(OUR_PYTHON).is_file() else sys.executable
    cmd = [python, __file__, "--child", kind, "--configs", name, "--warmup", str(warmup), "--iters",
           str(iters)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_reference(kind: str, name: str, warmup: int, iters: int) -> dict:
    script = REF_DIR / "taming_bench.py"
    if not Path(REF_PYTHON).is_file() or not script.is_file():
        return {"error": f"reference not set up ({REF_PYTHON}, {script})"}
    spec = CONFIGS[name]
    batch = spec["batch"]["train" if kind == "train" else "codec"]
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path, out_path = Path(tmp) / "cfg.json", Path(tmp) / "out.json"
        cfg_path.write_text(json.dumps({"vq": spec["vq"]}))
        cmd = [REF_PYTHON, str(script), kind, "--config", str(cfg_path), "--batch", str(batch), "--iters", str(iters),
               "--warmup", str(warmup), "--json", str(out_path)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode or not out_path.is_file():
            return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
        r = json.loads(out_path.read_text())["results"][kind]
    if "error" in r:
        return r
    if kind == "train":
        return {"iter": r["iter"]["median_s"], "batch": batch, "peak_rss_mib": r["peak_rss_mib"]}
    return {"encode": r["encode"]["median_s"], "decode": r["decode"]["median_s"], "batch": batch,
            "peak_rss_mib": r["peak_rss_mib"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="small,f16")
    ap.add_argument("--quick", action="store_true", help="fewer iterations")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.configs, args.warmup, args.iters)))
        return 0
    rows, results = [], {}
    for name in args.configs.split(","):
        spec = CONFIGS[name]
        for kind in ("train", "codec"):
            iters = args.iters or (max(2, spec["iters"][kind] // 3) if args.quick else spec["iters"][kind])
            warmup = args.warmup if args.warmup is not None else (1 if name == "f16" or args.quick else 2)
            ours_runs, ref_runs = [], []
            for _ in range(args.rounds):  # alternate, so that drift in machine speed hits both sides
                ours_runs.append(run_ours(kind, name, warmup, iters))
                ref_runs.append(run_reference(kind, name, warmup, iters))
            ours, ref = best(ours_runs), best(ref_runs)
            results[f"{name}/{kind}"] = {"ours": ours, "reference": ref}
            metrics = [("train it/s", "iter")] if kind == "train" else [("encode img/s", "encode"),
                                                                         ("decode img/s", "decode")]
            for label, key in metrics:
                o = _rate(ours, key, kind)
                r = _rate(ref, key, kind)
                rows.append((name, f"{label} (batch {spec['batch']['train' if kind == 'train' else 'codec']})",
                             o, r, o / r if o and r else None, True))
            rows.append((name, f"peak RSS MiB ({kind})", ours.get("peak_rss_mib"), ref.get("peak_rss_mib"),
                         ours["peak_rss_mib"] / ref["peak_rss_mib"] if "peak_rss_mib" in ours and
                         "peak_rss_mib" in ref else None, False))
            for side, r in (("ours", ours), ("reference", ref)):
                if "error" in r:
                    print(f"# {name}/{kind} {side}: {r['error']}", file=sys.stderr)
    print(f"\nCPU threads {os.cpu_count()}; LPIPS on random VGG16 on both sides; GAN active from step 0; "
          f"best of {args.rounds} alternating rounds\n")
    print("| config | metric | ours | reference | ratio |\n|---|---|---|---|---|")
    for name, label, o, r, ratio, higher in rows:
        note = "" if ratio is None else (" (higher is better)" if higher else " (lower is better)")
        print(f"| {name} | {label} | {_fmt(o)} | {_fmt(r)} | {_fmt(ratio)}x{note} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def best(runs: list[dict]) -> dict:
    """Per figure, the best (fastest, smallest) over rounds; errors only if every round failed."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    out = dict(ok[0])
    for key in ("iter", "encode", "decode", "peak_rss_mib"):
        if key in out:
            out[key] = min(r[key] for r in ok)
    out["rounds"] = [{k: r.get(k) for k in ("iter", "encode", "decode", "peak_rss_mib") if k in r} for r in ok]
    return out


def _rate(r: dict, key: str, kind: str):
    if key not in r:
        return None
    return (1.0 / r[key]) if kind == "train" else r["batch"] / r[key]


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"


if __name__ == "__main__":
    sys.exit(main())
