"""A latent that starts inside one cell of a grid quantizer's grid (FSQ, LFQ) is moved onto the grid.

FSQ and LFQ have no codebook to initialise from data; their codes are a fixed grid over the latent's channels, and
the network before them decides where on it the latent starts. Some networks start it far inside one cell: the
VQ-VAE's encoder gives latents of std ~0.004 around means of ~0.05 (the conv VQGAN's: std ~0.17, 40 of 1000 FSQ codes
in a first batch), so every position rounds to the same code and the decoder sees one constant input. Plain FSQ
may or may not climb out (VQ-VAE, photo crops, 300 steps: seed 0 19.03 dB / 17.8% of the codes, seed 1 12.35 dB /
0.1%), LFQ hardly does (2.2% / 0.8%), and a scale-free penalty (decorrelation.py), whose gradient grows as 1 / the
latent's std, holds it there: Adam's normalised updates of the layer before the quantizer follow the penalty, not
the reconstruction, and the latent never grows into the grid (std 0.01-0.04 after 300 steps, 0.1% of the codes,
where FSQ alone reaches std 0.5 within ten steps; the penalty ramped up over 30 or 100 steps did the same).

So on a fresh run (`train.codebook.init_from_data`, the trainer's data initialisation) a latent whose every channel
rounds to one value in nearly every position, or spreads over less than 2% of a grid step, is shifted and scaled by
the layer before the quantizer, channel by channel, to start centred with the conv VQGAN's initial spread
(START_STD), where the family's recipes were tuned. (Centring with std 1 instead let the latent grow far past the
grid, std 10-20, into tanh's flat ends.) A latent that already spreads over the grid is left as it is, so presets
that start well are unchanged. VQ-VAE-2 checks each level (its FSQ levels start stuck too).
"""
from __future__ import annotations

import torch
from torch import nn

from .base import Quantizer
from .codebook import broadcast

# the conv VQGAN's latent std at init (measured over its quant_conv's outputs: 0.15-0.19 per channel)
START_STD = 0.17
# a channel is stuck when one value takes at least this share of the positions ...
STUCK_SHARE = 0.99
# ... and every channel is when the latent spreads over less than this many grid steps in each (LFQ's sign can split
# a tiny latent centred near 0: VQ-VAE + LFQ, std 0.005 = 0.0025 steps, two to four codes in a batch of 512
# positions; the conv VQGAN's LFQ latent spreads over 0.1 steps, its FSQ latent 0.56)
MIN_SPREAD = 0.02


def is_stuck(values: torch.Tensor, position: torch.Tensor) -> bool:
    """(N, C) grid values of N latents and their positions on the grid (in steps) -> True when every channel holds
    one value in >= STUCK_SHARE of them, or when no channel spreads over MIN_SPREAD of a step."""
    if position.std(0).max().item() < MIN_SPREAD:
        return True
    for column in values.T:
        _, counts = torch.unique(column, return_counts=True)
        if counts.max().item() < STUCK_SHARE * column.numel():
            return False
    return True


@torch.no_grad()
def centre_onto_grid(layer: nn.Module, latents: torch.Tensor, std: float = START_STD) -> None:
    """Fold a per-channel affine into `layer` (a conv or linear with a bias, whose outputs are the latents' channels)
    so that its outputs `latents` (N, C, float32) become centred with standard deviation `std`: y -> a (y - mean),
    a = std / y's std. A channel without a measurable spread (constant to float32's precision) is only centred."""
    if layer.bias is None:
        raise ValueError(f"{type(layer).__name__} has no bias to centre its outputs with")
    mean, spread = latents.mean(0), latents.std(0)
    scale = torch.where(spread > 1e-6 * (1 + mean.abs()), std / spread, torch.ones_like(spread))
    weight = layer.weight
    weight.mul_(scale.view(-1, *[1] * (weight.dim() - 1)).to(weight))
    layer.bias.sub_(mean.to(layer.bias)).mul_(scale.to(layer.bias))


@torch.no_grad()
def start_on_grid(quantizer: Quantizer, layer: nn.Module, latents: torch.Tensor) -> str | None:
    """The data initialisation's check for a grid quantizer (Quantizer.grid_values): its `latents` (N, C, float32),
    the outputs of `layer`, centred onto the grid when they start inside one cell. Every rank ends with rank 0's
    `layer`, whatever each decided. Returns what was done, for the log; None for a kind that is not a grid."""
    values = quantizer.grid_values(latents)
    if values is None:
        return None
    position = quantizer.grid_position(latents)
    spread = position.std(0).max().item()
    stuck = is_stuck(values, position)
    if stuck:
        centre_onto_grid(layer, latents)
    for param in (layer.weight, layer.bias):
        broadcast(param)  # on every call: a rank whose data fell on the other side of a threshold follows rank 0
    if not stuck:
        return f"{latents.shape[0]} encoder outputs spread over the grid (up to {spread:.2g} steps): left as they are"
    return (f"{latents.shape[0]} encoder outputs started inside one cell of the grid (spread <= {spread:.2g} steps): "
            f"the layer before the quantizer shifted and scaled so they start centred with std {START_STD}")
