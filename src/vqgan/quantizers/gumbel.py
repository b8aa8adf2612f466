"""Gumbel-softmax quantizer (as in DALL-E's dVAE and taming's GumbelVQ).

A 1x1 conv turns each latent into logits over the codebook. Training samples a relaxed one-hot with
Gumbel noise (temperature `temperature`, straight-through hard samples when `straight_through`), and a
KL term pulls the code distribution towards uniform. In eval mode the token is the argmax of the logits:
deterministic, unlike taming's GumbelVQ, which adds Gumbel noise even in eval (`noise_in_eval` reproduces
that quirk, drawing the noise with the same torch calls).

Schedules (Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation", appendix A.2, where "all [decayed
quantities] use a cosine schedule"): the temperature goes from `temperature` (1) to `temperature_end` (1/16)
over the first `temperature_steps` updates (150,000 there; "a linear annealing schedule ... typically led to
divergence"), and the KL weight from `kl_weight_start` (0) to `kl_weight` (beta = 6.6 there) over the first
`kl_warmup_steps` (5,000), both by half a cosine, then constant. 0 steps: constant at the final value (the
temperature at `temperature`). The trainer sets them from the step before each forward (`set_step`), so a
resumed run continues where it was; outside training the temperature does not matter (argmax tokens).

Dead codes (unused for `train.codebook.restart_after` steps) restart as noisy copies of busy ones (`split_codes`),
since a code picked by logits cannot be moved onto an encoder output as a nearest-neighbour code is; or, with
`restart: data`, on a recent encoder output, by cutting the region of the code that wins it in two along the
direction of that output (`split_by_data`: k-means' splitting step, steered by the data rather than by noise).

`codebook_dim` > 0 (beyond the paper; the factorized, l2-normalised lookup of ViT-VQGAN, Yu et al. 2021, sec. 3.2,
carried over to logits): the latent is projected to `codebook_dim` dimensions and put on the unit sphere, and a
code's logit is its cosine with the latent times a learned scale (`logit_scale` at the start, as CLIP's). Every code
then wins the cap of the sphere around it: none can be outvoted everywhere, as a row of the linear logits can by a
larger one, and a dead code restarts on the sphere where recent latents lie (`restart: data`). In the CPU dVAE
(photo crops, 300 steps, three seeds) that gave +0.6 dB, inside the seeds' spread, and 4.6 points fewer codes used
on held-out images (README, the dVAE rows).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import QuantizerConfig
from ..errors import UserError
from ..nn import dalle_init
from ..registry import QUANTIZERS
from .base import Quantizer, QuantizerOutput, codebook_stats
from .codebook import broadcast, forget_moments
from .entropy import softmax_entropies


@dataclass
class GumbelConfig(QuantizerConfig):
    """`kind: gumbel`: logits over `n_embed` codes of width `embed_dim`, relaxed with Gumbel noise in training."""

    kind: str = "gumbel"
    n_embed: int = 1024
    temperature: float = 1.0  # the relaxation temperature (its start, when annealed)
    temperature_end: float = 1.0 / 16  # ... annealed to this over temperature_steps (0: no annealing)
    temperature_steps: int = 0
    kl_weight: float = 5e-4  # the weight of the KL to the uniform prior (its final value, when warmed up)
    kl_weight_start: float = 0.0  # ... raised from this over kl_warmup_steps (0: kl_weight from the start)
    kl_warmup_steps: int = 0
    straight_through: bool = True
    noise_in_eval: bool = False  # taming quirk: its GumbelVQ samples noise even in eval (off: argmax tokens)
    # the family's entropy penalty on q = softmax(logits) (entropy.py): + entropy_weight * (E[H(q)] - H(E[q])).
    # Beyond the paper: its KL pulls each position's q toward uniform, which does not stop every position
    # choosing the same code; this term spreads the batch over the codes. 0: off (the paper).
    entropy_weight: float = 0.0
    # the per-position term's share of it (as lfq's): 0 keeps only "spread the batch over the codes", leaving
    # each position's confidence to the reconstruction (the per-position term saturates the logits: measured,
    # README's dVAE paragraph)
    sample_entropy_weight: float = 1.0
    # the penalty reads softmax(logits / entropy_temperature): above 1 it still sees the spread of logits that the
    # per-position term has saturated (std 150-200), as lfq's and vq's temperatures do. 1: the logits as they are
    entropy_temperature: float = 1.0
    # taming: PyTorch's defaults (the logits conv uniform with biases, codes N(0, 1)); dalle: the released
    # dVAE's (logits conv normal 1/sqrt(fan_in), zero bias; codes as its decoder's first conv reads a one-hot,
    # std 1/sqrt(n_embed), small enough that Adam moves them within a short run)
    init: str = "taming"
    # how a dead code restarts: `copies` of busy codes that the Gumbel noise separates (split_codes), or `data`:
    # a busy code's region of recent encoder outputs cut in two along the direction of one of them, the dead code
    # taking the far half (split_by_data)
    restart: str = "copies"
    # 0: logits from a 1x1 conv of the latent (the paper). n: cosine logits in n dimensions (module docstring)
    codebook_dim: int = 0
    logit_scale: float = 10.0  # with codebook_dim: the learned scale of the cosines, at the start

    def temperature_at(self, step: int) -> float:
        if not self.temperature_steps:
            return self.temperature
        return cosine_schedule(step, self.temperature, self.temperature_end, self.temperature_steps)

    def kl_weight_at(self, step: int) -> float:
        return cosine_schedule(step, self.kl_weight_start, self.kl_weight, self.kl_warmup_steps)

    @property
    def vocab_per_depth(self) -> tuple[int, ...]:
        return (self.n_embed,)

    def validate(self, where: str = "model.quantizer") -> None:
        super().validate(where)
        if self.n_embed < 2:
            raise UserError(f"{where}.n_embed must be >= 2, got {self.n_embed}")
        for name in ("temperature", "temperature_end", "entropy_temperature"):
            if not getattr(self, name) > 0:
                raise UserError(f"{where}.{name} must be > 0, got {getattr(self, name)}")
        if self.init not in ("taming", "dalle"):
            raise UserError(f"{where}.init must be taming or dalle, got {self.init!r}")
        if self.codebook_dim < 0:
            raise UserError(f"{where}.codebook_dim must be >= 0 (0: linear logits, e.g. 8: cosine logits), "
                            f"got {self.codebook_dim}")
        if not self.logit_scale > 0:
            raise UserError(f"{where}.logit_scale must be > 0 (e.g. 10), got {self.logit_scale}")
        if self.restart not in ("copies", "data"):
            raise UserError(f"{where}.restart must be copies or data, got {self.restart!r}")
        for name in ("kl_weight", "kl_weight_start", "temperature_steps", "kl_warmup_steps", "entropy_weight",
                     "sample_entropy_weight"):
            if getattr(self, name) < 0:
                raise UserError(f"{where}.{name} must be >= 0, got {getattr(self, name)}")


@QUANTIZERS.register("gumbel", config=GumbelConfig)
class GumbelQuantizer(Quantizer):
    def __init__(self, config: GumbelConfig, in_channels: int):
        super().__init__()
        self.config = config
        self.n_embed = config.n_embed
        self.temperature = config.temperature_at(0)  # until the trainer sets the step
        self.kl_weight = config.kl_weight_at(0)
        if config.codebook_dim:  # latent -> a point on the sphere, its cosines with the unit codes -> logits
            self.project_in = nn.Conv2d(in_channels, config.codebook_dim, 1)
            self.codes = nn.Parameter(F.normalize(torch.randn(config.n_embed, config.codebook_dim), dim=1))
            self.log_scale = nn.Parameter(torch.tensor(math.log(config.logit_scale)))
        else:
            self.proj = nn.Conv2d(in_channels, config.n_embed, 1)  # latent -> logits over the codes
        self.embed = nn.Embedding(config.n_embed, config.embed_dim)
        if config.init == "dalle":
            dalle_init(self.project_in if config.codebook_dim else self.proj)
            nn.init.normal_(self.embed.weight, std=config.n_embed ** -0.5)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents -> (B, n_embed, h, w) float32 logits."""
        if not self.config.codebook_dim:
            return self.proj(z).float()
        u = F.normalize(self.project_in(z).float(), dim=1)
        scale = self.log_scale.float().clamp(max=math.log(100.0)).exp()  # CLIP's cap: beyond it, an argmax
        return scale * torch.einsum("bdhw,kd->bkhw", u, F.normalize(self.codes.float(), dim=1))

    def to_sphere(self, rows: torch.Tensor) -> torch.Tensor:
        """(N, C) latents -> (N, codebook_dim) unit vectors, as `logits` reads them."""
        weight = self.project_in.weight.flatten(1).to(rows)
        return F.normalize(F.linear(rows, weight, self.project_in.bias.to(rows)), dim=1)

    def code_rows(self) -> list[nn.Parameter]:
        """The parameters that hold one row per code: what a restart copies."""
        return [self.codes if self.config.codebook_dim else self.proj.weight, self.embed.weight]

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        logits = self.logits(z)  # (B, K, h, w)
        if self.training or self.config.noise_in_eval:
            hard = self.config.straight_through if self.training else True
            one_hot = F.gumbel_softmax(logits, tau=self.temperature, dim=1, hard=hard)
        else:
            one_hot = F.one_hot(logits.argmax(1), self.n_embed).permute(0, 3, 1, 2).float()
        quantized = torch.einsum("bkhw,kd->bdhw", one_hot, self.embed.weight.float()).to(z.dtype)
        q = F.softmax(logits, dim=1)
        kl = self.kl_weight * (q * torch.log(q * self.n_embed + 1e-10)).sum(1).mean()
        indices = one_hot.argmax(1).unsqueeze(-1)  # (B, h, w, 1)
        stats = codebook_stats(indices, self.n_embed)
        if self.training and self.config.entropy_weight:
            rows = logits.permute(0, 2, 3, 1).reshape(-1, self.n_embed)
            per_sample, batch = softmax_entropies(rows / self.config.entropy_temperature)
            kl = kl + self.config.entropy_weight * (self.config.sample_entropy_weight * per_sample - batch)
            stats.update(sample_entropy=per_sample.detach(), codebook_entropy=batch.detach())
        return QuantizerOutput(quantized, indices, kl, stats)

    @torch.no_grad()
    def maintain(self, step: int, latents: torch.Tensor, codes: torch.Tensor,
                 optimizer: torch.optim.Optimizer | None = None) -> dict[str, float]:
        """Usage counts (Quantizer.maintain), then dead codes restarted by splitting live ones (`split_codes`)."""
        logs = super().maintain(step, latents, codes, optimizer)
        dead = self.upkeep.dead_codes(step)
        if dead is not None and not bool(dead.all()):
            if self.config.restart == "data" and self.upkeep.pool.shape[0]:
                self.split_by_data(dead, optimizer)
            else:
                self.split_codes(dead, optimizer)
            self.upkeep.restarted(dead, step)
            logs.update(restarted=int(dead.sum()), usage_window=self.upkeep.window_usage(step))  # as vq's, after
        return logs

    @torch.no_grad()
    def split_codes(self, dead: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Restart the `dead` codes (a bool mask) as copies of live ones. A code here is chosen by its row of logit
        weights, not by a distance to the latent, so it cannot be moved onto an encoder output as vq's are; each
        dead code instead copies a live donor (drawn in proportion to recent use) -- logit row, bias and code
        vector -- with 1% noise, and the m codes that share a donor's row share its probability (bias - log m).
        The model's output is unchanged; the Gumbel samples then send some of the donor's positions to each copy,
        and the gradients pull the copies apart (the splitting step of LBG k-means, Linde, Buzo & Gray 1980)."""
        upkeep, device = self.upkeep, self.embed.weight.device
        weight = (upkeep.epoch_counts.float() + 1) * (~dead.cpu()).float()
        n = int(dead.sum())
        donors = torch.multinomial(weight, n, replacement=n > int(weight.gt(0).sum()), generator=upkeep.generator)
        targets = dead.cpu().nonzero().squeeze(1)
        origin = torch.arange(self.n_embed).index_put_((targets,), donors)  # what each code is a copy of
        copies = torch.bincount(origin, minlength=self.n_embed).float()  # how many codes share each donor's mass
        params = self.code_rows()
        for param in params:
            rows = param[donors.to(device)]
            noise = torch.randn(rows.shape, generator=upkeep.generator).to(rows)
            scale = rows.flatten(1).std(1).clamp_min(1e-6).view(-1, *[1] * (rows.dim() - 1))
            param[targets.to(device)] = rows + 0.01 * scale * noise
        if not self.config.codebook_dim and self.proj.bias is not None:
            bias = self.proj.bias
            bias.copy_(bias[origin.to(device)] - torch.log(copies[origin]).to(bias))
            params.append(bias)
        for param in params:
            broadcast(param)
            forget_moments(optimizer, param, dead)

    @torch.no_grad()
    def split_by_data(self, dead: torch.Tensor, optimizer: torch.optim.Optimizer | None = None,
                      margin: float = 2.0) -> None:
        """Restart each `dead` code on a recent encoder output z: the code d that wins z now keeps the half of its
        region nearer the mean m of the recent outputs it wins, and the dead code takes the half nearer z.
        Its logit row is d's plus a term that is +margin at z, -margin at m and 0 on the plane halfway between;
        its code vector is d's, so nothing decoded changes until the gradients pull the two apart."""
        upkeep = self.upkeep
        targets = dead.cpu().nonzero().squeeze(1)
        pool = upkeep.pool
        picks = pool[torch.randint(pool.shape[0], (len(targets),), generator=upkeep.generator)]
        if self.config.codebook_dim:
            self._restart_on_sphere(targets, picks, dead, optimizer)
            return
        weight, bias = self.proj.weight, self.proj.bias
        w = weight.detach().float().flatten(1).cpu()
        b = bias.detach().float().cpu() if bias is not None else torch.zeros(self.n_embed)
        pool_owner = (pool @ w.t() + b).argmax(1)
        owners = (picks @ w.t() + b).argmax(1)
        counts = torch.bincount(pool_owner, minlength=self.n_embed).float()
        means = torch.zeros(self.n_embed, pool.shape[1]).index_add_(0, pool_owner, pool) / counts.clamp_min(1)[:, None]
        m = torch.where(counts[owners, None] > 1, means[owners], pool.mean(0))  # the owner's recent outputs
        direction = picks - m
        tiny = 1e-6 * float(pool.var(0).sum()) + 1e-12  # a pick at its owner's mean: no direction to cut along
        step = (2 * margin / direction.square().sum(1, keepdim=True).clamp_min(tiny)) * direction
        w[targets] = w[owners] + step  # +margin at the pick, -margin at the owner's mean
        b[targets] = b[owners] - (step * (picks + m)).sum(1) / 2
        self.embed.weight[targets.to(self.embed.weight.device)] = self.embed.weight[owners.to(self.embed.weight.device)]
        weight.copy_(w.view_as(weight).to(weight))
        params = [weight, self.embed.weight]
        if bias is not None:
            bias.copy_(b.to(bias))
            params.append(bias)
        for param in params:
            broadcast(param)
            forget_moments(optimizer, param, dead)

    @torch.no_grad()
    def _restart_on_sphere(self, targets: torch.Tensor, picks: torch.Tensor, dead: torch.Tensor,
                           optimizer: torch.optim.Optimizer | None) -> None:
        """Cosine logits: each dead code moves to where a recent latent lies on the sphere, so it wins that latent's
        neighbourhood, and takes the code vector of the live code that won it: the latent decodes as before, and
        only latents near the new cap's rim can change code."""
        points = self.to_sphere(picks.to(self.codes.device))
        cosines = points @ F.normalize(self.codes.float(), dim=1).t()
        owners = cosines.masked_fill(dead.to(cosines.device), -2.0).argmax(1)  # among the live codes
        self.codes[targets.to(self.codes.device)] = points.to(self.codes)
        rows = targets.to(self.embed.weight.device)
        self.embed.weight[rows] = self.embed.weight[owners.to(self.embed.weight.device)]
        for param in self.code_rows():
            broadcast(param)
            forget_moments(optimizer, param, dead)

    def set_step(self, step: int) -> dict[str, float]:
        self.temperature = self.config.temperature_at(step)
        self.kl_weight = self.config.kl_weight_at(step)
        return {"temperature": self.temperature, "kl_weight": self.kl_weight}

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embed(self.check_indices(indices)[..., 0]).permute(0, 3, 1, 2).contiguous()


def cosine_schedule(step: int, start: float, end: float, steps: int) -> float:
    """`start` at step 0 to `end` at `steps` by half a cosine, `end` after (and throughout when steps is 0)."""
    if steps <= 0:
        return end
    t = min(1.0, step / steps)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))
