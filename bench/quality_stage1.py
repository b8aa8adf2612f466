#!/usr/bin/env python
"""Quality side by side: our tokenizer (small-cpu-vq preset: the VQ quantizer, like the reference) and the reference
taming-transformers VQModel, trained for the same steps at the same batch on the same folder of images.

Held out: the last 64 files by name (as ../shared/reference/taming_train_quality.py does). Prints PSNR,
codebook usage and perplexity on the held-out images for both, and the differences.

    python bench/quality_stage1.py DATA_DIR [--steps 300] [--batch 8] [--out runs/quality]
        [--reference-json FILE]   # reuse a finished reference run instead of training it again
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REF_DIR = Path(os.environ.get("TAMING_BENCH_DIR", ROOT.parent / "shared" / "reference"))
REF_PYTHON = os.environ.get("REF_PYTHON", "/tmp/ref-venv/bin/python")


def run_ours(data: str, steps: int, batch: int, out: Path, holdout: int) -> dict:
    sys.path.insert(0, str(ROOT / "src"))
    from vqgan.config import TokenizerTrainConfig, load_config
    from vqgan.eval.report import tokenizer_report
    from vqgan.presets import resolve_config_path
    from vqgan.train.stage1 import train_tokenizer

    cfg = load_config(TokenizerTrainConfig, resolve_config_path("small-cpu-vq"), [
        f"data.path={data}", f"data.holdout={holdout}", f"train.steps={steps}", f"train.batch_size={batch}",
        f"train.out_dir={out}", "train.eval_every=100", f"train.ckpt_every={steps}"])
    t0 = time.perf_counter()
    result = train_tokenizer(cfg, progress=False)
    result["seconds"] = time.perf_counter() - t0
    tokenizer_report(out, result, title="quality run (ours)")
    return result


def run_reference(data: str, steps: int, batch: int, out: Path, holdout: int) -> dict:
    out_json = out.with_name(out.name + "-reference.json")
    cmd = [REF_PYTHON, str(REF_DIR / "taming_train_quality.py"), "--data", data, "--steps", str(steps), "--batch",
           str(batch), "--holdout", str(holdout), "--out", str(out_json)]
    subprocess.run(cmd, check=True)
    return json.loads(out_json.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--holdout", type=int, default=64)
    ap.add_argument("--out", default="runs/quality")
    ap.add_argument("--reference-json", default=None)
    args = ap.parse_args()
    out = Path(args.out)
    if args.reference_json:
        ref = json.loads(Path(args.reference_json).read_text())
    else:
        ref = run_reference(args.data, args.steps, args.batch, out, args.holdout)
    ours = run_ours(args.data, args.steps, args.batch, out, args.holdout)
    r = ref["results"]["holdout"]
    rows = [("held-out PSNR (dB)", ours["psnr"], r["psnr_mean"]),
            ("codebook usage (held-out)", ours["usage"], r["codebook_usage"]),
            ("codes used", ours["codes_used"], r["codes_used"]),
            ("perplexity", ours["perplexity"], r["perplexity"])]
    print(f"\n{args.steps} steps, batch {args.batch}, held-out = last {args.holdout} files of {args.data}\n")
    print("| metric | ours | reference | difference |\n|---|---|---|---|")
    for name, o, rv in rows:
        print(f"| {name} | {o:.4g} | {rv:.4g} | {o - rv:+.4g} |")
    print(f"\nreport: {(out / 'report.html').resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
