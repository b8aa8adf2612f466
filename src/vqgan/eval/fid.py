"""Fréchet distance of feature sets (FID): streaming statistics, the distance, and the field's `.npz` files.

Statistics files hold `mu` (D,) and `sigma` (D, D): the format pytorch-fid writes and reads and that the ADM
evaluator's reference batches carry (beside their images and spatial statistics), so published reference sets
compare directly.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import atomic_file
from ..errors import UserError
from .shards import all_reduce


class FeatureStats:
    """Running sums of features for their mean and covariance, in float64: batches (and processes) add up, so
    the statistics of a set do not depend on how it was split."""

    def __init__(self, dim: int = 2048, device: str | torch.device = "cpu"):
        self.count = 0
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)  # sum of x x^T

    def update(self, features: torch.Tensor) -> FeatureStats:
        """Add (N, D) features."""
        x = features.to(self.sum.device, torch.float64)
        self.count += x.shape[0]
        self.sum += x.sum(0)
        self.outer += x.T @ x
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        self.count += other.count
        self.sum += other.sum.to(self.sum.device)
        self.outer += other.outer.to(self.outer.device)
        return self

    def all_reduce(self) -> FeatureStats:
        """Sum the statistics of every process (under torch.distributed; a no-op without it)."""
        count = torch.tensor([float(self.count)], dtype=torch.float64)
        for t in (count, self.sum, self.outer):
            all_reduce(t)
        self.count = int(count.item())
        return self

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu (D,), sigma (D, D)) with the unbiased covariance (n - 1), as `np.cov` and pytorch-fid compute it."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
        mu = self.sum / self.count
        sigma = (self.outer - self.count * torch.outer(mu, mu)) / (self.count - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).

    tr((sigma1 sigma2)^(1/2)) is taken as the sum of the square roots of the eigenvalues of the symmetric
    matrix s1^(1/2) sigma2 s1^(1/2) (the same eigenvalues as sigma1 sigma2): symmetric eigensolvers only, so
    no complex parts and no singular-matrix retries as with `scipy.linalg.sqrtm`; rounding makes tiny negative
    eigenvalues, clipped to 0."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                         f"{sigma2.shape}")
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    # a squared distance: a set against its own statistics rounds to about -1e-4, reported as 0
    return max(0.0, float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean))


def save_stats(path: str | Path, mu: np.ndarray, sigma: np.ndarray) -> Path:
    """Write `mu` and `sigma` (float64) to an `.npz` file, atomically."""
    path = Path(path)
    if path.suffix != ".npz":
        raise UserError(f"{path}: FID statistics files end in .npz")
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    return atomic_file(path, lambda tmp: np.savez(tmp, mu=mu, sigma=sigma))


def load_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from an `.npz` file with those keys (pytorch-fid, the ADM evaluator's reference batches, or
    `save_stats`), checked; never unpickles."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"FID statistics file {path} does not exist")
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path} is not an .npz file (a zip of arrays); expected FID statistics with 'mu' and "
                        "'sigma' as pytorch-fid or `vqgan fid-stats` write them")
    try:
        with np.load(path, allow_pickle=False) as f:
            if "mu" not in f.files or "sigma" not in f.files:
                raise UserError(f"{path} has no 'mu' and 'sigma' arrays (it holds {', '.join(f.files) or 'nothing'}); "
                                "expected FID statistics as pytorch-fid or `vqgan fid-stats` write them")
            mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise UserError(f"{path} is not a readable .npz file: {str(e).splitlines()[0] if str(e) else e!r}") from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise UserError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not a mean and its covariance")
    return mu, sigma
