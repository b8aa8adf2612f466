"""Nearest-neighbour vector quantizer (van den Oord et al. 2017; Esser et al. 2021, eq. 4).

Optionally factorized and l2-normalised codes (Yu et al. 2021, ViT-VQGAN sec. 3.2; LlamaGen uses codes of
width 8 with l2): the latent is projected to a small lookup space (`codebook_dim`), both it and the codes are
put on the unit sphere (`l2_norm`: the squared distance becomes 2 - 2 cos), and the code found is projected
back to `embed_dim`. The codebook, its data initialisation and its restarts live in the lookup space.

Optionally a linear codebook (`linear_codebook`; SimVQ, Zhu et al. 2024, "Addressing Representation Collapse
in Vector Quantized Models with One Linear Layer", sec. 3): the codes are a frozen random basis C times one learnt
map W (codes = C W^T), so each gradient step moves the whole space the codes span, used or not, and no code is
stranded where the encoder does not go. W starts as the identity (our choice: the paper's code uses nn.Linear's
default), so the codes start as the basis: random with the paper's scale 1/sqrt(lookup_dim), or, when training
initialises codes from data (`train.codebook.init_from_data`), encoder outputs written into the basis, whose
rows dead-code restarts rewrite too (our addition: the paper keeps the random basis; at 300 steps on photo
crops it used 10% of the codes, the data-initialised basis 38%).

Optionally index backpropagation (`estimator: index_backprop`; IBQ, Shi et al. 2024, "Taming Scalable Visual
Tokenizer for Autoregressive Image Generation", sec. 3.2): the code is the nearest one as always, but the
gradient reaches the latent and every code through the soft assignment p = softmax(-||z - e||^2 / index_temperature):
quantized = (onehot - sg[p] + p) @ codebook, so codes that won nothing still move with the reconstruction loss.
IBQ takes logits z.e at temperature 1 and picks their argmax; we keep the nearest code (the tokens of inference)
and the distance form, equal to IBQ's for l2 codes up to the temperature. One (positions, codes) block per step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import QuantizerConfig
from ..errors import UserError
from ..registry import QUANTIZERS
from .base import Quantizer, QuantizerOutput, codebook_stats
from .entropy import assignment_entropies, assignment_logits

# rows of z per chunk, so that the (rows, n_embed) distance block stays near 64 MB
_DISTANCE_BLOCK = 16 * 2**20


def nearest_code(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook row (squared L2) for each row of z: (N, D), (K, D) -> (N,) int64.

    Uses |e|^2 - 2 z.e (|z|^2 is constant per row), in float32 even under autocast, and in row chunks:
    never a (N, K, D) tensor, at most ~64 MB of distances at a time.
    """
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = z.float()
        codebook = codebook.float()
        e2 = (codebook * codebook).sum(1)  # (K,)
        rows = max(1, _DISTANCE_BLOCK // max(1, codebook.shape[0]))
        out = []
        for start in range(0, z.shape[0], rows):
            zc = z[start:start + rows]
            # |e|^2 - 2 z.e  as one fused addmm: (n, K)
            d = torch.addmm(e2.unsqueeze(0), zc, codebook.t(), beta=1.0, alpha=-2.0)
            out.append(d.argmin(1))
        return torch.cat(out) if len(out) > 1 else out[0]


@dataclass
class VQConfig(QuantizerConfig):
    """`kind: vq`: a learnt codebook of `n_embed` codes of width `embed_dim`, matched by nearest neighbour."""

    kind: str = "vq"
    n_embed: int = 1024  # codebook size
    beta: float = 0.25  # commitment weight (paper: on ||z - sg[e]||^2)
    # taming-transformers quirk: its VectorQuantizer2(legacy=True) puts beta on the codebook term
    # and weight 1 on the commitment term. The converter switches this on for released checkpoints.
    legacy_beta: bool = False
    # taming's `remap` quirk: tokens number only the `remap_codes` codes listed in the buffer `quantize.used`
    # (a code outside that list becomes `unknown_index`: "random" (taming's default), "extra" (one more
    # token id) or an integer). 0: off. The converter sets it.
    remap_codes: int = 0
    unknown_index: str = "random"
    # factorized codes (ViT-VQGAN): 0 = look up at embed_dim; else Linear embed_dim -> codebook_dim before the
    # lookup and codebook_dim -> embed_dim after it
    codebook_dim: int = 0
    l2_norm: bool = False  # the (projected) latent and the codes on the unit sphere for the search and the loss
    # entropy penalty (MaskGIT / LlamaGen's `entropy_loss`): with p(k|z) = softmax_k(-||z - e_k||^2 / t),
    # + entropy_weight * (E_z[H(p(.|z))] - H(E_z[p(.|z)])): confident assignments, all codes used on the batch.
    # 0: off. Distances are those of the lookup space (in [0, 4] with l2_norm, for which t = 0.01 is made).
    entropy_weight: float = 0.0
    entropy_temperature: float = 0.01
    # the per-position term's share of it (as lfq's and gumbel's): below 1 the batch term leads, which spreads
    # held-out photos over more codes (factorized codes at 0.5: 71% -> 79% over three seeds; README, "The
    # per-position share")
    sample_entropy_weight: float = 1.0
    # how the decoder's gradient reaches the encoder through the lookup: "straight_through" (VQ-VAE: copied as
    # is) or "rotation" (Fifty et al. 2024, "Restructuring Vector Quantization with the Rotation Trick": the
    # latent is rotated and scaled onto its code by a transform treated as constant, so the gradient turns with
    # it; vector-quantize-pytorch's default)
    estimator: str = "straight_through"
    # or "index_backprop" (IBQ, module docstring): through softmax(-distance / index_temperature) to every code
    index_temperature: float = 1.0
    # SimVQ: codes = a frozen basis times one learnt linear map (module docstring)
    linear_codebook: bool = False

    @property
    def vocab_per_depth(self) -> tuple[int, ...]:
        if self.remap_codes:
            return (self.remap_codes + int(self.unknown_index == "extra"),)
        return (self.n_embed,)

    def validate(self, where: str = "model.quantizer") -> None:
        super().validate(where)
        if self.n_embed < 1:
            raise UserError(f"{where}.n_embed must be >= 1, got {self.n_embed}")
        if self.codebook_dim < 0:
            raise UserError(f"{where}.codebook_dim must be >= 0 (0: look up at embed_dim, e.g. 8), "
                            f"got {self.codebook_dim}")
        if self.entropy_weight < 0:
            raise UserError(f"{where}.entropy_weight must be >= 0 (0: off, e.g. 0.1), got {self.entropy_weight}")
        if not self.entropy_temperature > 0:
            raise UserError(f"{where}.entropy_temperature must be > 0, e.g. 0.01; got {self.entropy_temperature}")
        if self.sample_entropy_weight < 0:
            raise UserError(f"{where}.sample_entropy_weight must be >= 0 (1: the papers', e.g. 0.5), "
                            f"got {self.sample_entropy_weight}")
        if self.estimator not in (*ESTIMATORS, INDEX_BACKPROP):
            raise UserError(f"{where}.estimator must be one of {', '.join((*ESTIMATORS, INDEX_BACKPROP))}, "
                            f"got {self.estimator!r}")
        if not self.index_temperature > 0:
            raise UserError(f"{where}.index_temperature must be > 0, e.g. 1.0; got {self.index_temperature}")


def straight_through(x: torch.Tensor, x_q: torch.Tensor) -> torch.Tensor:
    """The value of the codes x_q, the gradient of the latents x as it is."""
    return x + (x_q - x).detach()


def rotation_trick(x: torch.Tensor, x_q: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """The value of the codes x_q; the gradient of x through lambda R x, where R rotates x's direction u onto
    x_q's direction w in their plane and lambda = |x_q| / |x|, both held constant:
    R = I - 2 r r^T + 2 w u^T with r = (u + w) / |u + w| (the paper's Householder form, no D x D matrix)."""
    wide = torch.promote_types(x.dtype, torch.float32)  # at least float32 under autocast
    xf, qf = x.to(wide), x_q.detach().to(wide)
    with torch.no_grad():
        norm_x = xf.norm(dim=dim, keepdim=True).clamp_min(_L2_EPS)
        norm_q = qf.norm(dim=dim, keepdim=True)
        u, w = xf / norm_x, qf / norm_q.clamp_min(_L2_EPS)
        r = F.normalize(u + w, dim=dim, eps=_L2_EPS)
        scale = norm_q / norm_x
    rotated = xf - 2 * r * (r * xf).sum(dim, keepdim=True) + 2 * w * (u * xf).sum(dim, keepdim=True)
    return (scale * rotated + (qf - scale * rotated).detach()).to(x.dtype)  # exact codes, rotated gradient


ESTIMATORS = {"straight_through": straight_through, "rotation": rotation_trick}
INDEX_BACKPROP = "index_backprop"  # needs the codebook, not only (latent, code): VectorQuantizer.forward


def index_backprop(flat: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor,
                   temperature: float) -> torch.Tensor:
    """IBQ: rows (N, D) -> (N, D) with the value of codebook[indices] and the gradient of softmax(-d / t) @ codebook,
    to the rows through the distances and to every code."""
    with torch.autocast(device_type=flat.device.type, enabled=False):
        flat, codebook = flat.float(), codebook.float()
        soft = torch.softmax(assignment_logits(flat, codebook, temperature), dim=1)
        hard = F.one_hot(indices, codebook.shape[0]).to(soft.dtype)
        return (hard - soft.detach() + soft) @ codebook


def l2_normalize(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Unit vectors along `dim`, in float32; the norm is clamped, so a zero vector stays zero (never NaN)."""
    return F.normalize(x.float(), dim=dim, eps=_L2_EPS).to(x.dtype)


_L2_EPS = 1e-6  # smallest norm divided by: zero latents or codes (a degenerate data init) give 0, not NaN


@QUANTIZERS.register("vq", config=VQConfig)
class VectorQuantizer(Quantizer):
    """Snaps each latent vector to its nearest code; straight-through gradients to the encoder.

    loss = ||sg[z] - e||^2 + beta * ||z - sg[e]||^2  (codebook term + commitment term), where z and e are the
    latent and the code in the lookup space (projected and l2-normalised when configured).
    """

    def __init__(self, config: VQConfig, in_channels: int | None = None):
        super().__init__()  # in_channels: the latents are compared with codes of width embed_dim as they are
        self.config = config
        self.n_embed = config.n_embed
        self.embed_dim = config.embed_dim
        self.lookup_dim = config.codebook_dim or config.embed_dim
        self.embedding = nn.Embedding(config.n_embed, self.lookup_dim)
        # taming's init; training normally re-seeds the codes from encoder outputs (codebook.py)
        nn.init.uniform_(self.embedding.weight, -1.0 / config.n_embed, 1.0 / config.n_embed)
        if config.remap_codes:  # tokens index `used`, not the codebook (n_embed: the token vocabulary)
            self.register_buffer("used", torch.zeros(config.remap_codes, dtype=torch.long))
            extra = config.unknown_index == "extra"
            self.n_embed = config.remap_codes + int(extra)
            self.unknown = config.remap_codes if extra else (
                None if config.unknown_index == "random" else int(config.unknown_index))
        if config.codebook_dim:  # made last: the default layout draws the same random numbers as before
            self.project_in = nn.Linear(config.embed_dim, config.codebook_dim)
            self.project_out = nn.Linear(config.codebook_dim, config.embed_dim)
        if config.linear_codebook:  # the basis is frozen; only the map learns
            nn.init.normal_(self.embedding.weight, std=self.lookup_dim ** -0.5)
            self.embedding.weight.requires_grad_(False)
            self.codebook_map = nn.Linear(self.lookup_dim, self.lookup_dim, bias=False)
            nn.init.eye_(self.codebook_map.weight)

    # -- the lookup space: (projected, normalised) latents and codes -------------------------------
    def codebook(self) -> torch.Tensor:
        """The code vectors as matched and returned: (n_embed rows, lookup_dim), on the sphere with l2_norm."""
        weight = self.embedding.weight
        if self.config.linear_codebook:
            weight = self.codebook_map(weight)
        return l2_normalize(weight) if self.config.l2_norm else weight

    def lookup_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """(..., embed_dim) latents -> (..., lookup_dim): projected, then normalised, as configured."""
        if self.config.codebook_dim:
            rows = self.project_in(rows)
        return l2_normalize(rows) if self.config.l2_norm else rows

    def to_lookup(self, z: torch.Tensor) -> torch.Tensor:
        """(B, embed_dim, h, w) -> (B, lookup_dim, h, w); z itself when there is neither projection nor l2."""
        if not (self.config.codebook_dim or self.config.l2_norm):
            return z
        return self.lookup_rows(z.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def from_lookup(self, x: torch.Tensor) -> torch.Tensor:
        """(B, h, w, lookup_dim) codes -> (B, embed_dim, h, w)."""
        if self.config.codebook_dim:
            x = self.project_out(x)
        return x.permute(0, 3, 1, 2)

    def _upkeep_rows(self, latents: torch.Tensor, dim: int) -> torch.Tensor:
        """Encoder outputs handed to upkeep (maybe bf16, from autocast) -> the lookup space, at the weights' dtype."""
        if not (self.config.codebook_dim or self.config.l2_norm):
            return latents
        rows = latents.movedim(dim, -1).to(self.embedding.weight.dtype)
        return self.lookup_rows(rows).movedim(-1, dim)

    # -- token renumbering (taming's remap) ----------------------------------------------------------
    def _to_tokens(self, codes: torch.Tensor) -> torch.Tensor:
        """Codebook ids -> token ids (their place in `used`; `unknown_index` for the rest)."""
        if not self.config.remap_codes:
            return codes
        match = codes[:, None] == self.used[None, :]
        tokens = match.long().argmax(1)
        unknown = ~match.any(1)
        if self.unknown is None:
            fill = torch.randint(0, self.n_embed, codes.shape, device=codes.device)
        else:
            fill = torch.full_like(codes, self.unknown)
        return torch.where(unknown, fill, tokens)

    def _to_codes(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.config.remap_codes:
            return tokens
        tokens = torch.where(tokens >= len(self.used), torch.zeros_like(tokens), tokens)  # "extra" -> code used[0]
        return self.used[tokens]

    # -- the quantizer -------------------------------------------------------------------------------
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        x = self.to_lookup(z)
        b, d, h, w = x.shape
        flat = x.permute(0, 2, 3, 1).reshape(-1, d)  # (B*h*w, D), order (b, h, w)
        codebook = self.codebook()
        indices = nearest_code(flat.detach(), codebook)
        x_q = F.embedding(indices, codebook).view(b, h, w, d)
        self.observe(flat, indices)
        x_q = x_q.permute(0, 3, 1, 2).to(x.dtype)
        loss = self.code_loss(x, x_q)
        tokens = self._to_tokens(indices).view(b, h, w, 1)
        stats = codebook_stats(tokens, self.n_embed)
        if self.training and self.config.entropy_weight:  # a training loss only, as LFQ's
            per_sample, batch = assignment_entropies(flat, codebook, self.config.entropy_temperature)
            loss = loss + self.config.entropy_weight * (self.config.sample_entropy_weight * per_sample - batch)
            stats.update(sample_entropy=per_sample.detach(), codebook_entropy=batch.detach())
        if self.config.estimator == INDEX_BACKPROP and self.training:
            rows = index_backprop(flat, codebook, indices, self.config.index_temperature)
            quantized = rows.view(b, h, w, d).permute(0, 3, 1, 2).to(x.dtype)
        else:  # evaluation: the value is all that counts
            quantized = ESTIMATORS.get(self.config.estimator, straight_through)(x, x_q)
        if self.config.codebook_dim:
            quantized = self.from_lookup(quantized.permute(0, 2, 3, 1)).to(z.dtype)
        rows = indices.view(b, h, w, 1)
        return QuantizerOutput(quantized, tokens, loss, stats, codes=rows)

    def indices_of(self, z: torch.Tensor) -> torch.Tensor:
        x = self.to_lookup(z)
        b, d, h, w = x.shape
        rows = nearest_code(x.permute(0, 2, 3, 1).reshape(-1, d), self.codebook())
        return self._to_tokens(rows).view(b, h, w, 1)

    def code_loss(self, x: torch.Tensor, x_q: torch.Tensor) -> torch.Tensor:
        codebook_term = F.mse_loss(x_q.float(), x.detach().float())
        commitment_term = F.mse_loss(x.float(), x_q.detach().float())
        if self.config.legacy_beta:
            return self.config.beta * codebook_term + commitment_term
        return codebook_term + self.config.beta * commitment_term

    def observe(self, flat: torch.Tensor, indices: torch.Tensor) -> None:
        """What a training forward pass saw: (N, lookup_dim) latents and their rows (the EMA kind counts them)."""

    @property
    def codebook_size(self) -> int:
        return self.embedding.num_embeddings  # rows, not the remapped token vocabulary

    def trainable_codebook(self) -> torch.Tensor:
        return self.embedding.weight  # with linear_codebook the basis: data init and restarts rewrite its rows

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        tokens = self.check_indices(indices)[..., 0]
        return self.from_lookup(F.embedding(self._to_codes(tokens), self.codebook())).contiguous()

    # -- upkeep in the lookup space -------------------------------------------------------------------
    @torch.no_grad()
    def initialize_from(self, latents: torch.Tensor) -> None:
        super().initialize_from(self._upkeep_rows(latents, dim=1))

    @torch.no_grad()
    def maintain(self, step: int, latents: torch.Tensor, codes: torch.Tensor,
                 optimizer: torch.optim.Optimizer | None = None) -> dict[str, float]:
        return super().maintain(step, self._upkeep_rows(latents, dim=1), codes, optimizer)
