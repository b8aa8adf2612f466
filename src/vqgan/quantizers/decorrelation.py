"""A penalty on correlated latent channels, for quantizers whose codes are a grid over the channels (FSQ).

FSQ's codes are all combinations of its channels' levels, so the latent uses the grid only as far as its channels
vary independently. Trained without help, they do not: on photo crops after 300 steps the four channels of
small-cpu's FSQ correlate at |r| = 0.5-0.8 (each channel alone spreads over its levels), the latent lies near a
thin slab of the grid, and held-out images use 47% of its 1000 codes. The mean squared correlation between
distinct channels over the batch (as VICReg's covariance term, Bardes et al. 2022, but scale-free) goes at exactly
that: over three seeds 75.6% of the codes at -0.3 dB from plain FSQ. The entropy penalty (entropy.py) reaches a
little more usage partly by giving the same content different codes at different positions (README, "Codes that
say where, not what").

Under DDP the statistics are those of the global batch (`mean_over_ranks`), as the entropy penalties' are.

A latent that starts inside one cell of the grid (the VQ-VAE's encoder: std ~0.004 at init, the conv VQGAN's ~0.17)
stays there under this penalty: scale-free, its gradient grows as 1 / the latent's std and Adam's updates of the
layer before the quantizer follow it, not the reconstruction (VQ-VAE + FSQ + decorrelation: 0.1% of the codes).
The trainer's data initialisation now centres such a start onto the grid (grid_start.py): 18.40 dB and 48% of the
codes over three seeds.
"""
from __future__ import annotations

import torch

from .entropy import mean_over_ranks


def channel_correlation(rows: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(N, C) latents -> the mean over pairs of distinct channels of their squared correlation coefficient over
    the N rows (of every rank). 0 for one channel."""
    n, c = rows.shape
    if c < 2:
        return rows.new_zeros(())
    rows = rows.float()
    mean = mean_over_ranks(rows.mean(0))
    cov = mean_over_ranks(rows.T @ rows / n) - torch.outer(mean, mean)
    std = cov.diagonal().clamp_min(eps).sqrt()
    corr = cov / torch.outer(std, std)
    return (corr.pow(2).sum() - corr.diagonal().pow(2).sum()) / (c * (c - 1))
