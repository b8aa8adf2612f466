"""Codebook use over a whole evaluation set: one histogram per code stream (level and depth, `CodeSpec.streams`).

Per stream: the share of codes used at least once, the perplexity and the entropy (bits) of the token
histogram; over the code: the nominal bits per position and per image (log2 of each vocabulary) and the bits
the histograms' entropies leave (what an ideal entropy coder of independent tokens would spend).
"""
from __future__ import annotations

import math

import torch

from ..codes import CodeSpec
from .shards import all_reduce


def entropy_bits(counts: torch.Tensor) -> float:
    """Entropy (bits) of the distribution a histogram of counts describes; 0 for an empty one."""
    p = counts.double() / counts.sum().clamp_min(1)
    p = p[p > 0]
    return float(-(p * p.log2()).sum())


class CodeUsage:
    """Token histograms of every stream, accumulated batch by batch (and summed over processes)."""

    def __init__(self, spec: CodeSpec):
        self.spec = spec
        self.counts = [torch.zeros(v, dtype=torch.long) for v in spec.streams]

    def update(self, tokens: torch.Tensor | list[torch.Tensor]) -> None:
        for c, codes in zip(self.counts, self.spec.stream_codes(tokens)):
            c += torch.bincount(codes.cpu(), minlength=len(c))

    def all_reduce(self) -> None:
        """Sum the histograms of all processes (torch.distributed), in place."""
        flat = torch.cat(self.counts)
        all_reduce(flat)
        self.counts = list(flat.split(self.spec.streams))

    def summary(self, height: int, width: int) -> dict:
        """Usage, perplexity and entropy per stream (`streams`, in row order: level by level, depth by depth),
        their means, and the bits per position and per image of `height` x `width` images."""
        streams, entropy_per_image = [], 0.0
        positions = [h * w for h, w in self.spec.grids(height, width)]
        i = 0
        for li, (level, n_pos) in enumerate(zip(self.spec.levels, positions)):
            for d, vocab in enumerate(level.vocab):
                c = self.counts[i]
                h = entropy_bits(c)
                streams.append({"level": li, "depth": d, "vocab": vocab, "codes_used": int((c > 0).sum()),
                                "usage": float((c > 0).double().mean()), "perplexity": 2.0 ** h,
                                "entropy_bits": h, "max_entropy_bits": math.log2(vocab)})
                entropy_per_image += h * n_pos
                i += 1
        n_positions = sum(positions)
        nominal = self.spec.bits_per_image(height, width)
        return {"usage": _mean(s["usage"] for s in streams), "perplexity": _mean(s["perplexity"] for s in streams),
                "entropy_bits": _mean(s["entropy_bits"] for s in streams),
                "codes_used": sum(s["codes_used"] for s in streams), "n_embed": sum(self.spec.streams),
                "positions_per_image": n_positions, "tokens_per_image": self.spec.row_length(height, width),
                "bits_per_position": nominal / n_positions, "bits_per_image": nominal,
                "entropy_bits_per_position": entropy_per_image / n_positions,
                "entropy_bits_per_image": entropy_per_image, "streams": streams}


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def flat_image_codes(model, colours: int = 16, seed: int = 0) -> tuple[float, int]:
    """Distinct codes a tokenizer writes on a flat single-colour image: (mean over `colours` random colours,
    positions per image); the first level's first depth. The content is the same at every position, so codes of
    content alone need one; more mean the codes also say where they are (a conv encoder sees the zero padding,
    a ViT its position embeddings), which an entropy penalty's batch term rewards (README, "Codes that say where")."""
    side = model.config.resolution
    rgb = torch.rand(colours, 3, 1, 1, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    with torch.no_grad():
        tokens = model.encode(rgb.expand(colours, 3, side, side).contiguous())
    first = (tokens if torch.is_tensor(tokens) else tokens[0])[..., 0]  # (colours, h, w)
    return sum(len(torch.unique(t)) for t in first) / colours, first[0].numel()
