"""VQ-VAE-2: a tokenizer with two levels of codes (`model.kind: vqvae2`).

Razavi, van den Oord & Vinyals 2019, "Generating Diverse High-Fidelity Images with VQ-VAE-2", sec. 3.1 and
fig. 2a. The bottom encoder brings the image to 1/4 of its side; the top encoder halves that again (1/8) and
the top quantizer codes it. The top decoder brings the top codes back to the bottom grid, where they join the
bottom encoder's features; from both, the bottom quantizer codes the 1/4 grid. The decoder sees the bottom
codes and the top codes upsampled to the bottom grid, and makes the image. Top codes carry global structure,
bottom codes the local detail conditioned on it.

Blocks as the paper (and VQ-VAE, van den Oord et al. 2017, sec. 4.1): strided 4x4 convolutions down, 3x3
convolutions, residual blocks x + conv1x1(relu(conv3x3(relu(x)))) followed by a ReLU, transposed 4x4
convolutions up; no normalisation layers. Sizes of the paper's 256-px model (its appendix: 128 hidden units,
64 residual units, 2 residual blocks, 512 codes of width 64 at each level, EMA codebooks with decay 0.99,
beta 0.25): `configs/vqvae2.yaml`.

Where the paper leaves a detail open, the choices here:
- Each level's quantizer is any registered kind (`model.top_quantizer`, `model.bottom_quantizer`: ema as the
  paper, or vq, fsq, residual...); its depths become that level's depths in the code spec.
- The top decoder ends in a transposed 4x4 convolution to `top_quantizer.code_width` channels, concatenated
  with the bottom encoder's `ch` features and projected (1x1) to the bottom code width (`quant_conv_bottom`).
- The top codes reach the decoder through one transposed 4x4 convolution (`upsample_top`) to the bottom grid.
- The loss is the sum of both levels' quantizer losses; the reconstruction term is the trainer's (`loss.*`;
  the paper's is MSE alone: no perceptual or adversarial term, as the presets set).
- Codes are listed top level first (code spec: factor 8, then factor 4): a row is [top | bottom], so one
  autoregressive prior over rows models p(top) p(bottom | top), the order the paper samples in.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..codes import CodeLevel, CodeSpec
from ..config import CodebookCareConfig, QuantizerConfig, TokenizerConfig, from_dict, quantizer_config
from ..errors import UserError
from ..nn import Conv2d
from ..quantizers import Quantizer, build_quantizer
from ..quantizers.residual import UpkeepPerDepth
from ..registry import MODELS, TOKENIZERS
from .model import Tokenizer, inference_layout, initialize_quantizer, latent_rows


def _ema_512() -> QuantizerConfig:
    return quantizer_config("ema", n_embed=512, embed_dim=64, beta=0.25, decay=0.99)


@dataclass
class VQVAE2Config(TokenizerConfig):
    """`model.kind: vqvae2`: the encoders' and decoders' widths and each level's quantizer."""

    kind: str = "vqvae2"
    resolution: int = 256
    input_kind: str = "rgb"  # rgb images, or segmentation / depth maps (as VQGANConfig)
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128  # hidden units of the encoders and decoders
    res_ch: int = 64  # hidden units inside a residual block
    num_res_blocks: int = 2  # residual blocks of each encoder and decoder
    top_quantizer: QuantizerConfig = field(default_factory=_ema_512)  # the 1/8 grid
    bottom_quantizer: QuantizerConfig = field(default_factory=_ema_512)  # the 1/4 grid

    @property
    def downsample_factor(self) -> int:
        """The coarsest level's factor: image sides are multiples of it, and the prior's grid is the top's."""
        return 8

    @property
    def latent_size(self) -> int:
        return self.resolution // self.downsample_factor

    @property
    def code_spec(self) -> CodeSpec:
        """Two levels: top (factor 8), then bottom (factor 4), each with its quantizer's depths."""
        return CodeSpec((CodeLevel(8, tuple(self.top_quantizer.vocab_per_depth)),
                         CodeLevel(4, tuple(self.bottom_quantizer.vocab_per_depth))))

    def validate(self) -> None:
        self.check_input()
        if self.ch < 2 or self.ch % 2:
            raise UserError(f"model.ch must be an even number >= 2, got {self.ch}")
        if self.res_ch < 1 or self.num_res_blocks < 0:
            raise UserError("model.res_ch must be >= 1 and model.num_res_blocks >= 0")
        if self.resolution % 8:
            raise UserError(f"model.resolution {self.resolution} is not divisible by 8 (the top level's factor)")
        self.top_quantizer.validate("model.top_quantizer")
        self.bottom_quantizer.validate("model.bottom_quantizer")


# -- blocks ----------------------------------------------------------------------------------------


class ResidualStack(nn.Module):
    """`n` blocks x + conv1x1(relu(conv3x3(relu(x)))), then a ReLU (VQ-VAE sec. 4.1)."""

    def __init__(self, channels: int, hidden: int, n: int):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.ReLU(), Conv2d(channels, hidden, 3, padding=1), nn.ReLU(),
                                                  nn.Conv2d(hidden, channels, 1)) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return torch.relu(x)


class ConvEncoder(nn.Module):
    """(B, cin, H, W) -> (B, ch, H / 2**halvings, W / 2**halvings): strided 4x4 convolutions (the first to ch/2),
    a 3x3 convolution to ch, residual blocks. halvings: 2 (bottom encoder) or 1 (top encoder)."""

    def __init__(self, cin: int, ch: int, res_ch: int, n_res: int, halvings: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(cin, ch // 2, 4, stride=2, padding=1)]
        for i in range(halvings - 1):
            layers += [nn.ReLU(), nn.Conv2d(ch // 2, ch // 2 if i < halvings - 2 else ch, 4, stride=2, padding=1)]
        width = ch if halvings > 1 else ch // 2
        layers += [nn.ReLU(), Conv2d(width, ch, 3, padding=1)]
        self.down = nn.Sequential(*layers)
        self.res = ResidualStack(ch, res_ch, n_res)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res(self.down(x))


class ConvDecoder(nn.Module):
    """(B, cin, h, w) -> (B, cout, h * 2**doublings, w * 2**doublings): a 3x3 convolution to ch, residual blocks,
    transposed 4x4 convolutions (halving the width before the last). doublings: 2 (decoder) or 1 (top decoder)."""

    def __init__(self, cin: int, cout: int, ch: int, res_ch: int, n_res: int, doublings: int):
        super().__init__()
        self.conv_in = Conv2d(cin, ch, 3, padding=1)
        self.res = ResidualStack(ch, res_ch, n_res)
        layers: list[nn.Module] = []
        width = ch
        for _ in range(doublings - 1):
            layers += [nn.ConvTranspose2d(width, ch // 2, 4, stride=2, padding=1), nn.ReLU()]
            width = ch // 2
        layers.append(nn.ConvTranspose2d(width, cout, 4, stride=2, padding=1))
        self.up = nn.Sequential(*layers)

    @property
    def last_layer(self) -> nn.Module:
        """The output layer (the adaptive GAN weight needs it; a transposed conv takes the exact gradient path)."""
        return self.up[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.res(self.conv_in(x)))


# -- the quantizers of several levels, as the trainer's codebook upkeep sees them -------------------------


class LevelQuantizers(nn.Module):
    """One quantizer per level of codes, in code-spec order, with the codebook-upkeep contract the trainer calls
    on `model.quantize` (Quantizer: start_upkeep, maintain, trainable_codebook, codebook_size) over all of them:
    each level keeps its own codebook and upkeep; `maintain` takes one latent grid and one code tensor per level.
    Data initialisation goes level by level through the model (`VQVAE2.initialize_codebook`), since a lower
    level's latents depend on the codes above it."""

    def __init__(self, quantizers: list[Quantizer]):
        super().__init__()
        self.levels = nn.ModuleList(quantizers)
        self.upkeep: UpkeepPerDepth | None = None

    @property
    def codebook_size(self) -> int:
        return max(q.codebook_size for q in self.levels)

    def trainable_codebook(self) -> torch.Tensor | None:
        """A codebook to initialise from data (the first level's that has one), or None where no level has."""
        return next((c for c in (q.trainable_codebook() for q in self.levels) if c is not None), None)

    @property
    def starts_from_data(self) -> bool:
        return any(q.starts_from_data for q in self.levels)

    def start_upkeep(self, config: CodebookCareConfig, total_steps: int, seed: int = 0) -> UpkeepPerDepth:
        self.upkeep = UpkeepPerDepth([q.start_upkeep(config, total_steps, seed=seed + 101 * i)
                                      for i, q in enumerate(self.levels)])
        return self.upkeep

    def set_step(self, step: int) -> dict[str, float]:
        """The quantizers' schedules (Quantizer.set_step), set at each level; their values for the logs, by level."""
        return {f"{name}_{k}": v for name, q in zip(("top", "bottom"), self.levels) for k, v in q.set_step(step).items()}

    @torch.no_grad()
    def maintain(self, step: int, latents: list[torch.Tensor], codes: list[torch.Tensor],
                 optimizer: torch.optim.Optimizer | None = None) -> dict[str, float]:
        logs = [q.maintain(step, h, c, optimizer) for q, h, c in zip(self.levels, latents, codes)]
        return {"usage_window": sum(x["usage_window"] for x in logs) / len(logs),
                "restarted": sum(x["restarted"] for x in logs)}


# -- the model --------------------------------------------------------------------------------------------


class VQVAE2(Tokenizer):
    """The two-level tokenizer. Images are NCHW in [-1, 1]; codes are a list [top (B, H/8, W/8, depth_top),
    bottom (B, H/4, W/4, depth_bottom)] of int64 tensors (codes.py: `code_spec.flatten` makes the row).

    >>> codes = model.encode(images)           # [top, bottom]
    >>> images = model.decode(codes)           # (B, out_ch, H, W)
    >>> rec, codebook_loss, info = model(images)
    """

    def __init__(self, config: VQVAE2Config):
        super().__init__()
        config.validate()
        self.config = config
        c = config
        top_w, bottom_w = c.top_quantizer.code_width, c.bottom_quantizer.code_width
        self.encoder_bottom = ConvEncoder(c.in_channels, c.ch, c.res_ch, c.num_res_blocks, halvings=2)  # 1/4
        self.encoder_top = ConvEncoder(c.ch, c.ch, c.res_ch, c.num_res_blocks, halvings=1)  # 1/8
        self.quant_conv_top = nn.Conv2d(c.ch, top_w, 1)
        self.decoder_top = ConvDecoder(top_w, top_w, c.ch, c.res_ch, c.num_res_blocks, doublings=1)  # -> 1/4
        self.quant_conv_bottom = nn.Conv2d(c.ch + top_w, bottom_w, 1)
        self.quantize = LevelQuantizers([build_quantizer(c.top_quantizer, top_w),
                                         build_quantizer(c.bottom_quantizer, bottom_w)])
        self.upsample_top = nn.ConvTranspose2d(top_w, top_w, 4, stride=2, padding=1)
        self.decoder = ConvDecoder(top_w + bottom_w, c.out_ch, c.ch, c.res_ch, c.num_res_blocks, doublings=2)

    @property
    def quantize_top(self) -> Quantizer:
        return self.quantize.levels[0]

    @property
    def quantize_bottom(self) -> Quantizer:
        return self.quantize.levels[1]

    # -- the pieces ------------------------------------------------------------------------------
    def top_prequant(self, features: torch.Tensor) -> torch.Tensor:
        """Bottom encoder features (B, ch, H/4, W/4) -> top latents before quantization (B, width, H/8, W/8)."""
        return self.quant_conv_top(self.encoder_top(features))

    def bottom_prequant(self, features: torch.Tensor, top_quantized: torch.Tensor) -> torch.Tensor:
        """The bottom latents: the bottom features with the top codes decoded to the bottom grid (fig. 2a)."""
        return self.quant_conv_bottom(self.bottom_input(features, top_quantized))

    def bottom_input(self, features: torch.Tensor, top_quantized: torch.Tensor) -> torch.Tensor:
        """What quant_conv_bottom reads: the bottom features and the top codes decoded to the bottom grid."""
        return torch.cat([features, self.decoder_top(top_quantized)], 1)

    def decode_latents(self, top_quantized: torch.Tensor, bottom_quantized: torch.Tensor) -> torch.Tensor:
        """Code vectors of both levels -> images: the decoder sees the bottom codes and the upsampled top codes."""
        return self.decoder(torch.cat([self.upsample_top(top_quantized), bottom_quantized], 1))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Images -> (reconstruction, both levels' quantizer losses summed, info). Info holds one entry per level
        (top first) in `indices`, `codes` and `prequant` (the trainer's upkeep), and the levels' mean `usage` and
        `perplexity` (each level's as `top_*`, `bottom_*`)."""
        features = self.encoder_bottom(images)
        h_top = self.top_prequant(features)
        q_top = self.quantize_top(h_top)
        h_bottom = self.bottom_prequant(features, q_top.quantized)
        q_bottom = self.quantize_bottom(h_bottom)
        rec = self.decode_latents(q_top.quantized, q_bottom.quantized)
        levels = {"top": q_top, "bottom": q_bottom}
        stats = {f"{name}_{k}": v for name, q in levels.items() for k, v in q.stats.items()}
        for k in ("usage", "perplexity"):
            if k in q_top.stats and k in q_bottom.stats:
                stats[k] = (q_top.stats[k] + q_bottom.stats[k]) / 2
        info = {"indices": [q_top.indices, q_bottom.indices], "codes": [q_top.codes, q_bottom.codes],
                "prequant": [h_top, h_bottom], **stats}
        return rec, q_top.loss + q_bottom.loss, info

    # -- the public API --------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images (B, C, H, W) in [-1, 1] -> [top codes (B, H/8, W/8, depth), bottom codes (B, H/4, W/4, depth)].
        The bottom codes are chosen seeing the top codes as decoded from their indices, as in training."""
        features = self.encoder_bottom(inference_layout(images))
        top = self.quantize_top.indices_of(self.top_prequant(features))
        bottom = self.quantize_bottom.indices_of(self.bottom_prequant(features, self.quantize_top.decode_indices(top)))
        return [top, bottom]

    @torch.no_grad()
    def decode(self, codes: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
        """[top, bottom] codes (as `encode` gives them) -> images (B, out_ch, H, W), not clamped."""
        top, bottom = self.code_spec.to_levels(codes)
        if tuple(bottom.shape[1:3]) != (2 * top.shape[1], 2 * top.shape[2]) or bottom.shape[0] != top.shape[0]:
            raise ValueError(f"bottom codes {tuple(bottom.shape)} must have twice the grid of the top codes "
                             f"{tuple(top.shape)}")
        self.code_spec.check_range([top, bottom])
        q_top = inference_layout(self.quantize_top.decode_indices(top))
        q_bottom = inference_layout(self.quantize_bottom.decode_indices(bottom))
        return self.decode_latents(q_top, q_bottom).contiguous()

    @torch.no_grad()
    def initialize_codebook(self, batches: Callable[[], Iterable[torch.Tensor]]) -> str:
        """Data initialisation level by level (the trainer's, before the first step): the top codes from top
        latents, then the bottom codes from the bottom latents those top codes give; a grid level's latent that starts
        inside one cell is centred onto its grid (grid_start.py). Returns what was done."""
        top = torch.cat([latent_rows(self.quant_conv_top, self.encoder_top(self.encoder_bottom(x))) for x in batches()])
        with torch.autocast(top.device.type, enabled=False):
            top_done = initialize_quantizer(self.quantize_top, self.quant_conv_top, top)
        bottom = []
        for x in batches():  # the bottom latents given the top codes as just initialised (and maybe centred)
            features = self.encoder_bottom(x)
            h_top = self.top_prequant(features)
            with torch.autocast(h_top.device.type, enabled=False):
                q_top = self.quantize_top.decode_indices(self.quantize_top.indices_of(h_top.float()))
            bottom.append(latent_rows(self.quant_conv_bottom, self.bottom_input(features, q_top.to(features.dtype))))
        bottom_rows = torch.cat(bottom)
        with torch.autocast(bottom_rows.device.type, enabled=False):
            bottom_done = initialize_quantizer(self.quantize_bottom, self.quant_conv_bottom, bottom_rows)
        return f"top: {top_done}; bottom: {bottom_done}"

    # -- files -----------------------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        return {**asdict(self.config), "codes": self.code_spec.to_dict()}

    @classmethod
    def from_config_dict(cls, data: dict[str, Any]) -> VQVAE2:
        return cls(from_dict(VQVAE2Config, {k: v for k, v in data.items() if k != "codes"}, "model"))


MODELS.register("vqvae2")(VQVAE2.from_config_dict)
TOKENIZERS.register("vqvae2", config=VQVAE2Config)(VQVAE2)

__all__ = ["VQVAE2", "LevelQuantizers", "VQVAE2Config"]
