#!/usr/bin/env python
"""Our quantizers against the peer library vector-quantize-pytorch, side by side, in the same encoder/decoder.

The peer's VectorQuantize (k-means init, EMA, dead-code expiry), ResidualVQ, FSQ and LFQ are wrapped as
quantizer kinds of ours (`peer-vq`, `peer-rq`, `peer-fsq`, `peer-lfq`: a file-local class and a registry line
each, nothing else learns about them) and trained with the same small-cpu preset, data, steps and seeds as
our kinds (`bench/quality_family.py`). Prints, for each pair: held-out PSNR, held-out codebook usage, and
the quantizer's forward+backward time per step on the preset's latent (batch 8, 8x8 grid), timed in this
process, alternating ours and theirs.

vector-quantize-pytorch is never a dependency of the package: it lives in `.venv-peer` (`make .venv-peer`),
which sees the project's own environment through a .pth file.

    .venv-peer/bin/python bench/peer_quantizers.py DATA_DIR [--steps 300] [--ours-dir runs/family]
    .venv-peer/bin/python bench/peer_quantizers.py DATA_DIR --pairs ema,residual --seeds 3   # + mean +- sd
    .venv-peer/bin/python bench/peer_quantizers.py --timing-only
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

from vqgan.config import QuantizerConfig  # noqa: E402
from vqgan.quantizers.base import Quantizer, QuantizerOutput, codebook_stats  # noqa: E402
from vqgan.registry import QUANTIZERS  # noqa: E402

# ours -> the peer kind it is compared with, and the overrides that make the peer's settings match the preset
PAIRS = {"ema": "peer-vq", "residual": "peer-rq", "fsq": "peer-fsq", "lfq": "peer-lfq"}
PEER_OPTIONS = {"peer-vq": {"n_embed": 1024, "embed_dim": 64}, "peer-rq": {"n_embed": 32, "depth": 2, "embed_dim": 64},
                "peer-fsq": {"levels": [8, 5, 5, 5]}, "peer-lfq": {"bits": 10}}


@dataclass
class PeerConfig(QuantizerConfig):
    kind: str = "peer-vq"
    n_embed: int = 1024
    depth: int = 1
    levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])
    bits: int = 10

    @property
    def code_width(self) -> int:
        return {"peer-fsq": len(self.levels), "peer-lfq": self.bits}.get(self.kind, self.embed_dim)

    @property
    def vocab_per_depth(self) -> tuple[int, ...]:
        if self.kind == "peer-fsq":
            return (math.prod(self.levels),)
        if self.kind == "peer-lfq":
            return (2 ** self.bits,)
        return (self.n_embed,) * (self.depth if self.kind == "peer-rq" else 1)


class PeerQuantizer(Quantizer):
    """A vector-quantize-pytorch module behind our contract: channel-last (B, h*w, C) in, (B, h, w, depth) out."""

    def __init__(self, config: PeerConfig, in_channels: int | None = None):
        super().__init__()
        import vector_quantize_pytorch as vqp

        self.config = config
        c = config
        if c.kind == "peer-vq":
            self.peer = vqp.VectorQuantize(dim=c.embed_dim, codebook_size=c.n_embed, decay=0.99, kmeans_init=True,
                                           kmeans_iters=10, threshold_ema_dead_code=2, commitment_weight=0.25)
        elif c.kind == "peer-rq":
            self.peer = vqp.ResidualVQ(dim=c.embed_dim, num_quantizers=c.depth, codebook_size=c.n_embed, decay=0.99,
                                       kmeans_init=True, kmeans_iters=10, threshold_ema_dead_code=2,
                                       commitment_weight=0.25)
        elif c.kind == "peer-fsq":
            self.peer = vqp.FSQ(levels=list(c.levels))
        else:
            self.peer = vqp.LFQ(dim=c.bits, codebook_size=2 ** c.bits, entropy_loss_weight=0.1,
                                commitment_loss_weight=0.25, diversity_gamma=1.0)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        b, ch, h, w = z.shape
        x = z.permute(0, 2, 3, 1).reshape(b, h * w, ch).float()
        out = self.peer(x)
        quantized, indices = out[0], out[1]
        loss = out[2].sum() if len(out) > 2 and out[2] is not None else x.new_zeros(())
        indices = indices.reshape(b, h, w, -1).long()
        quantized = quantized.reshape(b, h, w, ch).permute(0, 3, 1, 2).to(z.dtype)
        return QuantizerOutput(quantized, indices, loss, codebook_stats(indices, max(self.vocab_per_depth)))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        b, h, w, depth = self.check_indices(indices).shape
        flat = indices.reshape(b, h * w, depth)
        if self.config.kind == "peer-vq":
            codes = self.peer.get_output_from_indices(flat[..., 0])
        elif self.config.kind == "peer-rq":
            codes = self.peer.get_output_from_indices(flat)
        else:
            codes = self.peer.indices_to_codes(flat[..., 0])
        return codes.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()


for _kind in PAIRS.values():
    QUANTIZERS.register(_kind, config=PeerConfig)(PeerQuantizer)


def train_peer(kind: str, data: str, steps: int, batch: int, out: Path, holdout: int, threads: int = 2,
               overrides: list[str] = ()) -> dict:
    """Like quality_family.run_one, with the peer module in place of our quantizer."""
    from quality_family import PRESETS, _train_logs

    from vqgan.config import TokenizerTrainConfig, load_config
    from vqgan.presets import resolve_config_path
    from vqgan.train.stage1 import train_tokenizer

    ours = next(o for o, p in PAIRS.items() if p == kind)
    options = [f"model.quantizer.{k}={v}".replace(" ", "") for k, v in PEER_OPTIONS[kind].items()]
    cfg = load_config(TokenizerTrainConfig, resolve_config_path(PRESETS[ours]), [
        f"model.quantizer.kind={kind}", *options, f"data.path={data}", f"data.holdout={holdout}",
        f"train.steps={steps}", f"train.batch_size={batch}", f"train.out_dir={out}", f"train.eval_every={steps}",
        f"train.ckpt_every={steps}", f"train.image_every={steps}", *overrides])
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    result = train_tokenizer(cfg, progress=False)
    logs = _train_logs(out)
    rates = [r["it_per_s"] for r in logs[1:] if r.get("it_per_s")]
    return {"kind": kind, "psnr": result["psnr"], "usage": result["usage"], "perplexity": result["perplexity"],
            "seconds_per_step": sum(1 / r for r in rates) / len(rates) if rates else (time.perf_counter() - t0) / steps}


def quantizer_seconds(kind: str, options: dict, rounds: int = 30) -> float:
    """Median forward+backward seconds of one quantizer on the small-cpu latent: batch 8, 8x8 positions."""
    from vqgan.config import quantizer_config

    torch.manual_seed(0)
    cfg = quantizer_config(kind, **options)
    q = QUANTIZERS.build(kind, cfg, cfg.code_width).train()
    z = torch.randn(8, cfg.code_width, 8, 8, requires_grad=True)
    times = []
    for i in range(rounds + 3):
        t0 = time.perf_counter()
        out = q(z)
        (out.quantized.square().mean() + out.loss).backward()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def preset_quantizer(preset: str) -> tuple[str, dict]:
    """The kind and options of a preset's quantizer section: what its runs train."""
    import dataclasses

    from vqgan.config import TokenizerTrainConfig, load_config
    from vqgan.presets import resolve_config_path

    section = load_config(TokenizerTrainConfig, resolve_config_path(preset)).model.quantizer
    return section.kind, {k: v for k, v in dataclasses.asdict(section).items() if k != "kind"}


def timed() -> list[tuple[str, str, dict, str]]:
    """What is timed: (label, our kind, its options, the peer kind); the peer's options are PEER_OPTIONS. Each
    preset's own quantizer section, and the plain kinds the peer's defaults match."""
    return [("ema, plain", "ema", {"n_embed": 1024, "embed_dim": 64}, "peer-vq"),
            ("ema (small-cpu-ema)", *preset_quantizer("small-cpu-ema"), "peer-vq"),
            ("residual (small-cpu-rq)", *preset_quantizer("small-cpu-rq"), "peer-rq"),
            ("fsq, no penalty", "fsq", {"levels": [8, 5, 5, 5]}, "peer-fsq"),
            ("fsq + entropy 0.02 (small-cpu)", *preset_quantizer("small-cpu"), "peer-fsq"),
            ("lfq (small-cpu-lfq)", *preset_quantizer("small-cpu-lfq"), "peer-lfq")]


def timing_table(threads: int = 2) -> str:
    torch.set_num_threads(threads)
    lines = ["| ours / peer | ours ms | peer ms | ours / peer |", "|---|---|---|---|"]
    for label, ours, options, peer in timed():
        a, b = [], []
        for _ in range(3):  # alternate: the machine's speed drifts
            a.append(quantizer_seconds(ours, options))
            b.append(quantizer_seconds(peer, PEER_OPTIONS[peer]))
        ta, tb = statistics.median(a), statistics.median(b)
        lines.append(f"| {label} / {peer} | {ta * 1e3:.2f} | {tb * 1e3:.2f} | {ta / tb:.2f}x |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", nargs="?")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--holdout", type=int, default=64)
    ap.add_argument("--out", default="runs/peer")
    ap.add_argument("--ours-dir", default="runs/family", help="quality_family.py's output with our kinds' results")
    ap.add_argument("--pairs", default=",".join(PAIRS))
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads for training (1 when the machine is shared)")
    ap.add_argument("--timing-only", action="store_true")
    ap.add_argument("--skip-timing", action="store_true", help="train and compare only (time on a quiet machine)")
    ap.add_argument("--seeds", type=int, default=1,
                    help="train each peer with seeds 0..N-1 and compare mean +- sd with quality_family.py --seeds N")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: train this peer kind
    ap.add_argument("--name", default=None, help=argparse.SUPPRESS)  # ... into OUT/NAME
    ap.add_argument("--seed", type=int, default=None, help=argparse.SUPPRESS)  # ... with this train.seed
    args = ap.parse_args()
    out = Path(args.out)
    if args.one:
        name = args.name or args.one
        seed_set = [] if args.seed is None else [f"train.seed={args.seed}"]
        result = train_peer(args.one, args.data, args.steps, args.batch, out / name, args.holdout, args.threads,
                            seed_set)
        (out / f"{name}.json").write_text(json.dumps(result, indent=1))
        return 0
    if not args.skip_timing:
        print(f"quantizer forward+backward, batch 8, 8x8 latent, {args.threads} thread(s), median of 30 x 3 "
              "alternating rounds\n")
        print(timing_table(args.threads), flush=True)
    if args.timing_only:
        return 0
    rows = ["| pair | PSNR ours | PSNR peer | usage ours | usage peer | s/step ours | s/step peer |",
            "|---|---|---|---|---|---|---|"]
    spread = ["| pair | seeds | PSNR ours | PSNR peer | usage ours | usage peer |", "|---|---|---|---|---|---|"]
    out.mkdir(parents=True, exist_ok=True)
    for ours in args.pairs.split(","):
        peer = PAIRS[ours]
        mine_runs, their_runs = [], []
        for seed in range(args.seeds):
            suffix = "" if args.seeds == 1 else f"-seed{seed}"  # quality_family.py's names for its runs
            theirs = train_child(args, peer, peer + suffix, seed if suffix else None)
            mine = ours_result(Path(args.ours_dir) / f"{ours}{suffix}.json")
            label = f"{ours} / {peer}" + (f" (seed {seed})" if suffix else "")
            rows.append(f"| {label} | {mine['psnr']:.2f} | {theirs['psnr']:.2f} | {mine['usage']:.1%} | "
                        f"{theirs['usage']:.1%} | {mine['seconds_per_step']:.2f} | {theirs['seconds_per_step']:.2f} |")
            print("\n".join(rows), flush=True)
            mine_runs.append(mine)
            their_runs.append(theirs)
        if args.seeds > 1:
            spread.append(spread_row(f"{ours} / {peer}", mine_runs, their_runs))
    text = "\n".join(rows)
    if args.seeds > 1:
        print("\n".join(spread), flush=True)
        text += "\n\n" + "\n".join(spread)
    (out / "table.md").write_text(text + "\n")
    return 0


def train_child(args: argparse.Namespace, peer: str, name: str, seed: int | None) -> dict:
    """Train one peer run in a child process (clean timings, as quality_family.py); returns its OUT/NAME.json."""
    seed_args = [] if seed is None else ["--seed", str(seed)]
    subprocess.run([sys.executable, __file__, args.data, "--one", peer, "--name", name, "--steps", str(args.steps),
                    "--batch", str(args.batch), "--holdout", str(args.holdout), "--out", args.out, "--threads",
                    str(args.threads), *seed_args], check=True)
    return json.loads((Path(args.out) / f"{name}.json").read_text())


def ours_result(path: Path) -> dict:
    """Our kind's result from quality_family.py --out OURS_DIR; NaNs where it was not run (the peer's side alone)."""
    if not path.exists():
        return {"psnr": math.nan, "usage": math.nan, "seconds_per_step": math.nan}
    return json.loads(path.read_text())


def spread_row(label: str, mine: list[dict], theirs: list[dict]) -> str:
    """One pair's mean +- sd over seeds, each side's cells as quality_family.seed_table writes them."""
    from quality_family import mean_sd_cells

    def cells(runs: list[dict]) -> tuple[str, str]:
        return ("-", "-") if any(math.isnan(r["psnr"]) for r in runs) else mean_sd_cells(runs)

    (psnr_a, usage_a), (psnr_b, usage_b) = cells(mine), cells(theirs)
    return f"| {label} | {len(theirs)} | {psnr_a} | {psnr_b} | {usage_a} | {usage_b} |"


if __name__ == "__main__":
    sys.exit(main())
