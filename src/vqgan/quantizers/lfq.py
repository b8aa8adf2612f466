"""Lookup-free quantization (Yu et al. 2023, "Language Model Beats Diffusion -- Tokenizer is Key to Visual
Generation" (MAGVIT-v2), arXiv:2310.05737; defaults as Open-MAGVIT2, Luo et al. 2024, arXiv:2409.04410).

Each of `bits` channels is quantized to its sign: the implicit codebook is {-1, 1}^bits, never stored. An
entropy penalty keeps the codes used: a low entropy of each position's soft code assignment (confident codes)
and a high entropy of the batch's mean assignment (all codes used). The token of a position is given to the
prior as `split` sub-tokens of bits/split bits each (a 2^18 vocabulary is too many ids for one softmax).

`spherical: true` is binary spherical quantization (BSQ; Zhao, Xiong and Kraehenbuehl 2024, "Image and Video
Tokenization with Binary Spherical Quantization", sec. 3): the latent is first put on the unit sphere and the
codes are +-codebook_scale/sqrt(bits), so every code has the same norm and the quantization error is bounded
whatever the encoder's scale. The entropy terms keep their form with the normalised latent and that scale.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import QuantizerConfig
from ..errors import UserError
from ..registry import QUANTIZERS
from .base import Quantizer, QuantizerOutput, stats_from_counts
from .entropy import entropy_of, grid_mean_probs, mean_over_ranks

AUTO_SUBTOKEN_BITS = 12  # token_split 0: the fewest sub-tokens of at most this many bits (4096 ids each)
MAX_SUBTOKEN_BITS = 16  # the prior takes at most 2^16 ids per position
MAX_ENTROPY_GROUP_BITS = 20  # exact codebook entropy over more codes than this is too slow: factorize


@dataclass
class LFQConfig(QuantizerConfig):
    """`kind: lfq`: 2^bits codes, the signs of `bits` channels. `embed_dim` is not read: the code width is `bits`.

    loss = commitment_weight * ||z - sg[q]||^2
           + entropy_weight * (sample_entropy_weight * E[H(p(c|z))] - codebook_entropy_weight * H(E[p(c|z)]))
    with p(c|z) = softmax_c(2 z.c / entropy_temperature) over the 2^bits codes c (the paper's formulation;
    weights 0.25, 0.1, 1, 1 and temperature 0.01 are Open-MAGVIT2's).
    """

    kind: str = "lfq"
    bits: int = 10
    commitment_weight: float = 0.25
    entropy_weight: float = 0.1
    sample_entropy_weight: float = 1.0  # per-sample entropy, minimised
    codebook_entropy_weight: float = 1.0  # entropy of the batch-mean distribution, maximised
    entropy_temperature: float = 0.01
    codebook_scale: float = 1.0  # the codes are +-codebook_scale (spherical: +-codebook_scale / sqrt(bits))
    spherical: bool = False  # BSQ: the latent l2-normalised over its bits before the sign (module docstring)
    # the codebook entropy over groups of bits/entropy_groups bits, summed: 1 = exact over all 2^bits codes;
    # more is Open-MAGVIT2's factorized approximation (an upper bound, cheaper: 2 groups of 9 bits at 18 bits)
    entropy_groups: int = 1
    token_split: int = 0  # sub-tokens per position; 0: the fewest of at most 12 bits each

    @property
    def code_width(self) -> int:
        return self.bits

    @property
    def split(self) -> int:
        """Sub-tokens per position: `token_split`, or the fewest that divide `bits` with <= 12 bits each."""
        if self.token_split:
            return self.token_split
        return next(s for s in range(1, max(self.bits, 1) + 1) if self.bits % s == 0
                    and self.bits // s <= AUTO_SUBTOKEN_BITS)

    @property
    def vocab_per_depth(self) -> tuple[int, ...]:
        return (2 ** (self.bits // self.split),) * self.split

    def validate(self, where: str = "model.quantizer") -> None:
        super().validate(where)
        if self.bits < 1:
            raise UserError(f"{where}.bits must be >= 1, got {self.bits}")
        if self.token_split < 0 or self.bits % max(self.token_split, 1):
            raise UserError(f"{where}.token_split must divide {where}.bits ({self.bits}) or be 0 (auto), "
                            f"got {self.token_split}")
        if self.bits // self.split > MAX_SUBTOKEN_BITS:
            fits = next(s for s in range(self.split, self.bits + 1)
                        if self.bits % s == 0 and self.bits // s <= MAX_SUBTOKEN_BITS)
            raise UserError(f"{where}.bits {self.bits} in {self.split} sub-token(s) gives 2^{self.bits // self.split} "
                            f"ids per sub-token; the prior takes at most 2^{MAX_SUBTOKEN_BITS}: raise "
                            f"{where}.token_split (e.g. {fits}, or 0 for auto)")
        if self.entropy_groups < 1 or self.bits % self.entropy_groups:
            raise UserError(f"{where}.entropy_groups must divide {where}.bits ({self.bits}), got {self.entropy_groups}")
        if self.bits // self.entropy_groups > MAX_ENTROPY_GROUP_BITS:
            raise UserError(f"{where}.bits {self.bits} in {self.entropy_groups} entropy group(s) of "
                            f"{self.bits // self.entropy_groups} bits: the exact codebook entropy would sum over "
                            f"2^{self.bits // self.entropy_groups} codes; raise {where}.entropy_groups")
        for name in ("entropy_temperature", "codebook_scale"):
            if not getattr(self, name) > 0:
                raise UserError(f"{where}.{name} must be > 0, got {getattr(self, name)}")


# -- entropies of p(c|z) ------------------------------------------------------------------------------
# exp(2 s z.c / t) is a product over bits, so p(c|z) is a product of independent bits: bit k is 1 (c_k = +s)
# with probability sigmoid(logit_k), logit_k = 4 s z_k / t, and log p(c|z) = sum_k b_k logit_k - softplus(logit_k).

def bit_logits(z: torch.Tensor, scale: float, temperature: float) -> torch.Tensor:
    """(N, bits) latents -> (N, bits) logits of each bit being 1."""
    return z * (4 * scale / temperature)


def sample_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of H(p(c|z)) in nats: the sum of the bits' Bernoulli entropies, exactly."""
    return (F.softplus(logits) - torch.sigmoid(logits) * logits).sum(1).mean()


def bit_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """(N, bits) logits -> (N, 2 * bits) log-probabilities of each bit being 0 and 1, bit by bit: the grid of
    `grid_log_probs` with two values a channel, in the order of the tokens (bit k of code c = (c >> k) & 1)."""
    off = -F.softplus(logits)
    return torch.stack([off, logits + off], 2).reshape(logits.shape[0], -1)


def codebook_entropy(logits: torch.Tensor) -> torch.Tensor:
    """H(E_n[p(c|z_n)]) over all 2^bits codes in nats, exactly. The mean distribution does not factorize over
    bits; it is one matmul of two groups of bits' per-position products (entropy.py: `grid_mean_probs`, at 18
    bits two (N, 512) blocks and the (512, 512) mean), never an (N, 2^bits) block."""
    bits = logits.shape[1]
    return entropy_of(mean_over_ranks(grid_mean_probs(bit_log_probs(logits), [2] * bits)))


def factorized_codebook_entropy(logits: torch.Tensor, groups: int) -> torch.Tensor:
    """The codebook entropy of each group of bits, summed (exact when groups == 1; an upper bound otherwise)."""
    return sum(codebook_entropy(part) for part in logits.chunk(groups, dim=1))


# -- the quantizer --------------------------------------------------------------------------------------
@QUANTIZERS.register("lfq", config=LFQConfig)
class LookupFreeQuantizer(Quantizer):
    """z (B, bits, h, w) -> signs * codebook_scale (straight-through). Bit k of a position's code is z_k > 0;
    code = sum_k bit_k 2^k; sub-token j holds bits [j * bits/split, (j + 1) * bits/split) of it."""

    def __init__(self, config: LFQConfig, in_channels: int | None = None):
        super().__init__()  # in_channels: the model projects its latents to `bits` channels
        self.config = config
        self.bits, self.split = config.bits, config.split
        self.sub_bits = config.bits // self.split
        # weight of each channel's bit within its sub-token (constants: not in the state dict)
        self.register_buffer("weights", (2 ** torch.arange(self.sub_bits)).repeat(self.split), persistent=False)
        self.scale = config.codebook_scale / (config.bits ** 0.5 if config.spherical else 1.0)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        cfg = self.config
        b, _, h, w = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            zf = F.normalize(z.float(), dim=1, eps=1e-6) if cfg.spherical else z.float()
            signs = torch.where(zf > 0, 1.0, -1.0) * self.scale
            quantized = signs + (zf - zf.detach())  # the code's exact value, z's gradient
            loss = cfg.commitment_weight * F.mse_loss(zf, signs)
            stats = {}
            if self.training and cfg.entropy_weight:  # as the paper: a training loss only
                logits = bit_logits(zf.permute(0, 2, 3, 1).reshape(-1, self.bits), self.scale,
                                    cfg.entropy_temperature)
                per_sample = sample_entropy(logits)
                codebook = factorized_codebook_entropy(logits, cfg.entropy_groups)
                loss = loss + cfg.entropy_weight * (cfg.sample_entropy_weight * per_sample
                                                    - cfg.codebook_entropy_weight * codebook)
                stats = {"sample_entropy": per_sample.detach(), "codebook_entropy": codebook.detach()}
        bits = (zf > 0).long() * self.weights.view(1, -1, 1, 1)  # (B, bits, h, w)
        indices = bits.view(b, self.split, self.sub_bits, h, w).sum(2).permute(0, 2, 3, 1)  # (B, h, w, split)
        return QuantizerOutput(quantized.to(z.dtype), indices, loss, {**_stream_stats(indices, 2**self.sub_bits),
                                                                      **stats})

    def grid_position(self, latents: torch.Tensor) -> torch.Tensor:
        latents = F.normalize(latents.float(), dim=1, eps=1e-6) if self.config.spherical else latents.float()
        return latents / (2 * self.scale)  # the codes +-scale are one step apart

    def grid_values(self, latents: torch.Tensor) -> torch.Tensor:
        return latents > 0  # the sign of each bit (BSQ's normalisation does not change it)

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        tokens = self.check_indices(indices).permute(0, 3, 1, 2)  # (B, split, h, w)
        bits = (tokens.repeat_interleave(self.sub_bits, 1) // self.weights.view(1, -1, 1, 1)) % 2
        return (bits.float() * 2 - 1) * self.scale


def _stream_stats(indices: torch.Tensor, vocab: int) -> dict[str, torch.Tensor]:
    """Usage and perplexity of each sub-token stream, averaged (as the held-out evaluation reports them)."""
    per = [stats_from_counts(torch.bincount(indices[..., d].reshape(-1), minlength=vocab).float())
           for d in range(indices.shape[-1])]
    return {k: torch.stack([s[k] for s in per]).mean() for k in per[0]}
