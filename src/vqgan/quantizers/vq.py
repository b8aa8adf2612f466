"""Nearest-neighbour vector quantizer (van den Oord et al. 2017; Esser et al. 2021, eq. 4)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import QuantizerConfig
from ..errors import UserError
from ..registry import QUANTIZERS
from .base import Quantizer, QuantizerOutput, codebook_stats

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

    @property
    def vocab_per_depth(self) -> tuple[int, ...]:
        if self.remap_codes:
            return (self.remap_codes + int(self.unknown_index == "extra"),)
        return (self.n_embed,)

    def validate(self, where: str = "model.quantizer") -> None:
        super().validate(where)
        if self.n_embed < 1:
            raise UserError(f"{where}.n_embed must be >= 1, got {self.n_embed}")


@QUANTIZERS.register("vq", config=VQConfig)
class VectorQuantizer(Quantizer):
    """Snaps each latent vector to its nearest code; straight-through gradients to the encoder.

    loss = ||sg[z] - e||^2 + beta * ||z - sg[e]||^2  (codebook term + commitment term).
    """

    def __init__(self, config: VQConfig, in_channels: int | None = None):
        super().__init__()  # in_channels: the latents are compared with codes of width embed_dim as they are
        self.config = config
        self.n_embed = config.n_embed
        self.embed_dim = config.embed_dim
        self.embedding = nn.Embedding(config.n_embed, config.embed_dim)
        # taming's init; training normally re-seeds the codes from encoder outputs (codebook.py)
        nn.init.uniform_(self.embedding.weight, -1.0 / config.n_embed, 1.0 / config.n_embed)
        if config.remap_codes:  # tokens index `used`, not the codebook (n_embed: the token vocabulary)
            self.register_buffer("used", torch.zeros(config.remap_codes, dtype=torch.long))
            extra = config.unknown_index == "extra"
            self.n_embed = config.remap_codes + int(extra)
            self.unknown = config.remap_codes if extra else (
                None if config.unknown_index == "random" else int(config.unknown_index))

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

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)  # (B*h*w, D), order (b, h, w)
        indices = nearest_code(flat.detach(), self.embedding.weight)
        z_q = F.embedding(indices, self.embedding.weight).view(b, h, w, d).permute(0, 3, 1, 2)
        z_q = z_q.to(z.dtype)
        codebook_term = F.mse_loss(z_q.float(), z.detach().float())
        commitment_term = F.mse_loss(z.float(), z_q.detach().float())
        if self.config.legacy_beta:
            loss = self.config.beta * codebook_term + commitment_term
        else:
            loss = codebook_term + self.config.beta * commitment_term
        quantized = z + (z_q - z).detach()  # straight-through estimator
        rows = indices.view(b, h, w, 1)
        tokens = self._to_tokens(indices).view(b, h, w, 1)
        return QuantizerOutput(quantized, tokens, loss, codebook_stats(tokens, self.n_embed), codes=rows)

    def indices_of(self, z: torch.Tensor) -> torch.Tensor:
        b, d, h, w = z.shape
        rows = nearest_code(z.permute(0, 2, 3, 1).reshape(-1, d), self.embedding.weight)
        return self._to_tokens(rows).view(b, h, w, 1)

    @property
    def codebook_size(self) -> int:
        return self.embedding.num_embeddings  # rows, not the remapped token vocabulary

    def trainable_codebook(self) -> torch.Tensor:
        return self.embedding.weight

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        tokens = self.check_indices(indices)[..., 0]
        return self.embedding(self._to_codes(tokens)).permute(0, 3, 1, 2).contiguous()
