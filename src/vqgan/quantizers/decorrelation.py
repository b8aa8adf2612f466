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

A known failure, cause open: on a latent that starts tiny (the VQ-VAE's encoder gives std ~0.004 at init, the conv
VQGAN's ~0.17) the latent never grew into the grid, and every position rounded to one code (VQ-VAE + FSQ +
decorrelation alone: 0.1% of the codes; FSQ alone 17.8%). Being scale-free, the penalty's gradient grows as 1 / the
latent's std, but flooring the std at 0.05 in the denominator still gave 0.6%. Measured safe only with the conv
VQGAN and ViT networks, or with an entropy penalty beside it.
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
