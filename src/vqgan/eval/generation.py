"""Generation metrics on Inception features: FID, KID, Inception Score, precision and recall.

Each follows torch-fidelity's definition and defaults (same subsets, splits, seeds), so the numbers match its
own on the same features:
- KID (Binkowski et al. 2018): the unbiased MMD^2 with the cubic polynomial kernel (x.y / d + 1)^3, averaged
  over `subsets` random subsets of `subset_size` features of each set.
- IS (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))) in `splits` parts of the shuffled set; the logits are
  the fc layer's without its bias, as in torch-fidelity and torchmetrics.
- Precision / recall (Kynkaanniemi et al. 2019): the share of generated features inside the k-NN ball
  (k = 3) of some real feature, and the share of real features inside the ball of some generated one.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .fid import FeatureStats, frechet_distance
from .shards import distributed, gather_to_main

KID_SUBSETS, KID_SUBSET_SIZE, IS_SPLITS, PR_NEIGHBOURS, SEED = 100, 1000, 10, 3, 2020


@dataclass
class FeatureSet:
    """The Inception outputs of one image set: pool features (N, 2048) for FID, KID and precision/recall
    (kept in float32: 50k images take 400 MB), logits (N, 1008) for IS, and exact float64 FID statistics."""
    pool: list[torch.Tensor] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    stats: FeatureStats = field(default_factory=FeatureStats)

    def add(self, features: dict[str, torch.Tensor]) -> None:
        self.stats.update(features["pool"])
        self.pool.append(features["pool"].float().cpu())
        self.logits.append(features["logits"].float().cpu())

    @property
    def count(self) -> int:
        return self.stats.count

    def pool_features(self) -> torch.Tensor:
        return torch.cat(self.pool) if self.pool else torch.zeros(0, 2048)

    def logit_features(self) -> torch.Tensor:
        return torch.cat(self.logits) if self.logits else torch.zeros(0, 1008)

    def gather(self, indices: list[int]) -> FeatureSet:
        """Under torchrun, where each process holds the rows `indices` (in the set) of one set: the statistics
        summed on every process (`count` is the set's everywhere), the rows on process 0 in the set's order
        (KID and IS draw subsets by position) and none left on the others. In one process: unchanged."""
        if not distributed():
            return self
        self.stats.all_reduce()
        parts = gather_to_main((indices, self.pool_features(), self.logit_features()))
        self.pool, self.logits = [], []
        if parts is not None:
            order = torch.tensor([i for index, _, _ in parts for i in index], dtype=torch.long).argsort()
            self.pool = [torch.cat([pool for _, pool, _ in parts])[order]]
            self.logits = [torch.cat([logits for _, _, logits in parts])[order]]
        return self


def _mmd2_unbiased(k_xx: np.ndarray, k_xy: np.ndarray, k_yy: np.ndarray) -> float:
    m = k_xx.shape[0]
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2 * k_xy.sum() / (m * m))


def kid(features1: torch.Tensor, features2: torch.Tensor, subsets: int = KID_SUBSETS,
        subset_size: int = KID_SUBSET_SIZE, seed: int = SEED) -> dict[str, float]:
    """KID mean and std over subsets; `subset_size` shrinks to the smaller set's size (recorded) when a set is
    smaller, where torch-fidelity would refuse."""
    x, y = features1.double().cpu().numpy(), features2.double().cpu().numpy()
    size = min(subset_size, len(x), len(y))
    if size < 2:
        raise ValueError(f"KID needs at least 2 features per set, got {len(x)} and {len(y)}")
    rng = np.random.RandomState(seed)

    def kernel(a, b):
        return (a @ b.T / a.shape[1] + 1.0) ** 3

    mmds = []
    for _ in range(subsets):
        a = x[rng.choice(len(x), size, replace=False)]
        b = y[rng.choice(len(y), size, replace=False)]
        mmds.append(_mmd2_unbiased(kernel(a, a), kernel(a, b), kernel(b, b)))
    return {"kid_mean": float(np.mean(mmds)), "kid_std": float(np.std(mmds)), "kid_subset_size": size,
            "kid_subsets": subsets}


def inception_score(logits: torch.Tensor, splits: int = IS_SPLITS, seed: int = SEED) -> dict[str, float]:
    """IS mean and std over `splits` parts of the set, shuffled with `seed` first (as torch-fidelity)."""
    n = logits.shape[0]
    if n < splits:
        raise ValueError(f"the Inception Score in {splits} splits needs at least {splits} images, got {n}")
    logits = logits[np.random.RandomState(seed).permutation(n)].double()
    log_p = logits.log_softmax(dim=1)
    scores = []
    for i in range(splits):
        part = log_p[i * n // splits:(i + 1) * n // splits]
        log_marginal = part.exp().mean(0).log()
        scores.append(float((part.exp() * (part - log_marginal)).sum(1).mean().exp()))
    return {"is_mean": float(np.mean(scores)), "is_std": float(np.std(scores)), "is_splits": splits}


def knn_radii(features: torch.Tensor, k: int = PR_NEIGHBOURS, batch: int = 10000) -> torch.Tensor:
    """(N,) distance of each feature to its k-th nearest other feature."""
    return torch.cat([torch.cdist(part, features).kthvalue(k + 1, dim=1).values for part in features.split(batch)])


def covered(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, batch: int = 10000) -> torch.Tensor:
    """(N,) bool: whether each point lies within some centre's ball."""
    return torch.cat([(torch.cdist(part, centres) <= radii).any(dim=1) for part in points.split(batch)])


def precision_recall(generated: torch.Tensor, real: torch.Tensor, k: int = PR_NEIGHBOURS) -> dict[str, float]:
    """Kynkaanniemi et al. 2019 improved precision and recall with k-NN balls."""
    if min(len(generated), len(real)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} features per set")
    precision = float(covered(generated, real, knn_radii(real, k)).double().mean())
    recall = float(covered(real, generated, knn_radii(generated, k)).double().mean())
    return {"precision": precision, "recall": recall, "pr_k": k}


def generation_metrics(generated: FeatureSet, reference: FeatureSet | tuple[np.ndarray, np.ndarray],
                       kid_subset_size: int = KID_SUBSET_SIZE, is_splits: int = IS_SPLITS) -> dict:
    """FID, KID, IS and precision/recall of `generated` against `reference` (its features, or only its FID
    statistics (mu, sigma): then KID and precision/recall, which need features, are reported not computed)."""
    mu, sigma = generated.stats.mean_cov()
    ref_mu, ref_sigma = reference.stats.mean_cov() if isinstance(reference, FeatureSet) else reference
    out: dict = {"fid": frechet_distance(mu, sigma, ref_mu, ref_sigma)}
    try:
        out.update(inception_score(generated.logit_features(), is_splits))
    except ValueError as e:
        out["inception_score"] = f"not computed: {e}"
    if not isinstance(reference, FeatureSet):
        why = "not computed: the reference is a statistics file (mu, sigma); KID and precision/recall need its features"
        out.update(kid=why, precision_recall=why)
        return out
    gen, ref = generated.pool_features(), reference.pool_features()
    for name, fn in (("kid", lambda: kid(gen, ref, subset_size=kid_subset_size)),
                     ("precision_recall", lambda: precision_recall(gen, ref))):
        try:
            out.update(fn())
        except ValueError as e:
            out[name] = f"not computed: {e}"
    return out
