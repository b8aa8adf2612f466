"""Residual quantizer: RQ-VAE (Lee et al. 2022, "Autoregressive Image Generation using Residual Quantization",
sec. 3.1). `depth` nearest-neighbour quantizers in a chain: depth d quantizes the residual that depths < d left,
and a position stands for the sum of its `depth` code vectors, coarse to fine.

Choices:
- Loss (paper eq. 5-6): the commitment on the partial sums, ||z - sg[z_hat_d]||^2 with z_hat_d the sum of depths
  <= d, plus each depth's codebook term ||sg[r_d] - e_d||^2 (a learnt codebook needs one; the paper updates by
  EMA). Both come from each depth's own quantizer, fed r_d = z - sg[z_hat_{d-1}]: its commitment term is then the
  one on the partial sum. Averaged over depths (the paper sums; the reference code averages), so depth 1 is
  plain VQ and `beta` keeps its meaning at any depth.
- `quantized` is the sum of all depths, with the gradient estimator (straight-through or rotation) applied once
  to the whole sum (`estimator_per_depth: false`, the paper's straight-through), or to each depth's code
  against its residual and then summed (`true`, as vector-quantize-pytorch's ResidualVQ; with straight-through
  the encoder's gradient is then `depth` times the decoder's, which Adam rescales away).
- `quantize_dropout` p: in training, with probability p a sample's decoder input keeps only its first k depths,
  k uniform in [1, depth - 1] (SoundStream's uniform k in [1, depth] is p = 1 - 1/depth). Every depth is still
  quantized, learnt and counted, and `indices` keep all depths; eval never drops.
- Each depth's quantizer is a registered kind (`codebook_kind`: vq; ema once registered), so its codebook
  learning and upkeep are that kind's own; this file only chains them. A shared codebook is one such quantizer
  used at every depth, with one upkeep counting all depths.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import CodebookCareConfig, QuantizerConfig
from ..errors import UserError
from ..registry import QUANTIZERS
from .base import Quantizer, QuantizerOutput, codebook_stats
from .vq import ESTIMATORS, nearest_code


@dataclass
class ResidualConfig(QuantizerConfig):
    """`kind: residual`: `depth` codes per position, each from `n_embed` codes of width `embed_dim`."""

    kind: str = "residual"
    depth: int = 4
    n_embed: int = 1024  # codes per codebook (each depth's vocabulary)
    beta: float = 0.25  # commitment weight
    shared_codebook: bool = True  # the paper: one codebook for every depth; False: one per depth
    quantize_dropout: float = 0.0  # training: chance that a sample's decoder sees only its first k < depth codes
    codebook_kind: str = "vq"  # the kind of each depth's quantizer (nearest neighbour, a trainable codebook)
    # each depth's entropy penalty (vq.py: VQConfig.entropy_weight; 0: off) on its own residuals
    entropy_weight: float = 0.0
    entropy_temperature: float = 0.01
    sample_entropy_weight: float = 1.0
    # the gradient through the sum of the codes: straight_through or rotation (vq.py: VQConfig.estimator)
    estimator: str = "straight_through"
    estimator_per_depth: bool = False  # the estimator on each depth's (residual, code) instead of the whole sum

    @property
    def vocab_per_depth(self) -> tuple[int, ...]:
        return (self.n_embed,) * self.depth

    def codebook_section(self, where: str = "model.quantizer") -> QuantizerConfig:
        """The config section of one depth's quantizer."""
        kind = self.codebook_kind
        hint = f"{where}.codebook_kind must be a nearest-neighbour kind with a trainable codebook (e.g. vq), got {kind!r}"
        if kind == self.kind or kind not in QUANTIZERS:
            raise UserError(hint)
        try:
            entropy = {"entropy_weight": self.entropy_weight, "entropy_temperature": self.entropy_temperature,
                       "sample_entropy_weight": self.sample_entropy_weight}
            return QuantizerConfig.build(kind, n_embed=self.n_embed, embed_dim=self.embed_dim, beta=self.beta,
                                         **(entropy if self.entropy_weight else {}))
        except TypeError:  # a kind without these keys (gumbel, fsq, ...) is not matched by distance
            raise UserError(hint) from None

    def validate(self, where: str = "model.quantizer") -> None:
        super().validate(where)
        if self.depth < 1:
            raise UserError(f"{where}.depth must be >= 1, got {self.depth}")
        if self.estimator not in ESTIMATORS:
            raise UserError(f"{where}.estimator must be one of {', '.join(ESTIMATORS)}, got {self.estimator!r}")
        if self.n_embed < 2:
            raise UserError(f"{where}.n_embed must be >= 2, got {self.n_embed}")
        if not 0 <= self.quantize_dropout < 1:
            raise UserError(f"{where}.quantize_dropout must lie in [0, 1), got {self.quantize_dropout}")
        self.codebook_section(where).validate(where)


@QUANTIZERS.register("residual", config=ResidualConfig)
class ResidualQuantizer(Quantizer):
    def __init__(self, config: ResidualConfig, in_channels: int | None = None):
        super().__init__()  # in_channels: like vq, the latents are compared with codes of width embed_dim
        self.config = config
        section = config.codebook_section()
        self.codebooks = nn.ModuleList(QUANTIZERS.build(section.kind, section, config.embed_dim)
                                       for _ in range(1 if config.shared_codebook else config.depth))
        if self.codebooks[0].trainable_codebook() is None:
            raise UserError(f"model.quantizer.codebook_kind must be a kind with a trainable codebook (e.g. vq), "
                            f"got {section.kind!r}")
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # (latents, residuals) of the last training forward

    def book(self, d: int) -> Quantizer:
        """The quantizer of depth d."""
        return self.codebooks[0 if self.config.shared_codebook else d]

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        depth = self.config.depth
        zf = z.float()
        partial = torch.zeros_like(zf)  # sum of the codes so far, without gradient
        shown = torch.zeros_like(zf)  # what the decoder sees (quantize_dropout leaves later depths out)
        keep = self._depths_kept(z.shape[0], z.device)
        estimator = ESTIMATORS[self.config.estimator]
        per_depth = self.config.estimator_per_depth
        residuals, indices, codes, losses = [], [], [], []
        for d in range(depth):
            r = zf - partial  # gradient to z only: the commitment term below is then on the partial sum
            out = self.book(d)(r)
            with torch.no_grad():
                e = self.book(d).decode_indices(out.indices).float()  # the code vectors decode_indices sums
            residuals.append(r.detach())
            partial = partial + e
            seen = estimator(r, e) if per_depth else e
            shown = shown + seen if keep is None else shown + seen * (keep > d).view(-1, 1, 1, 1)
            indices.append(out.indices[..., 0])
            codes.append(out.codes[..., 0])
            losses.append(out.loss)
        if self.training:
            self._last = (z.detach(), torch.stack(residuals))
        quantized = shown.to(z.dtype) if per_depth else estimator(z, shown.to(z.dtype))
        indices, codes = torch.stack(indices, -1), torch.stack(codes, -1)
        stats = self._stats(indices)
        stats["residual"] = ((zf - partial).square().mean() / zf.square().mean().clamp_min(1e-12)).detach()
        return QuantizerOutput(quantized, indices, torch.stack(losses).mean(), stats, codes=codes)

    def _depths_kept(self, batch: int, device: torch.device) -> torch.Tensor | None:
        """quantize_dropout: how many leading depths each sample's decoder sees (None: all)."""
        p, depth = self.config.quantize_dropout, self.config.depth
        if not (self.training and p > 0 and depth > 1):
            return None
        fewer = torch.randint(1, depth, (batch,), device=device)
        return torch.where(torch.rand(batch, device=device) < p, fewer, torch.full_like(fewer, depth))

    def _stats(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        n = self.config.n_embed
        if self.config.shared_codebook:  # one codebook: usage over all depths
            return codebook_stats(indices, n)
        per_depth = [codebook_stats(indices[..., d], n) for d in range(self.config.depth)]
        return {k: torch.stack([s[k] for s in per_depth]).mean() for k in per_depth[0]}

    def partial_sum(self, indices: torch.Tensor, depths: int) -> torch.Tensor:
        """The sum of the first `depths` code vectors of each position: a coarser `quantized`, (B, C, h, w)."""
        indices = self.check_indices(indices)
        total = None
        for d in range(depths):
            e = self.book(d).decode_indices(indices[..., d:d + 1]).float()
            total = e if total is None else total + e
        return total

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.partial_sum(indices, self.config.depth)

    # -- codebook upkeep: each depth's quantizer keeps its own codebook, fed that depth's residuals ---------------
    def trainable_codebook(self) -> torch.Tensor:
        """The (first) codebook. The trainer only asks whether there is one: data initialisation and restarts go
        through each depth's quantizer (`initialize_from`, `maintain` below)."""
        return self.codebooks[0].trainable_codebook()

    def start_upkeep(self, config: CodebookCareConfig, total_steps: int, seed: int = 0):
        parts = [book.start_upkeep(config, total_steps, seed=seed + d) for d, book in enumerate(self.codebooks)]
        self.upkeep = parts[0] if self.config.shared_codebook else UpkeepPerDepth(parts)
        return self.upkeep

    @torch.no_grad()
    def initialize_from(self, latents: torch.Tensor) -> None:
        """Depth by depth: depth d's codes from the residuals that the (already initialised) depths < d leave."""
        upkeep = self._require_upkeep()
        r = latents.detach().float()
        if self.config.shared_codebook:
            self.codebooks[0].initialize_from(self._shared_init_rows(r, upkeep.generator))
        else:
            for book in self.codebooks:
                book.initialize_from(r)  # rank 0's rows, broadcast: every rank then takes the same residuals
                codebook = book.trainable_codebook().float()
                r = r - codebook[nearest_code(r, codebook)]
        upkeep.initialized = True

    def _shared_init_rows(self, r: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """n_embed rows for one codebook shared by all depths: a share per depth, drawn from the residuals left
        by the shares before it (the coarse depths' rows match the latents, the later ones their residuals)."""
        n, depth = self.config.n_embed, self.config.depth
        rows: list[torch.Tensor] = []
        for d in range(depth):
            size = n // depth + int(d < n % depth)
            if size == 0:
                continue
            pick = (torch.randperm(r.shape[0], generator=generator)[:size] if r.shape[0] >= size
                    else torch.randint(r.shape[0], (size,), generator=generator))
            rows.append(r[pick.to(r.device)])
            so_far = torch.cat(rows)
            r = r - so_far[nearest_code(r, so_far)]
        return torch.cat(rows)

    @torch.no_grad()
    def maintain(self, step: int, latents: torch.Tensor, codes: torch.Tensor,
                 optimizer: torch.optim.Optimizer | None = None) -> dict[str, float]:
        """Each codebook's upkeep (counts, restarts) with the residuals its depth quantized."""
        self._require_upkeep()
        residuals = self._residuals_of(latents)  # (depth, B, C, h, w)
        if self.config.shared_codebook:  # one upkeep: all depths' codes and residuals
            b, h, w, depth = codes.shape
            return self.codebooks[0].maintain(step, residuals.flatten(0, 1),
                                              codes.permute(3, 0, 1, 2).reshape(depth * b, h, w, 1), optimizer)
        logs = [book.maintain(step, residuals[d], codes[..., d:d + 1], optimizer)
                for d, book in enumerate(self.codebooks)]
        return {"usage_window": sum(x["usage_window"] for x in logs) / len(logs),
                "restarted": sum(x["restarted"] for x in logs)}

    def _residuals_of(self, latents: torch.Tensor) -> torch.Tensor:
        """The residuals of each depth for `latents`: kept from the training forward that saw them, else
        recomputed with the current codebooks."""
        if self._last is not None:
            seen, residuals = self._last
            if seen.shape == latents.shape and seen.data_ptr() == latents.data_ptr():
                return residuals
        r = latents.detach().float().permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
        out = []
        for d in range(self.config.depth):
            out.append(r)
            codebook = self.book(d).trainable_codebook().float()
            r = r - codebook[nearest_code(r, codebook)]
        b, c, h, w = latents.shape
        return torch.stack(out).view(-1, b, h, w, c).permute(0, 1, 4, 2, 3)


class UpkeepPerDepth:
    """Separate codebooks' upkeep: one per depth, read by the trainer (flag, checkpoint state, usage) as one."""

    def __init__(self, parts: list):
        self.parts = parts

    @property
    def initialized(self) -> bool:
        return all(p.initialized for p in self.parts)

    @initialized.setter
    def initialized(self, value: bool) -> None:
        for p in self.parts:
            p.initialized = value

    @property
    def last_used(self) -> torch.Tensor:
        return torch.stack([p.last_used for p in self.parts])

    @property
    def restarts_total(self) -> int:
        return sum(p.restarts_total for p in self.parts)

    def state_dict(self) -> dict:
        return {"depths": [p.state_dict() for p in self.parts]}

    def load_state_dict(self, state: dict) -> None:
        if len(state.get("depths", ())) != len(self.parts):
            raise ValueError(f"codebook upkeep state is for {len(state.get('depths', ()))} depth(s), not {len(self.parts)}")
        for p, s in zip(self.parts, state["depths"]):
            p.load_state_dict(s)

    def epoch_usage(self, reset: bool = True) -> float:
        return sum(p.epoch_usage(reset) for p in self.parts) / len(self.parts)

    def window_usage(self, step: int) -> float:
        return sum(p.window_usage(step) for p in self.parts) / len(self.parts)
